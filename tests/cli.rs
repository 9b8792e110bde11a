//! Bad argv and the top-level usage of the `molt` binary (SPEC.md "One binary,
//! configured by argv": errors name the argument and the reason, exit status 2 for
//! usage, 1 for failure), and the `--mem-file` and `--serial file:` paths molt
//! refuses (SPEC.md "Files molt creates": no symlinks, nothing other users may
//! read or write; new files are mode 0600).
//!
//! Pure argv errors need no KVM: molt must reject them before touching `/dev/kvm`.
//! The tests about the kernel file and about memory beyond the host's need KVM
//! (molt may open `/dev/kvm` before it reads the kernel or maps RAM) and are
//! guarded like the direct tests. Every run that should fail is given the exit
//! guest as its kernel, so a molt that wrongly accepts the arguments powers off at
//! once (status 0, failing the test) instead of hanging it.

mod common;

use common::guest::{exit_guest, write_guest, ExitKind};
use common::{
    assert_static, kvm_available, molt, run_with_timeout, write_private, TempDir, MOLT, TIMEOUT,
};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temp dir with a valid, immediately powering-off kernel in it.
fn with_kernel(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let kernel = write_guest(dir.path(), "poweroff.elf", &exit_guest(ExitKind::PowerOff));
    (dir, kernel)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts the exit code and that stderr contains every one of `needles`
/// (case-insensitively).
fn assert_fails(out: &Output, code: i32, needles: &[&str], what: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: want exit status {code}, got {}; stdout {stdout:?}; stderr {stderr:?}",
        out.status
    );
    let lower = stderr.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{what}: stderr should mention {needle:?}; stderr {stderr:?}"
        );
    }
}

/// `molt run --kernel KERNEL --serial none ARGS...`
fn run_with(kernel: &Path, args: &[&str]) -> Output {
    let mut argv = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        "none",
    ];
    argv.extend_from_slice(args);
    molt(&argv)
}

/// molt ships as one file dropped into initramfs images: the build under test
/// (musl, or glibc with crt-static where the musl target is missing) must need
/// no loader and no shared library.
#[test]
fn the_binary_is_statically_linked() {
    assert_static(Path::new(MOLT));
}

/// `molt --help` and `molt run --help` show how each CPR mode is started.
#[test]
fn help_shows_an_example_of_each_live_update_mode() {
    for args in [&["--help"][..], &["run", "--help"]] {
        let out = molt(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "molt {args:?}: {}", out.status);
        let examples = text.split("Examples:").nth(1).unwrap_or_else(|| {
            panic!("molt {args:?} shows no examples:\n{text}");
        });
        for shown in [
            "cpr-exec",
            "--incoming unix:",
            "cpr-save",
            "--incoming file:",
        ] {
            assert!(
                examples.contains(shown),
                "molt {args:?}: no example with {shown}:\n{text}"
            );
        }
    }
}

#[test]
fn missing_kernel_file_is_a_failure_naming_the_path() {
    if !kvm_available("missing_kernel_file_is_a_failure_naming_the_path") {
        return;
    }
    let dir = TempDir::new("nokernel");
    let missing = dir.join("no-such-kernel.elf");
    let out = run_with(&missing, &[]);
    assert_fails(&out, 1, &[missing.to_str().unwrap()], "missing kernel");
}

#[test]
fn text_file_is_not_a_kernel() {
    if !kvm_available("text_file_is_not_a_kernel") {
        return;
    }
    let dir = TempDir::new("notkernel");
    let junk = write_guest(
        dir.path(),
        "junk.txt",
        "this is not a kernel, just one hundred bytes of text to be refused. "
            .repeat(2)
            .as_bytes()
            .get(..100)
            .unwrap(),
    );
    let out = run_with(&junk, &[]);
    assert_fails(&out, 1, &[], "text as kernel");
    let stderr = text(&out).1;
    assert!(
        stderr.contains(junk.to_str().unwrap()) || stderr.to_lowercase().contains("kernel"),
        "stderr should name the file or say it is not a kernel: {stderr:?}"
    );
}

#[test]
fn cpus_out_of_range_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("cpus");
    for n in ["0", "33"] {
        let out = run_with(&kernel, &["--cpus", n]);
        assert_fails(&out, 2, &["--cpus"], &format!("--cpus {n}"));
    }
}

#[test]
fn cpus_not_a_number_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("cpusnan");
    let out = run_with(&kernel, &["--cpus", "four"]);
    assert_fails(&out, 2, &["--cpus"], "--cpus four");
}

#[test]
fn mem_zero_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("mem0");
    let out = run_with(&kernel, &["--mem", "0"]);
    assert_fails(&out, 2, &["--mem"], "--mem 0");
}

#[test]
fn mem_bad_suffix_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("memsfx");
    let out = run_with(&kernel, &["--mem", "64Q"]);
    assert_fails(&out, 2, &["--mem"], "--mem 64Q");
}

#[test]
fn mem_beyond_host_memory_is_refused() {
    if !kvm_available("mem_beyond_host_memory_is_refused") {
        return;
    }
    let (_dir, kernel) = with_kernel("membig");
    let out = run_with(&kernel, &["--mem", "100000G"]);
    let (stdout, stderr) = text(&out);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "--mem 100000G: want exit status 1 or 2, got {}; stdout {stdout:?}; stderr {stderr:?}",
        out.status
    );
    assert!(
        stderr.contains("--mem") && stderr.to_lowercase().contains("memory"),
        "--mem 100000G: stderr should name --mem and say memory: {stderr:?}"
    );
}

#[test]
fn unknown_option_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("frob");
    let out = run_with(&kernel, &["--frob"]);
    assert_fails(&out, 2, &["--frob"], "--frob");
}

#[test]
fn serial_bad_value_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("serial");
    let out = molt(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        "telepathy",
    ]);
    assert_fails(&out, 2, &["--serial"], "--serial telepathy");
}

#[test]
fn log_level_bad_value_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("loglevel");
    let out = run_with(&kernel, &["--log-level", "loud"]);
    assert_fails(&out, 2, &["--log-level", "loud"], "--log-level loud");
}

#[test]
fn log_level_hides_less_severe_lines() {
    if !kvm_available("log_level_hides_less_severe_lines") {
        return;
    }
    let (_dir, kernel) = with_kernel("loglevelwarn");
    for (args, shown) in [(&[][..], true), (&["--log-level", "warn"][..], false)] {
        let out = run_with(&kernel, args);
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{args:?}: {stderr:?}");
        assert_eq!(
            stderr.contains("molt: info: guest powered off"),
            shown,
            "{args:?}: stderr {stderr:?}"
        );
    }
}

#[test]
fn vfio_bad_address_is_a_usage_error() {
    let (_dir, kernel) = with_kernel("vfioaddr");
    let out = run_with(&kernel, &["--vfio", "00:04"]);
    assert_fails(
        &out,
        2,
        &["--vfio", "not a PCI address", "0000:00:04.0"],
        "--vfio 00:04",
    );
}

/// A device that cannot be passed through is refused at start, naming it and
/// the reason, before /dev/kvm is opened: here one that does not exist, and
/// one of this host's own PCI devices bound to its driver (if it has one).
#[test]
fn vfio_device_that_cannot_be_opened_is_refused_naming_why() {
    let (_dir, kernel) = with_kernel("vfionodev");
    let out = run_with(&kernel, &["--vfio", "0000:ff:1f.7"]);
    assert_fails(
        &out,
        1,
        &["VFIO device 0000:ff:1f.7: no such PCI device"],
        "absent device",
    );
    let bound = fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let driver = fs::read_link(e.path().join("driver")).ok()?;
            let driver = driver.file_name()?.to_string_lossy().into_owned();
            (driver != "vfio-pci").then(|| (e.file_name().to_string_lossy().into_owned(), driver))
        });
    let Some((bdf, driver)) = bound else {
        eprintln!("no PCI device bound to a driver on this host: the second case is not run");
        return;
    };
    let out = run_with(&kernel, &["--vfio", &bdf]);
    let why = format!("VFIO device {bdf}: is bound to {driver}, not vfio-pci");
    assert_fails(
        &out,
        1,
        &[&why, "/sys/bus/pci/drivers/vfio-pci/new_id"],
        "bound device",
    );
}

#[test]
fn run_without_kernel_is_a_usage_error() {
    let out = molt(&["run", "--serial", "none"]);
    assert_fails(&out, 2, &["--kernel"], "run without --kernel");
}

#[test]
fn ctl_to_missing_socket_is_a_failure_naming_the_path() {
    let out = molt(&["ctl", "/nonexistent/sock", "status"]);
    assert_fails(&out, 1, &["/nonexistent/sock"], "ctl /nonexistent/sock");
}

#[test]
fn no_arguments_is_a_usage_error_listing_the_commands() {
    let out = molt(&[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "molt with no arguments: want exit status 2; stdout {stdout:?}; stderr {stderr:?}"
    );
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("run") && all.contains("ctl"),
        "molt with no arguments should list its commands: {all:?}"
    );
}

#[test]
fn unknown_command_is_a_usage_error() {
    let out = molt(&["frobnicate"]);
    assert_fails(&out, 2, &["frobnicate"], "molt frobnicate");
}

/// `molt version` lists every state format the binary reads (the exec probe
/// and upgrade scripts rely on it): this release writes 2 and still reads 1.
#[test]
fn version_lists_the_state_formats_it_reads() {
    let out = molt(&["version"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "molt version: {stderr}");
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{stdout:?}");
    assert_eq!(words[0], "molt");
    assert_eq!(words[2], "state-formats=1,2,3,4,5", "{stdout:?}");
}

#[test]
fn help_exits_0_and_lists_the_commands() {
    let out = molt(&["--help"]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "molt --help: want status 0, got {}; stderr {stderr:?}",
        out.status
    );
    for command in ["run", "ctl"] {
        assert!(
            stdout.contains(command),
            "molt --help should list `{command}`: {stdout:?}"
        );
    }
}

#[test]
fn run_help_exits_0_and_lists_the_options() {
    let out = molt(&["run", "--help"]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "molt run --help: want status 0, got {}; stderr {stderr:?}",
        out.status
    );
    for option in ["--kernel", "--cpus", "--mem", "--serial", "--control"] {
        assert!(
            stdout.contains(option),
            "molt run --help should list {option}: {stdout:?}"
        );
    }
}

/// A file with `bytes` and mode `mode`, for molt to refuse.
fn file_with_mode(path: &Path, bytes: &[u8], mode: u32) {
    write_private(path, bytes);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `path` still holds exactly `bytes`.
fn assert_untouched(path: &Path, bytes: &[u8], what: &str) {
    let now = fs::read(path).expect("read");
    assert!(
        now == bytes,
        "{what}: {} changed ({} bytes, {} before)",
        path.display(),
        now.len(),
        bytes.len()
    );
}

/// The two files `molt run` writes to by path, as named in its errors.
const FILE_OPTIONS: [&str; 2] = ["--mem-file", "--serial file"];

/// `molt run` on the power-off guest with its RAM (`--mem-file`) or its console
/// (`--serial file`) at `path`.
fn run_with_file(kernel: &Path, option: &str, path: &Path) -> Output {
    let path = path.to_str().unwrap();
    match option {
        "--mem-file" => run_with(kernel, &["--mem", "16M", "--mem-file", path]),
        _ => molt(&[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            &format!("file:{path}"),
        ]),
    }
}

#[test]
fn mem_file_or_serial_file_behind_a_symlink_is_refused_and_its_target_untouched() {
    if !kvm_available(
        "mem_file_or_serial_file_behind_a_symlink_is_refused_and_its_target_untouched",
    ) {
        return;
    }
    let (dir, kernel) = with_kernel("filelink");
    for (i, option) in FILE_OPTIONS.into_iter().enumerate() {
        // A link planted where molt is told to write: following it would grow
        // (and map into the guest) or append to a file molt was not given.
        let victim = dir.join(&format!("victim{i}"));
        write_private(&victim, b"victim\n");
        let link = dir.join(&format!("link{i}"));
        symlink(&victim, &link).expect("symlink");
        let out = run_with_file(&kernel, option, &link);
        let what = format!("{option} symlink");
        assert_fails(
            &out,
            1,
            &[option, link.to_str().unwrap(), "is a symbolic link"],
            &what,
        );
        assert_untouched(&victim, b"victim\n", &what);
    }
}

#[test]
fn mem_file_or_serial_file_other_users_may_read_is_refused() {
    if !kvm_available("mem_file_or_serial_file_other_users_may_read_is_refused") {
        return;
    }
    let (dir, kernel) = with_kernel("filemode");
    for (i, option) in FILE_OPTIONS.into_iter().enumerate() {
        let path = dir.join(&format!("file{i}"));
        file_with_mode(&path, b"earlier\n", 0o644);
        let out = run_with_file(&kernel, option, &path);
        let what = format!("{option} mode 0644");
        assert_fails(
            &out,
            1,
            &[
                option,
                path.to_str().unwrap(),
                "is readable by other users (mode 0644): chmod 600 it",
            ],
            &what,
        );
        assert_untouched(&path, b"earlier\n", &what);
    }
}

#[test]
fn new_mem_file_and_serial_file_are_0600_under_umask_022() {
    if !kvm_available("new_mem_file_and_serial_file_are_0600_under_umask_022") {
        return;
    }
    let (dir, kernel) = with_kernel("newmode");
    let ram = dir.join("ram");
    let log = dir.join("console.log");
    // umask 022 is the usual one, with which a plain create makes mode 0644.
    let out = run_with_timeout(
        Command::new("sh").args([
            "-c",
            "umask 022 && exec \"$0\" \"$@\"",
            MOLT,
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "16M",
            "--mem-file",
            ram.to_str().unwrap(),
            "--serial",
            &format!("file:{}", log.display()),
        ]),
        TIMEOUT,
    );
    let (_, stderr) = text(&out);
    assert!(
        out.status.success(),
        "the power-off guest should exit 0, got {}; stderr {stderr:?}",
        out.status
    );
    for path in [&ram, &log] {
        let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "{} was created with mode {:o}",
            path.display(),
            meta.permissions().mode() & 0o7777
        );
    }
    assert_eq!(
        fs::metadata(&ram).unwrap().len(),
        16 << 20,
        "--mem-file size"
    );
}
