//! argv: the only configuration molt has. Parsing (argh) and validation into a
//! `RunConfig` whose every field is known good.

use std::path::PathBuf;

use argh::FromArgs;

use crate::layout::MAX_VCPUS;

#[derive(FromArgs, Debug)]
/// molt: a tiny VMM built for live update.
pub struct Molt {
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunArgs),
    Ctl(CtlArgs),
}

#[derive(FromArgs, Debug)]
/// Boot a guest.
#[argh(subcommand, name = "run")]
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
    /// console: stdio, file:PATH or none (default stdio)
    #[argh(option, default = "SerialConfig::Stdio", from_str_fn(parse_serial))]
    pub serial: SerialConfig,
    /// create the control socket at this path
    #[argh(option)]
    pub control: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
/// Send one control line to a running molt and print the reply.
#[argh(subcommand, name = "ctl")]
pub struct CtlArgs {
    /// the control socket
    #[argh(positional)]
    pub socket: PathBuf,
    /// the command and its arguments
    #[argh(positional, greedy)]
    pub words: Vec<String>,
}

pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
pub const DEFAULT_MEM: u64 = 256 << 20;
/// Below this a Linux guest cannot even decompress itself; tiny guests fit easily.
pub const MIN_MEM: u64 = 16 << 20;

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
    }

    #[test]
    fn unknown_option_is_rejected() {
        assert!(parse(&["run", "--kernel", "k", "--frob"]).is_err());
    }
}
