//! argv: the only configuration molt has. Parsing (argh) and validation into a
//! `RunConfig` whose every field is known good.

use std::path::PathBuf;

use argh::FromArgs;

use crate::layout::{MAX_DISKS, MAX_NICS, MAX_VCPUS, MAX_VFIO_DEVICES, MIN_MEM};
// `--disk` and `--net` parse straight into the devices' own configurations:
// argv depends on the devices, never the other way round.
pub use crate::vfio::Bdf;
pub use crate::virtio::block::DiskConfig;
pub use crate::virtio::net::{NetBackend, NetConfig};

pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
pub const DEFAULT_MEM: u64 = 256 << 20;

#[derive(FromArgs, Debug)]
/// molt: a tiny VMM built for live update.
#[argh(
    example = "Boot a guest with a control socket:\n$ molt run --kernel bzImage --mem 1G --control /run/molt.sock",
    example = "Exec mode: replace molt's binary in place, same PID:\n$ molt ctl /run/molt.sock cpr-exec /usr/local/bin/molt-new",
    example = "Transfer mode: hand the guest to a new process started beside it:\n$ molt-new run <the same arguments> --incoming unix:/run/molt.in &\n$ molt ctl /run/molt.sock cpr-transfer /run/molt.in",
    example = "Reboot mode: save, (kexec or reboot the host,) then start again:\n$ molt ctl /run/molt.sock cpr-save /run/molt.state\n$ molt run <the same arguments> --incoming file:/run/molt.state",
    example = "Reboot mode back to another release: the state is written in the newest format that binary reads:\n$ molt ctl /run/molt.sock cpr-save --for /usr/local/bin/molt-old /run/molt.state\n$ molt-old run <the same arguments> --incoming file:/run/molt.state"
)]
pub struct Molt {
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunArgs),
    Ctl(CtlArgs),
    Kexec(KexecArgs),
    State(StateArgs),
    Version(VersionArgs),
}

#[derive(FromArgs, Debug)]
/// Print the version and the state formats this binary reads (cpr-exec checks
/// a new binary with it before handing the guest over).
#[argh(subcommand, name = "version")]
pub struct VersionArgs {}

#[derive(FromArgs, Debug)]
/// Boot another host kernel in place (kexec_file_load + reboot).
#[argh(subcommand, name = "kexec")]
pub struct KexecArgs {
    /// the kernel to boot (not with --exec-staged)
    #[argh(option)]
    pub kernel: Option<PathBuf>,
    /// its initramfs
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// its command line (default: this kernel's, from /proc/cmdline)
    #[argh(option)]
    pub cmdline: Option<String>,
    /// stage the kernel but do not reboot into it
    #[argh(switch)]
    pub load_only: bool,
    /// reboot into the kernel staged earlier with --load-only (keeps the load
    /// out of the guest's pause)
    #[argh(switch)]
    pub exec_staged: bool,
}

#[derive(FromArgs, Debug)]
/// Decode a saved state and print a summary.
#[argh(subcommand, name = "state")]
pub struct StateArgs {
    /// the state file
    #[argh(positional)]
    pub path: PathBuf,
}

#[derive(FromArgs, Debug)]
/// Boot a guest.
#[argh(
    subcommand,
    name = "run",
    example = "A guest with a disk, a NIC on a tap and a control socket:\n$ molt run --kernel bzImage --initrd initrd.img --cpus 2 --mem 1G --disk root.img --net tap=tap0 --control /run/molt.sock",
    example = "Exec mode keeps these arguments: nothing to give again.\n$ molt ctl /run/molt.sock cpr-exec",
    example = "Transfer mode: the new process takes the same arguments plus --incoming:\n$ molt run <the same arguments> --incoming unix:/run/molt.in",
    example = "Reboot mode, RAM kept in a tmpfs file across the restart:\n$ molt run <args> --mem-file /dev/shm/guest.ram --control /run/molt.sock\n$ molt ctl /run/molt.sock cpr-save /run/molt.state\n$ molt run <args> --mem-file /dev/shm/guest.ram --control /run/molt.sock --incoming file:/run/molt.state"
)]
pub struct RunArgs {
    /// kernel image: a bzImage, or an ELF vmlinux with a PVH entry
    #[argh(option)]
    pub kernel: PathBuf,
    /// initial ramdisk
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// kernel command line (default: "console=ttyS0")
    #[argh(option, default = "String::from(DEFAULT_CMDLINE)")]
    pub cmdline: String,
    /// number of vCPUs, 1 to 32 (default 1)
    #[argh(option, default = "1")]
    pub cpus: u32,
    /// guest RAM size, bytes or with a K/M/G suffix (default 256M)
    #[argh(option, default = "DEFAULT_MEM", from_str_fn(parse_size))]
    pub mem: u64,
    /// back guest RAM with this shared file instead of a memfd
    #[argh(option)]
    pub mem_file: Option<PathBuf>,
    /// console: stdio (a terminal is raw until the guest ends, across updates), file:PATH or none (default stdio)
    #[argh(option, default = "SerialConfig::Stdio", from_str_fn(parse_serial))]
    pub serial: SerialConfig,
    /// create the control socket at this path
    #[argh(option)]
    pub control: Option<PathBuf>,
    /// virtio-blk disk: PATH[,ro] (raw image); repeatable
    #[argh(option, from_str_fn(parse_disk))]
    pub disk: Vec<DiskConfig>,
    /// virtio-net NIC: tap=NAME[,mac=MAC] or fd=N[,mac=MAC]; repeatable
    #[argh(option, from_str_fn(parse_net))]
    pub net: Vec<NetConfig>,
    /// pass a host PCI device bound to vfio-pci through to the guest:
    /// DOMAIN:BUS:DEVICE.FUNCTION (e.g. 0000:00:04.0); repeatable
    #[argh(option)]
    pub vfio: Vec<Bdf>,
    /// resume a guest instead of booting: file:PATH (reboot mode), unix:PATH
    /// (take it over from a running molt), fd:N (set by cpr-exec)
    #[argh(option, from_str_fn(parse_incoming))]
    pub incoming: Option<Incoming>,
    /// log lines shown: error, warn, info, debug or trace (default info)
    #[argh(option, default = "log::Level::Info", from_str_fn(parse_log_level))]
    pub log_level: log::Level,
}

#[derive(FromArgs, Debug)]
/// Send one control line to a running molt and print the reply. `events`
/// prints a line per event until molt closes the connection; `wait STATE
/// [--timeout S]` returns once the guest is in STATE (running, paused,
/// suspended, off).
#[argh(subcommand, name = "ctl")]
pub struct CtlArgs {
    /// the control socket
    #[argh(positional)]
    pub socket: PathBuf,
    /// the command and its arguments
    #[argh(positional, greedy)]
    pub words: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    Stdio,
    File(PathBuf),
    None,
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(format!("expected stdio, file:PATH or none, got '{s}'")),
        },
    }
}

fn parse_log_level(s: &str) -> Result<log::Level, String> {
    match s {
        "error" => Ok(log::Level::Error),
        "warn" => Ok(log::Level::Warn),
        "info" => Ok(log::Level::Info),
        "debug" => Ok(log::Level::Debug),
        "trace" => Ok(log::Level::Trace),
        _ => Err(format!(
            "expected error, warn, info, debug or trace, got '{s}'"
        )),
    }
}

/// Where `--incoming` takes the saved state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    File(PathBuf),
    /// Exec mode: the sealed memfd holding the state (set by the old image).
    Fd(i32),
    /// Transfer mode: listen here for the running molt to hand over.
    Unix(PathBuf),
}

fn parse_incoming(s: &str) -> Result<Incoming, String> {
    match s.split_once(':') {
        Some(("file", p)) if !p.is_empty() => Ok(Incoming::File(PathBuf::from(p))),
        Some(("fd", n)) => n
            .parse::<i32>()
            .ok()
            .filter(|&fd| fd > 2)
            .map(Incoming::Fd)
            .ok_or_else(|| format!("'{n}' is not a descriptor number above 2")),
        Some(("unix", p)) if !p.is_empty() => Ok(Incoming::Unix(PathBuf::from(p))),
        _ => Err(format!("expected file:PATH, fd:N or unix:PATH, got '{s}'")),
    }
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (expected ro)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("expected PATH[,ro]".into());
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut backend = None;
    let mut mac = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && name.len() <= MAX_IFNAME => {
                backend = Some(NetBackend::Tap(name.to_string()))
            }
            Some(("tap", name)) => {
                return Err(format!("tap name '{name}' must be 1 to {MAX_IFNAME} bytes"))
            }
            Some(("fd", n)) => {
                let fd = n
                    .parse::<i32>()
                    .ok()
                    .filter(|&fd| fd >= 0)
                    .ok_or_else(|| format!("fd '{n}' is not a descriptor number"))?;
                backend = Some(NetBackend::Fd(fd));
            }
            Some(("mac", m)) => mac = Some(parse_mac(m)?),
            _ => return Err(format!("unknown net option '{part}'")),
        }
    }
    let backend = backend.ok_or("expected tap=NAME or fd=N")?;
    Ok(NetConfig { backend, mac })
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{s}' is not a MAC address (xx:xx:xx:xx:xx:xx)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 == 1 {
        return Err(format!("'{s}' is a multicast address"));
    }
    Ok(mac)
}

/// Parses `1234`, `64K`, `256M`, `2G` (powers of 1024; a trailing `B`/`iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (use bytes or K/M/G suffixes)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A usage error: argv names something impossible. Exit status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated `molt run` configuration.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_size: u64,
    pub mem_file: Option<PathBuf>,
    pub serial: SerialConfig,
    pub control: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vfio: Vec<Bdf>,
    pub incoming: Option<Incoming>,
}

impl RunArgs {
    /// Checks ranges against each other and against this host.
    pub fn validate(self, host_mem: u64) -> Result<RunConfig, UsageError> {
        if self.cpus == 0 || self.cpus as usize > MAX_VCPUS {
            return Err(UsageError(format!(
                "--cpus {}: must be between 1 and {MAX_VCPUS}",
                self.cpus
            )));
        }
        if self.mem < MIN_MEM {
            return Err(UsageError(format!(
                "--mem {}: must be at least {} MiB",
                self.mem,
                MIN_MEM >> 20
            )));
        }
        if !self.mem.is_multiple_of(4096) {
            return Err(UsageError(format!(
                "--mem {}: must be a multiple of 4 KiB",
                self.mem
            )));
        }
        if self.disk.len() > MAX_DISKS {
            return Err(UsageError(format!(
                "--disk given {} times: at most {MAX_DISKS} disks",
                self.disk.len()
            )));
        }
        if self.net.len() > MAX_NICS {
            return Err(UsageError(format!(
                "--net given {} times: at most {MAX_NICS} NICs",
                self.net.len()
            )));
        }
        for (i, n) in self.net.iter().enumerate() {
            if let NetBackend::Fd(fd @ 0..=2) = n.backend {
                return Err(UsageError(format!(
                    "--net fd={fd}: descriptors 0-2 are stdin, stdout and stderr"
                )));
            }
            if self.net[..i].iter().any(|m| m.backend == n.backend) {
                return Err(UsageError(format!(
                    "--net {:?} given twice: each NIC needs its own tap",
                    n.backend
                )));
            }
        }
        if self.vfio.len() > MAX_VFIO_DEVICES {
            return Err(UsageError(format!(
                "--vfio given {} times: at most {MAX_VFIO_DEVICES} devices",
                self.vfio.len()
            )));
        }
        for (i, d) in self.vfio.iter().enumerate() {
            if self.vfio[..i].contains(d) {
                return Err(UsageError(format!("--vfio {d} given twice")));
            }
        }
        if self.mem > host_mem {
            return Err(UsageError(format!(
                "--mem {}: more than this host's memory ({host_mem} bytes)",
                self.mem
            )));
        }
        Ok(RunConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            vcpus: self.cpus as u8,
            mem_size: self.mem,
            mem_file: self.mem_file,
            serial: self.serial,
            control: self.control,
            disks: self.disk,
            nets: self.net,
            vfio: self.vfio,
            incoming: self.incoming,
        })
    }
}

/// Physical RAM of this host, in bytes.
pub fn host_memory() -> u64 {
    // SAFETY: sysinfo only writes into the struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        match Molt::from_args(&["molt"], args) {
            Ok(Molt {
                command: Command::Run(r),
            }) => Ok(r),
            Ok(_) => Err("not run".into()),
            Err(e) => Err(e.output),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn defaults() {
        let r = parse(&["run", "--kernel", "k"]).unwrap();
        let c = r.validate(u64::MAX).unwrap();
        assert_eq!((c.vcpus, c.mem_size), (1, 256 << 20));
        assert_eq!(c.serial, SerialConfig::Stdio);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn serial_forms() {
        assert_eq!(parse_serial("none"), Ok(SerialConfig::None));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn ranges_are_checked() {
        let v = |a: &[&str]| {
            parse(a)
                .unwrap()
                .validate(1 << 30)
                .map(|_| ())
                .unwrap_err()
                .0
        };
        assert!(v(&["run", "--kernel", "k", "--cpus", "0"]).contains("--cpus"));
        assert!(v(&["run", "--kernel", "k", "--cpus", "33"]).contains("--cpus"));
        assert!(v(&["run", "--kernel", "k", "--mem", "0"]).contains("--mem"));
        assert!(v(&["run", "--kernel", "k", "--mem", "2G"]).contains("host"));
        assert!(v(&["run", "--kernel", "k", "--mem", "20000001"]).contains("4 KiB"));
        let tap = format!("tap={}", "t".repeat(MAX_IFNAME + 1));
        assert!(parse(&["run", "--kernel", "k", "--net", &tap]).is_err());
    }

    /// Each repeatable option is bounded (README, "Resource bounds"): one past
    /// the limit is refused, naming the option and the limit; the limit is not.
    #[test]
    fn repeatable_options_are_bounded() {
        let v = |a: &[String]| {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            parse(&a).unwrap().validate(1 << 40).map(|_| ())
        };
        let with = |option: &str, n: usize, value: &dyn Fn(usize) -> String| {
            let mut a: Vec<String> = ["run", "--kernel", "k"].map(String::from).to_vec();
            for i in 0..n {
                a.extend([option.to_string(), value(i)]);
            }
            a
        };
        let disk = |i: usize| format!("d{i}.img");
        let net = |i: usize| format!("tap=t{i}");
        let vfio = |i: usize| format!("0000:00:{:02x}.0", i + 4);
        for (option, max, value) in [
            ("--disk", MAX_DISKS, &disk as &dyn Fn(usize) -> String),
            ("--net", MAX_NICS, &net),
            ("--vfio", MAX_VFIO_DEVICES, &vfio),
        ] {
            assert!(v(&with(option, max, value)).is_ok(), "{option} x {max}");
            let err = v(&with(option, max + 1, value)).unwrap_err().0;
            assert!(
                err.contains(option) && err.contains(&format!("at most {max}")),
                "{option} x {}: {err}",
                max + 1
            );
        }
    }

    #[test]
    fn disk_forms() {
        assert_eq!(
            parse_disk("/a/b.img,ro"),
            Ok(DiskConfig {
                path: "/a/b.img".into(),
                read_only: true
            })
        );
        assert!(!parse_disk("x.img").unwrap().read_only);
        assert!(parse_disk("x.img,wat").is_err());
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn net_forms() {
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_net("fd=7").unwrap().backend, NetBackend::Fd(7));
        assert!(parse_net("fd=-1").is_err());
        assert!(parse_net("tap=").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("tap=t,mac=52:54:00:12:34").is_err());
        assert!(parse_net("tap=t,speed=10").is_err());
    }

    #[test]
    fn log_levels() {
        let r = parse(&["run", "--kernel", "k"]).unwrap();
        assert_eq!(r.log_level, log::Level::Info);
        assert_eq!(parse_log_level("debug"), Ok(log::Level::Debug));
        assert!(parse_log_level("off").is_err());
        assert!(parse_log_level("DEBUG").is_err());
        assert!(parse(&["run", "--kernel", "k", "--log-level", "loud"])
            .unwrap_err()
            .contains("--log-level"));
    }

    #[test]
    fn incoming_forms() {
        assert_eq!(
            parse_incoming("file:/run/s"),
            Ok(Incoming::File("/run/s".into()))
        );
        assert!(parse_incoming("file:").is_err());
        assert_eq!(parse_incoming("fd:7"), Ok(Incoming::Fd(7)));
        assert!(parse_incoming("fd:1").is_err());
        assert_eq!(parse_incoming("unix:/x"), Ok(Incoming::Unix("/x".into())));
        assert!(parse_incoming("unix:").is_err());
        assert!(parse_incoming("/run/s").is_err());
    }

    #[test]
    fn nics_need_their_own_taps() {
        let v = |a: &[&str]| {
            parse(a)
                .unwrap()
                .validate(1 << 40)
                .map(|_| ())
                .unwrap_err()
                .0
        };
        assert!(v(&["run", "--kernel", "k", "--net", "fd=1"]).contains("stdout"));
        let twice = v(&["run", "--kernel", "k", "--net", "tap=a", "--net", "tap=a"]);
        assert!(twice.contains("twice"));
        assert!(
            parse(&["run", "--kernel", "k", "--net", "tap=a", "--net", "fd=5"])
                .unwrap()
                .validate(1 << 40)
                .is_ok()
        );
    }

    #[test]
    fn vfio_devices_are_checked() {
        let v = |a: &[&str]| parse(a).map(|r| r.validate(1 << 40).map(|c| c.vfio));
        let two = v(&[
            "run",
            "--kernel",
            "k",
            "--vfio",
            "0000:00:04.0",
            "--vfio",
            "01:00.1",
        ]);
        let two: Vec<String> = two.unwrap().unwrap().iter().map(Bdf::to_string).collect();
        assert_eq!(two, ["0000:00:04.0", "0000:01:00.1"]);
        let bad = v(&["run", "--kernel", "k", "--vfio", "00:04"]).unwrap_err();
        assert!(
            bad.contains("--vfio") && bad.contains("not a PCI address"),
            "{bad}"
        );
        let refused = |a: &[&str]| v(a).unwrap().unwrap_err().0;
        let twice = refused(&[
            "run",
            "--kernel",
            "k",
            "--vfio",
            "00:04.0",
            "--vfio",
            "0000:00:04.0",
        ]);
        assert_eq!(twice, "--vfio 0000:00:04.0 given twice");
        let mut five = vec!["run", "--kernel", "k"];
        let addrs = ["00:01.0", "00:02.0", "00:03.0", "00:04.0", "00:05.0"];
        for a in &addrs {
            five.extend(["--vfio", a]);
        }
        assert!(refused(&five).contains("at most 4"));
        // Every CPR mode takes them: reboot mode's restart opens them afresh,
        // exec and transfer carry them open.
        for incoming in ["file:/run/state", "fd:5", "unix:/tmp/in.sock"] {
            let cfg = v(&[
                "run",
                "--kernel",
                "k",
                "--vfio",
                "00:04.0",
                "--incoming",
                incoming,
            ]);
            assert_eq!(
                cfg.unwrap().unwrap()[0].to_string(),
                "0000:00:04.0",
                "{incoming}"
            );
        }
    }

    #[test]
    fn unknown_option_is_rejected() {
        assert!(parse(&["run", "--kernel", "k", "--frob"]).is_err());
    }
}
