//! A test hook for the failure tests of live update, compiled in only with
//! the `test-hooks` feature (the lab's molt-next build; SPEC.md: no
//! environment variable changes what a released molt does). With
//! `MOLT_TEST_KILL_AT=STEP` in its environment, the molt taking a guest over
//! kills itself (SIGKILL, as a crash would) when it reaches STEP:
//!
//! - `hello`: transfer, the old side's HELLO checked, ours not sent yet;
//! - `adopted`: it holds the handed-over descriptors (exec and transfer);
//! - `built`: RAM mapped, the VM and its devices built (exec and transfer;
//!   transfer: READY not sent yet, the guest still runs on the old side);
//! - `state`: transfer, READY sent and STATE received, nothing restored;
//! - `vaddr`: the VFIO DMA mappings have its addresses (exec and transfer);
//! - `restored`: the state loaded into the VM, the vCPUs not started
//!   (transfer: RESTORED not sent; exec: the guardian not released).
//!
//! The old process (transfer) or the guardian (exec) must then resume the
//! guest as it was. (After RESTORED the old side sends GO and exits, and
//! after the guardian's release no image is left to roll back to: a death
//! then loses the guest like any crash, so there is no step there.) The lab's
//! fault-storm scenario draws its kill points from this list.

/// Dies here if this is a `test-hooks` build and `MOLT_TEST_KILL_AT` names
/// `step`.
pub fn point(step: &str) {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("MOLT_TEST_KILL_AT").is_some_and(|v| v == step) {
        log::warn!("MOLT_TEST_KILL_AT={step}: killing myself");
        // SAFETY: raise takes no pointers; SIGKILL ends the process here.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = step;
}
