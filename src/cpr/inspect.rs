//! `molt state PATH`: a human summary of a saved state, read-only.

use std::fmt::Write;
use std::path::Path;

use super::reboot;
use super::state::{RamLocation, RunState};
use crate::vm::host_cpu::{self, HostCpu};
use crate::vm::mac_str;
use crate::vm::memory::ram_regions;

/// Decodes the state in `path` (checking it as a restore would) and describes it.
pub fn summary(path: &Path) -> Result<String, reboot::Error> {
    let (s, mut rest) = reboot::load_state(path)?;
    match s.ram {
        RamLocation::InPlace { .. } => reboot::expect_end(path, &mut rest)?,
        RamLocation::InStateFile => reboot::verify_ram(path, &mut rest, s.machine.shape.mem_size)?,
    }
    let size = std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| reboot::Error::Io("stat", path.into(), e))?;
    let m = &s.machine;
    let mut out = String::new();
    let _ = writeln!(out, "state:    {}", path.display());
    let mut header = [0u8; super::state::HEADER_LEN];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
        .map_err(|e| reboot::Error::Io("read", path.into(), e))?;
    let (format, _) =
        super::state::header(&header).map_err(|e| reboot::Error::State(path.into(), e))?;
    let _ = writeln!(
        out,
        "format:   version {format} (written by molt {})",
        s.writer
    );
    let run = match s.run {
        RunState::Running => "running",
        RunState::Paused => "paused (stays paused when resumed)",
        RunState::Suspended => "suspended to RAM, ACPI S3 (stays suspended until `wakeup`)",
    };
    let _ = writeln!(out, "run:      {run}");
    let _ = writeln!(out, "size:     {size} bytes");
    let _ = writeln!(out, "vcpus:    {}", m.shape.vcpus);
    if let Some(v) = m.vcpus.first() {
        let _ = writeln!(out, "cpu:      {}", host_cpu::describe_saved(&v.cpuid));
    }
    let _ = writeln!(out, "host cpu: {}", host_verdict(&s));
    let _ = writeln!(out, "memory:   {} bytes", m.shape.mem_size);
    for r in ram_regions(m.shape.mem_size) {
        let _ = writeln!(
            out,
            "  region  guest {:#x}..{:#x} at file offset {:#x}",
            r.guest_addr,
            r.guest_addr + r.size,
            r.file_offset
        );
    }
    let ram = match s.ram {
        RamLocation::InPlace { .. } => "in place (the --mem-file it was saved with)",
        RamLocation::InStateFile => "in this file",
    };
    let _ = writeln!(out, "ram:      {ram}");
    for (i, ro) in m.shape.disks.iter().enumerate() {
        let mode = if *ro { "read-only" } else { "read-write" };
        let image = match s.disks.get(i) {
            Some(id) => format!("image {id}"),
            None => "image not recorded (format 1)".into(),
        };
        let _ = writeln!(out, "disk {i}:   virtio-blk, {mode}, {image}");
    }
    for (i, mac) in m.shape.nets.iter().enumerate() {
        let _ = writeln!(out, "nic {i}:    virtio-net, mac {}", mac_str(mac));
    }
    for (i, d) in s.vfio.iter().enumerate() {
        let _ = writeln!(out, "vfio {i}:   {d} (opened again by name at restart)");
    }
    for (i, d) in m.virtio.iter().enumerate() {
        let _ = writeln!(
            out,
            "device {i}: status {:#04x}, features {:#x}, {}",
            d.status,
            d.driver_features,
            if d.active { "running" } else { "not started" }
        );
    }
    Ok(out)
}

/// Whether this host's KVM could resume the state, as a restore would decide.
fn host_verdict(s: &super::state::CprState) -> String {
    let host = match HostCpu::open() {
        Ok((h, _probe, _)) => h,
        Err(e) => return format!("not checked ({e})"),
    };
    match host.check(s.machine.vcpus.iter().map(|v| &**v)) {
        Ok(()) => format!("compatible ({})", host.describe()),
        Err(e) => format!("refused: {e}"),
    }
}
