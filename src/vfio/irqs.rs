//! A passed-through function's MSI or MSI-X vectors as VFIO signals them
//! (VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER with eventfds). A live vector's
//! interrupts go to its irqfd, which KVM injects with the vector's MSI route
//! without molt seeing them. A masked vector's go to its parked eventfd, where
//! molt collects them as pending when the guest looks or unmasks; unmasking
//! switches the vector back (as QEMU switches a masked vector to its userspace
//! eventfd).

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::ioctl::{self, IrqControl};

/// One interrupt index's vectors, `first..first + vectors` in the device's
/// eventfd lists, and what VFIO was last told.
pub struct Lines {
    index: u32,
    first: usize,
    vectors: usize,
    /// (vectors enabled, live mask) as programmed; None: disabled.
    armed: Option<(usize, u32)>,
}

/// The bits set in `mask`.
pub fn bits(mask: u32) -> impl Iterator<Item = usize> {
    (0..32).filter(move |b| mask & 1 << b != 0)
}

impl Lines {
    pub fn new(index: u32, first: usize, vectors: usize) -> Self {
        Lines {
            index,
            first,
            vectors,
            armed: None,
        }
    }

    /// Programs VFIO for the guest's registers: MSI(-X) disabled, or `count`
    /// vectors enabled of which those in `live` can fire. Only what changed
    /// is sent: enabling sends every vector, a mask change only the vectors
    /// it moved.
    pub fn sync(
        &mut self,
        dev: &dyn IrqControl,
        irqfds: &[EventFd],
        parked: &[EventFd],
        enabled: bool,
        count: usize,
        live: u32,
    ) -> Result<(), ioctl::Error> {
        let want = enabled.then_some((count.min(self.vectors), live));
        if want == self.armed {
            return Ok(());
        }
        let fd = |v: usize| -> RawFd {
            let set = if live & 1 << v != 0 { irqfds } else { parked };
            set[self.first + v].as_raw_fd()
        };
        let before = self.armed.take();
        match (before, want) {
            (_, None) => dev.disable_irqs(self.index)?,
            (Some((was, old)), Some((n, live))) if was == n => {
                for v in bits(old ^ live).filter(|&v| v < n) {
                    dev.set_irqs(self.index, v as u32, &[fd(v)])?;
                }
            }
            (was, Some((n, _))) => {
                // A new vector count needs the index disabled first.
                if was.is_some() {
                    dev.disable_irqs(self.index)?;
                }
                let fds: Vec<RawFd> = (0..n).map(fd).collect();
                dev.set_irqs(self.index, 0, &fds)?;
            }
        }
        self.armed = want;
        Ok(())
    }

    /// What VFIO was last told: (vectors enabled, live mask), or None for
    /// disabled. A live update carries it: VFIO keeps signalling the same
    /// eventfds, handed over, so the next process must know what it set.
    pub fn armed(&self) -> Option<(usize, u32)> {
        self.armed
    }

    /// Takes what VFIO was told (`armed`) from a saved state: at most the
    /// vectors there are, live ones among them.
    pub fn restore_armed(&mut self, armed: Option<(usize, u32)>) -> Result<(), String> {
        if let Some((n, live)) = armed {
            let beyond = if n >= 32 { 0 } else { u32::MAX << n };
            if n > self.vectors || live & beyond != 0 {
                return Err(format!(
                    "{n} vectors armed (live {live:#x}) of interrupt index {}, which has {}",
                    self.index, self.vectors
                ));
            }
        }
        self.armed = armed;
        Ok(())
    }

    /// Vectors whose parked eventfd was signalled (and is now drained).
    pub fn collect(&self, parked: &[EventFd]) -> u32 {
        (0..self.vectors)
            .filter(|v| parked[self.first + v].read().is_ok())
            .fold(0, |acc, v| acc | 1 << v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// The SET_IRQS calls made: (index, start, fds), fds empty for a disable.
    #[derive(Default)]
    struct Calls(RefCell<Vec<(u32, u32, Vec<RawFd>)>>);

    impl IrqControl for Calls {
        fn set_irqs(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), ioctl::Error> {
            self.0.borrow_mut().push((index, start, fds.to_vec()));
            Ok(())
        }
        fn disable_irqs(&self, index: u32) -> Result<(), ioctl::Error> {
            self.0.borrow_mut().push((index, 0, Vec::new()));
            Ok(())
        }
    }

    fn fds(n: usize) -> Vec<EventFd> {
        (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect()
    }

    #[test]
    fn vectors_follow_their_masks() {
        let (irqfds, parked) = (fds(5), fds(5));
        let raw = |s: &[EventFd], v: usize| s[v].as_raw_fd();
        // MSI-X: vectors 2..5 of the lists (two MSI vectors come first).
        let mut lines = Lines::new(2, 2, 3);
        let calls = Calls::default();
        let mut sync = |enabled, count, live| {
            lines
                .sync(&calls, &irqfds, &parked, enabled, count, live)
                .unwrap()
        };
        sync(false, 3, 0);
        assert!(calls.0.borrow().is_empty(), "disabled and never enabled");
        sync(true, 3, 0b001);
        sync(true, 3, 0b001);
        sync(true, 3, 0b100);
        sync(false, 3, 0b100);
        let want = vec![
            (
                2,
                0,
                vec![raw(&irqfds, 2), raw(&parked, 3), raw(&parked, 4)],
            ),
            (2, 0, vec![raw(&parked, 2)]),
            (2, 2, vec![raw(&irqfds, 4)]),
            (2, 0, vec![]),
        ];
        assert_eq!(*calls.0.borrow(), want);
    }

    #[test]
    fn a_new_vector_count_reenables() {
        let (irqfds, parked) = (fds(4), fds(4));
        let mut lines = Lines::new(1, 0, 4);
        let calls = Calls::default();
        lines.sync(&calls, &irqfds, &parked, true, 1, 1).unwrap();
        lines.sync(&calls, &irqfds, &parked, true, 8, 0b11).unwrap();
        let c = calls.0.borrow();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1], (1, 0, vec![]));
        assert_eq!(c[2].2.len(), 4, "at most the vectors there are");
    }

    #[test]
    fn armed_state_is_restored_within_the_vectors() {
        let (irqfds, parked) = (fds(2), fds(2));
        let mut lines = Lines::new(1, 0, 2);
        assert!(lines.restore_armed(Some((3, 1))).is_err(), "3 of 2 vectors");
        assert!(
            lines.restore_armed(Some((1, 0b10))).is_err(),
            "vector 1 of 1"
        );
        lines.restore_armed(Some((2, 0b01))).unwrap();
        assert_eq!(lines.armed(), Some((2, 0b01)));
        // What VFIO already has is not sent again.
        let calls = Calls::default();
        lines.sync(&calls, &irqfds, &parked, true, 2, 0b01).unwrap();
        assert!(calls.0.borrow().is_empty());
    }

    #[test]
    fn parked_interrupts_are_collected_once() {
        let parked = fds(3);
        let lines = Lines::new(2, 1, 2);
        parked[2].write(1).unwrap();
        parked[0].write(1).unwrap(); // not this index's
        assert_eq!(lines.collect(&parked), 0b10);
        assert_eq!(lines.collect(&parked), 0);
    }
}
