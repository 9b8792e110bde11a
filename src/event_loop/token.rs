//! What an epoll event is about. The loop registers and dispatches `Token`s;
//! only this file knows how they are packed into epoll's `u64`.

/// An epoll registration's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    /// A vCPU thread reported the guest's end (the exit eventfd).
    Exit,
    /// A terminating signal (the signalfd).
    Signal,
    /// Console input on stdin.
    Stdin,
    /// The control socket has a connection waiting.
    Listener,
    /// An update's worker finished.
    Update,
    /// The guest asked to suspend to RAM (the power device's eventfd).
    Sleep,
    /// Control client `slot`.
    Client(usize),
    /// Virtio device `device`'s queue notifier `index`.
    Queue { device: usize, index: usize },
    /// Virtio device `device`'s backend descriptor `index` (a tap) is ready.
    DeviceFd { device: usize, index: usize },
}

const CLIENT: u64 = 16;
/// Virtio events: `VIRTIO | device << 16 | kind << 8 | index`.
const VIRTIO: u64 = 1 << 32;
const KIND_QUEUE: u64 = 0;
const KIND_FD: u64 = 1;

impl Token {
    pub(super) fn encode(self) -> u64 {
        let virtio = |device: usize, kind: u64, index: usize| {
            VIRTIO | ((device as u64) << 16) | (kind << 8) | (index as u64 & 0xff)
        };
        match self {
            Token::Exit => 0,
            Token::Signal => 1,
            Token::Stdin => 2,
            Token::Listener => 3,
            Token::Update => 4,
            Token::Sleep => 5,
            Token::Client(slot) => CLIENT + slot as u64,
            Token::Queue { device, index } => virtio(device, KIND_QUEUE, index),
            Token::DeviceFd { device, index } => virtio(device, KIND_FD, index),
        }
    }

    /// The token `data` was made from; None for data no `encode` gives.
    pub(super) fn decode(data: u64) -> Option<Token> {
        Some(match data {
            0 => Token::Exit,
            1 => Token::Signal,
            2 => Token::Stdin,
            3 => Token::Listener,
            4 => Token::Update,
            5 => Token::Sleep,
            d if d >= VIRTIO => {
                let (device, kind, index) = (
                    ((d >> 16) & 0xffff) as usize,
                    (d >> 8) & 0xff,
                    (d & 0xff) as usize,
                );
                match kind {
                    KIND_QUEUE => Token::Queue { device, index },
                    KIND_FD => Token::DeviceFd { device, index },
                    _ => return None,
                }
            }
            d if d >= CLIENT => Token::Client((d - CLIENT) as usize),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_round_trips() {
        let tokens = [
            Token::Exit,
            Token::Signal,
            Token::Stdin,
            Token::Listener,
            Token::Update,
            Token::Sleep,
            Token::Client(0),
            Token::Client(63),
            Token::Queue {
                device: 0,
                index: 0,
            },
            Token::Queue {
                device: 7,
                index: 2,
            },
            Token::DeviceFd {
                device: 31,
                index: 0,
            },
        ];
        for t in tokens {
            assert_eq!(Token::decode(t.encode()), Some(t), "{t:?}");
        }
        assert_eq!(Token::decode(6), None);
        assert_eq!(Token::decode(VIRTIO | 2 << 8), None);
    }
}
