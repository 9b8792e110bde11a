//! molt: a tiny, statically linked KVM VMM built for live update.
//!
//! `molt run` boots a guest (event_loop::run), `molt ctl` speaks the control
//! protocol to a running one. Exit status: 0 success or guest power-off/reset,
//! 1 failure, 2 usage error.

mod args;
mod boot;
mod bus;
mod control;
mod cpr;
mod creds;
mod devices;
mod event_loop;
mod files;
#[cfg(any(test, feature = "fuzz"))]
mod fuzz;
mod kexec;
mod layout;
mod pci;
mod phases;
mod ratelimit;
mod sync;
mod terminal;
mod vfio;
mod virtio;
mod vm;

use std::process::ExitCode;

use args::{Command, CtlArgs, KexecArgs, Molt, RunArgs};
use bus::GuestExit;
use event_loop::Outcome;

fn main() -> ExitCode {
    // An exec's pause goes on here: its `execve` phase ends now.
    phases::note_process_start();
    log::set_logger(&LOGGER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);
    let argv: Vec<String> = std::env::args().collect();
    let words: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    if words.first() == Some(&cpr::guardian::ARG) {
        return cpr::guardian::main(&argv[2..]);
    }
    #[cfg(feature = "fuzz")]
    if let ["__fuzz", target] = words[..] {
        // AFL++'s persistent mode: many inputs per process (scripts/fuzz.sh).
        // Quiet: the device targets' guests misbehave on purpose, all the time.
        log::set_max_level(log::LevelFilter::Off);
        if let Err(e) = fuzz::run(target, b"") {
            eprintln!("molt: {e}");
            return ExitCode::from(2);
        }
        let target = target.to_string();
        afl::fuzz!(|data: &[u8]| {
            let _ = fuzz::run(&target, data);
        });
        return ExitCode::SUCCESS;
    }
    if words.first() == Some(&vm::floor::ARG) {
        return match vm::floor::main(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("molt: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let molt = match <Molt as argh::FromArgs>::from_args(&["molt"], &words) {
        Ok(m) => m,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}", early.output);
                    ExitCode::from(2)
                }
            }
        }
    };
    match molt.command {
        Command::Run(a) => run(a),
        Command::Ctl(a) => ctl(a),
        Command::Kexec(a) => kexec(a),
        Command::Version(_) => {
            println!("{}", cpr::version_line());
            ExitCode::SUCCESS
        }
        Command::State(a) => match cpr::inspect::summary(&a.path) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("molt: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn kexec(a: KexecArgs) -> ExitCode {
    let kernel = match (a.exec_staged, a.kernel, a.load_only) {
        (true, None, false) => {
            let e = kexec::exec_staged();
            eprintln!("molt: {e}");
            return ExitCode::FAILURE;
        }
        (false, Some(k), _) => k,
        _ => {
            eprintln!("molt: kexec takes --kernel K, or --exec-staged alone");
            return ExitCode::from(2);
        }
    };
    let cmdline = match a.cmdline {
        Some(c) => c,
        None => std::fs::read_to_string("/proc/cmdline")
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default(),
    };
    match kexec::kexec(&kernel, a.initrd.as_deref(), &cmdline, !a.load_only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("molt: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> ExitCode {
    log::set_max_level(a.log_level.to_level_filter());
    let cfg = match a.validate(args::host_memory()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("molt: {e}");
            return ExitCode::from(2);
        }
    };
    match event_loop::run(cfg) {
        Ok(Outcome::Guest(GuestExit::PowerOff)) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Guest(GuestExit::Reset)) => {
            log::info!("guest reset");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Quit) | Ok(Outcome::Saved) | Ok(Outcome::Transferred) => ExitCode::SUCCESS,
        Ok(Outcome::Guest(GuestExit::Failed(why))) => {
            log::error!("guest stopped: {why}");
            ExitCode::FAILURE
        }
        Ok(Outcome::Signal(n)) => {
            log::warn!("terminated by signal {n}");
            ExitCode::FAILURE
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn ctl(a: CtlArgs) -> ExitCode {
    match a.words.first().map(String::as_str) {
        Some("events") if a.words.len() == 1 => return ctl_events(&a.socket),
        Some("wait") => return ctl_wait(&a.socket, &a.words[1..]),
        _ => {}
    }
    let line = a.words.join(" ");
    match control::request(&a.socket, &line) {
        Ok(reply) => {
            println!("{reply}");
            if reply.starts_with("ok") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("molt: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `molt ctl PATH events`: every line as it comes, until molt closes the
/// connection (success) or refuses (`error: ...`, failure).
fn ctl_events(socket: &std::path::Path) -> ExitCode {
    let mut refused = false;
    let mut first = true;
    let watched = control::watch(socket, None, |line| {
        println!("{line}");
        refused = first && !line.starts_with("ok");
        first = false;
        !refused
    });
    match watched {
        Ok(_) if refused => ExitCode::FAILURE,
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("molt: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `molt ctl PATH wait STATE [--timeout S]`: watches events until one (or
/// the `events` reply) says `state=STATE`, then prints `ok state=STATE`.
fn ctl_wait(socket: &std::path::Path, words: &[String]) -> ExitCode {
    let (want, timeout) = match control::parse_wait(words) {
        Ok(w) => w,
        Err(why) => {
            eprintln!("molt: {why}");
            return ExitCode::from(2);
        }
    };
    let start = std::time::Instant::now();
    let deadline = timeout.and_then(|t| start.checked_add(t));
    let mut state = String::from("unknown");
    let mut refused = None;
    let mut first = true;
    let watched = control::watch(socket, deadline, |line| {
        if std::mem::take(&mut first) && !line.starts_with("ok") {
            refused = Some(line.to_string());
            return false;
        }
        if let Some(s) = control::field(line, "state") {
            state = s.to_string();
        }
        state != want
    });
    let waited = start.elapsed().as_secs_f64();
    match watched {
        Ok(_) if refused.is_some() => {
            println!("{}", refused.unwrap_or_default());
            ExitCode::FAILURE
        }
        Ok(control::Watched::Stopped) => {
            println!("ok state={want}");
            ExitCode::SUCCESS
        }
        Ok(control::Watched::TimedOut) => {
            eprintln!(
                "molt: timed out after {waited:.1} s waiting for state={want}: \
                 the guest is state={state}"
            );
            ExitCode::FAILURE
        }
        Ok(control::Watched::Closed) => {
            eprintln!(
                "molt: {} closed the connection while waiting for state={want} \
                 (last state={state})",
                socket.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("molt: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines go to stderr, prefixed, so they never mix into a stdio console.
struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("molt: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }

    fn flush(&self) {}
}
