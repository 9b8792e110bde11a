# Smoke test of the lab itself: L2 boots and KVM works inside it.
. /lab/lib/common.sh
if [ -c /dev/kvm ]; then check kvm yes yes; else check kvm no yes; fi
ls -l /dev/kvm
result cpus "$(grep -c ^processor /proc/cpuinfo)"
result svm "$(grep -qw svm /proc/cpuinfo && echo yes || echo no)"
result molt "$([ -x /lab/bin/molt ] && echo present || echo missing)"
read -r up _ < /proc/uptime
result uptime_s "$up"
lab_end
