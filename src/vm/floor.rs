//! The floor of an update's pause on this host: what no VMM can avoid, timed
//! with molt's own code (`scripts/bench-update.sh` prints each mode's pause
//! next to it). A hidden command, `molt __floor`:
//!
//! - `exec CPUS MEM RUNS`: RUNS times, `execve` of this (static) binary, then
//!   in the new image a VM with its irqchip, PIT and memslots over the RAM
//!   handed over (`kvm::create_vm`, as molt) and CPUS bare vCPUs
//!   (KVM_CREATE_VCPU). The previous image's VM stays open across the exec
//!   and is closed after, as molt does, so its teardown is not counted.
//!   Prints one line per run: the µs from just before `execve` to the last
//!   vCPU created.
//! - `transfer CPUS RUNS`: two VMs of CPUS vCPUs each, created as molt
//!   creates them; RUNS times, every vCPU's state read from the first with
//!   the KVM_GET_* calls molt saves it with (`vcpu_state::save`, the MSR list
//!   asked once) and written into the second (`vcpu_state::restore`; its
//!   CPUID, set at creation, is not set again), and the VM's irqchip, PIT and
//!   clock the same way, all on one thread. Prints one line per run:
//!   `GET_US SET_US`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use kvm_ioctls::VcpuFd;

use super::memory::GuestRam;
use super::vcpu_state::SaveSpec;
use super::{host_cpu, kvm, vcpu, vcpu_state};
use crate::phases::now;

/// The hidden command's name.
pub const ARG: &str = "__floor";

/// `molt __floor ARGS...`: runs the measurement ARGS names; Err says why not.
pub fn main(args: &[String]) -> Result<(), String> {
    let num = |i: usize| -> Result<u64, String> {
        let a = args.get(i).ok_or("missing argument")?;
        crate::args::parse_size(a).map_err(|e| format!("{a}: {e}"))
    };
    match args.first().map(String::as_str) {
        Some("exec") => {
            let ram = GuestRam::create(num(2)?, None).map_err(|e| e.to_string())?;
            execute(&ram, num(1)?, num(3)?, &[])
        }
        // One exec's far side: CPUS MEM RUNS_LEFT RAM_FD EXECED_AT_NS OLD_FDS...
        Some("exec-hop") => {
            let path = format!("/proc/self/fd/{}", num(4)?);
            let ram = GuestRam::adopt(num(2)?, Path::new(&path)).map_err(|e| e.to_string())?;
            let cpus = num(1)?;
            let (vm, vcpus) = vm_with_vcpus(&ram, cpus as u8)?;
            println!("{}", (now() - num(5)?) / 1000);
            for old in &args[6..] {
                let fd: RawFd = old.parse().map_err(|_| format!("bad fd {old}"))?;
                // SAFETY: the previous image's VM and vCPU descriptors, handed
                // on by number and used by nothing here.
                unsafe { libc::close(fd) };
            }
            match num(3)? {
                0 | 1 => Ok(()),
                left => {
                    let kept: Vec<RawFd> = std::iter::once(vm.as_raw_fd())
                        .chain(vcpus.iter().map(AsRawFd::as_raw_fd))
                        .collect();
                    std::mem::forget((vm, vcpus));
                    execute(&ram, cpus, left - 1, &kept)
                }
            }
        }
        Some("transfer") => transfer(num(1)? as u8, num(2)?),
        _ => Err("usage: molt __floor exec CPUS MEM RUNS | transfer CPUS RUNS".into()),
    }
}

/// A VM over `ram` and `cpus` bare vCPUs.
fn vm_with_vcpus(ram: &GuestRam, cpus: u8) -> Result<(kvm_ioctls::VmFd, Vec<VcpuFd>), String> {
    let (_kvm, vm) = kvm::create_vm(ram).map_err(|e| e.to_string())?;
    let vcpus = (0..cpus)
        .map(|i| vm.create_vcpu(u64::from(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    Ok((vm, vcpus))
}

/// Execs this binary as the next hop, keeping `ram` and `kept` open across.
fn execute(ram: &GuestRam, cpus: u64, left: u64, kept: &[RawFd]) -> Result<(), String> {
    let ram_fd = ram.file().as_raw_fd();
    for &fd in kept.iter().chain([&ram_fd]) {
        crate::cpr::fds::set_cloexec(fd, false).map_err(|e| format!("fd {fd}: {e}"))?;
    }
    let mem = ram.size().to_string();
    let mut args: Vec<String> = vec![
        "molt".into(),
        ARG.into(),
        "exec-hop".into(),
        cpus.to_string(),
        mem,
        left.to_string(),
        ram_fd.to_string(),
    ];
    let execed_at = args.len();
    args.push(String::new());
    args.extend(kept.iter().map(RawFd::to_string));
    args[execed_at] = now().to_string();
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL"))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let exe = c"/proc/self/exe";
    // SAFETY: exe and every argument are NUL-terminated and outlive the call;
    // ptrs is NULL-terminated. Returns only on failure.
    unsafe { libc::execv(exe.as_ptr(), ptrs.as_ptr()) };
    Err(format!("execve: {}", std::io::Error::last_os_error()))
}

/// KVM_GET_* then KVM_SET_* of every vCPU's and the VM's state, `runs` times.
fn transfer(cpus: u8, runs: u64) -> Result<(), String> {
    let kvm_err = |e: kvm::Error| e.to_string();
    let ram = GuestRam::create(16 << 20, None).map_err(|e| e.to_string())?;
    let host = kvm_ioctls::Kvm::new().map_err(|e| e.to_string())?;
    let supported = host_cpu::supported_cpuid(&host).map_err(|e| e.to_string())?;
    let spec = SaveSpec {
        msr_indices: host_cpu::msr_indices(&host).map_err(|e| e.to_string())?,
        xsave_words: host_cpu::xsave_words(&host),
    };
    let make = || -> Result<_, String> {
        let (_kvm, vm) = kvm::create_vm(&ram).map_err(kvm_err)?;
        // The serial IRQ's eventfd, as molt has: KVM_IRQFD on the VM.
        let _irq = kvm::irq_eventfd(&vm, crate::layout::SERIAL_IRQ).map_err(kvm_err)?;
        let vcpus = (0..cpus)
            .map(|i| vcpu::create(&supported, &vm, &ram.memory, i, cpus, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok((vm, vcpus))
    };
    let (from_vm, from) = make()?;
    let (to_vm, to) = make()?;
    // What molt's vCPU threads keep: KVM buffers, and the states' memory.
    let mut bufs = vcpu_state::Buffers::new(spec.xsave_words).map_err(|e| e.to_string())?;
    let mut states: Vec<_> = (0..cpus).map(|_| vcpu_state::blank()).collect();
    for _ in 0..runs {
        let t0 = now();
        let vm_state = kvm::save_vm(&from_vm).map_err(kvm_err)?;
        for ((fd, _), s) in from.iter().zip(&mut states) {
            vcpu_state::save(fd, &spec, &mut bufs, s).map_err(|e| e.to_string())?;
        }
        let t1 = now();
        kvm::restore_vm(&to_vm, &vm_state).map_err(kvm_err)?;
        for ((fd, set), s) in to.iter().zip(&states) {
            let cpuid_set = vcpu_state::cpuid_matches(&s.cpuid, set);
            vcpu_state::restore(fd, s, &mut bufs, cpuid_set).map_err(|e| e.to_string())?;
        }
        let t2 = now();
        println!("{} {}", (t1 - t0) / 1000, (t2 - t1) / 1000);
    }
    Ok(())
}
