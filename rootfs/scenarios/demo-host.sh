# demo-host: the demo tour (demo.sh) as scripts/demo.sh runs it on a host whose
# KVM can run Linux - L2's /lab laid out elsewhere (LAB_DIR, as
# target/demo/lab), a directory of its own for the tour's files (RUN_DIR) and
# RAM file (DEMO_RAM), LAB_DIR/bin first on PATH - with L2's own /lab and /run
# hidden under empty tmpfs mounts, so that the tour cannot use anything only
# L2 has. The project's machines cannot run Linux on their KVM: this is where
# the direct path is tested.
# lab-needs: molt-next
d=/tmp/demo-host
mkdir -p $d/lab/bin $d/lab/lib $d/run $d/scenarios
cp /lab/vmlinuz /lab/guest.cpio.gz $d/lab/
cp /lab/lib/*.sh $d/lab/lib/
cp /lab/scenarios/demo.sh $d/scenarios/
for b in molt molt-next labtime labcpr labtcp; do cp /lab/bin/$b $d/lab/bin/; done
mount -t tmpfs tmpfs /lab
mount -t tmpfs tmpfs /run
echo "LAB-RESULT l2_paths_hidden=$(ls -A /lab | wc -l)/$(ls -A /run | wc -l)"
PATH=$d/lab/bin:/bin:/sbin:/usr/bin:/usr/sbin LAB_DIR=$d/lab RUN_DIR=$d/run \
    DEMO_RAM=/dev/shm/molt-demo.ram sh $d/scenarios/demo.sh
