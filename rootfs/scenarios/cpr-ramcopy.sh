# cpr-ramcopy: cpr-restart without --mem-file. Guest RAM is molt's memfd,
# which dies with molt, so cpr-save copies it into the state file (the
# RAM-copy fallback) and the new molt reads it back. Same checks as
# cpr-restart; state_bytes shows the copied RAM.
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
cpr_local cpr-ramcopy
lab_end
