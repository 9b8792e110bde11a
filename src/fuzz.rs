//! Fuzz targets: each takes arbitrary bytes to where untrusted input enters
//! molt and must come back without a panic, whatever the bytes. Built into the
//! binary only with `--features fuzz` (`molt __fuzz TARGET` reads inputs from
//! AFL++ through cargo-afl, scripts/fuzz.sh); every input kept under
//! `tests/fuzz/TARGET/` - the seeds, and each one that once crashed molt - runs
//! again in the unit test below on every `cargo test`.
//!
//! - `state`: a state file or STATE message (`state::decode`, which checks the
//!   machine, its devices and disks as a restore does). The first byte picks a
//!   format molt reads and the rest is sealed as its payload with a valid CRC,
//!   so that mutations reach the decoder rather than the checksum; the raw
//!   bytes are decoded as a whole file too. A state that decodes must encode
//!   and decode to itself.
//! - `exec`: the message a new image reads from the old one's memfd.
//! - `transfer`: one transfer-protocol message body; a STATE's bytes are
//!   decoded as a state.
//! - `control`: control lines, one per input line.
//! - `blk`, `net`, `pci`: a guest driving virtqueues, and PCI config space and
//!   BARs (`devices.rs`).

mod devices;

use crate::control;
use crate::cpr::{exec, state, transfer};

/// The targets, by the name `molt __fuzz` and `tests/fuzz/` know them.
pub const TARGETS: [&str; 7] = ["state", "exec", "transfer", "control", "blk", "net", "pci"];

/// Runs target `name` on `data`. Panics (the finding) if molt mishandles it;
/// Err only for an unknown target.
pub fn run(name: &str, data: &[u8]) -> Result<(), String> {
    match name {
        "state" => fuzz_state(data),
        "exec" => {
            let _ = exec::parse(data);
        }
        "transfer" => {
            if let Ok((transfer::Msg::State { bytes, .. }, _)) = transfer::decode(data) {
                decodes_to_itself(bytes.0);
            }
        }
        "blk" => devices::blk(data),
        "net" => devices::net(data),
        "pci" => devices::pci(data),
        "control" => {
            for line in String::from_utf8_lossy(data).lines() {
                let _ = control::parse(line);
            }
        }
        _ => {
            return Err(format!(
                "no fuzz target '{name}' (targets: {})",
                TARGETS.join(", ")
            ))
        }
    }
    Ok(())
}

fn fuzz_state(data: &[u8]) {
    decodes_to_itself(data);
    if let Some((&pick, payload)) = data.split_first() {
        let version = state::READS[usize::from(pick) % state::READS.len()];
        decodes_to_itself(&state::seal(version, payload));
    }
}

/// A state that decodes is one molt would restore: written again, it must
/// read back the same.
fn decodes_to_itself(bytes: &[u8]) {
    if let Ok(s) = state::decode(bytes) {
        let again = state::encode_as(&s, state::VERSION).expect("a decoded state encodes");
        assert_eq!(state::decode(&again).expect("an encoded state decodes"), s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every kept input of every target, and an unknown target refused.
    #[test]
    fn kept_inputs_run_clean() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
        for name in TARGETS {
            let inputs: Vec<_> = std::fs::read_dir(dir.join(name))
                .unwrap_or_else(|e| panic!("tests/fuzz/{name}: {e}"))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!inputs.is_empty(), "tests/fuzz/{name} has no seed");
            for input in inputs {
                let data = std::fs::read(&input).unwrap();
                run(name, &data).unwrap();
            }
        }
        assert!(run("nope", b"").unwrap_err().contains("state, exec"));
    }
}
