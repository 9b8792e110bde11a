//! The transfer protocol's frames: a message's length and postcard body
//! (after MAGIC on the first), built into buffers a caller may have made
//! before the pause; and STATE's state bytes as serde bytes.

use serde::{Deserialize, Serialize};

use super::{Msg, MAGIC};
use crate::cpr::fds::FdKind;
use crate::terminal::Original;

/// A STATE's encoded state: written and read as serde bytes, without a
/// copy either way (read, it borrows the received frame). Postcard writes
/// bytes as a `Vec<u8>`: their length, then each byte as itself, so this is
/// the same on the wire as the `Vec<u8>` older molts send and read, which
/// went one byte at a time.
#[derive(Debug)]
pub(crate) struct Bytes<'a>(pub &'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes borrowed from the frame")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                b: &'de [u8],
            ) -> Result<Bytes<'de>, E> {
                Ok(Bytes(b))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

pub(super) fn frame(msg: &Msg, magic: bool) -> Result<Vec<u8>, String> {
    frame_into(msg, magic, Vec::new())
}

/// Room for a STATE frame's fields and trailer (the pause marks) besides
/// the state's bytes.
pub(super) const STATE_FRAME_ROOM: usize = 1024;

/// `msg`'s frame written into `out` (its contents replaced), which grows
/// only if the frame needs more than its capacity.
pub(super) fn frame_into(msg: &Msg, magic: bool, mut out: Vec<u8>) -> Result<Vec<u8>, String> {
    out.clear();
    // A small message's frame grows if it must (a FAIL's reason): reserving
    // MAX_SMALL for each would be a fresh mapping each time under musl.
    let room = match msg {
        Msg::State { bytes, .. } => bytes.0.len() + STATE_FRAME_ROOM,
        _ => 64,
    };
    out.reserve(MAGIC.len() + 4 + room);
    if magic {
        out.extend_from_slice(&MAGIC);
    }
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(msg, out).map_err(|e| e.to_string())?;
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// FDS's frame: the kinds, then the user's terminal mode if there is one.
pub(super) fn fds_frame(kinds: &[FdKind], terminal: Option<Original>) -> Result<Vec<u8>, String> {
    let msg = Msg::Fds {
        kinds: Box::new(kinds.iter().copied().collect()),
    };
    let mut frame = frame(&msg, false)?;
    if let Some(t) = terminal {
        let t = postcard::to_allocvec(&t).map_err(|e| e.to_string())?;
        let len = frame.len() - 4 + t.len();
        frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
        frame.extend(t);
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpr::transfer::decode;

    #[test]
    fn state_bytes_are_a_vec_on_the_wire() {
        // What older molts send and read: the bytes as a plain Vec<u8>.
        #[derive(Serialize, Deserialize)]
        enum Old {
            Hello,
            Fds,
            Ready,
            State { max_pause_ms: u32, bytes: Vec<u8> },
        }
        let bytes: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let new = Msg::State {
            max_pause_ms: 1000,
            bytes: Bytes(&bytes),
        };
        let old = Old::State {
            max_pause_ms: 1000,
            bytes: bytes.clone(),
        };
        let framed = frame_into(&new, false, vec![9; 10]).unwrap();
        assert_eq!(framed, frame(&new, false).unwrap());
        let len = u32::from_le_bytes(framed[..4].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 4);
        assert_eq!(&framed[4..], postcard::to_allocvec(&old).unwrap());
        match decode(&postcard::to_allocvec(&old).unwrap()).unwrap() {
            (
                Msg::State {
                    max_pause_ms,
                    bytes: b,
                },
                rest,
            ) => {
                assert_eq!((max_pause_ms, b.0, rest), (1000, &bytes[..], &[][..]));
            }
            other => panic!("{other:?}"),
        }
        match postcard::from_bytes::<Old>(&framed[4..]).unwrap() {
            Old::State { bytes: b, .. } => assert_eq!(b, bytes),
            _ => panic!("not a STATE"),
        }
    }
}
