//! Signal names, how a rank ended ([`Termination`]), and the exit codes
//! derived from both.

use std::borrow::Cow;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The signals shampoo-run catches and forwards to every rank's process group.
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Conventional name of a signal number, e.g. `SIGKILL` for 9.
///
/// Real-time signals are named `SIGRTMIN+n`; unknown numbers `signal N`.
pub fn signal_name(signal: i32) -> Cow<'static, str> {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGSYS => "SIGSYS",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGSTKFLT => "SIGSTKFLT",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGPWR => "SIGPWR",
        _ => return other_signal_name(signal),
    };
    Cow::Borrowed(name)
}

#[cfg(target_os = "linux")]
fn other_signal_name(signal: i32) -> Cow<'static, str> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if (min..=max).contains(&signal) {
        return Cow::Owned(format!("SIGRTMIN+{}", signal - min));
    }
    Cow::Owned(format!("signal {signal}"))
}

#[cfg(not(target_os = "linux"))]
fn other_signal_name(signal: i32) -> Cow<'static, str> {
    Cow::Owned(format!("signal {signal}"))
}

/// Exit code a shell reports for a process killed by `signal`: 128 + signal.
pub fn signal_exit_code(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(u8::MAX)
}

/// How a rank's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It called `exit` with this code.
    Exited(i32),
    /// It was killed by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether the kernel wrote a core dump.
        core_dumped: bool,
    },
}

impl Termination {
    /// Classifies a wait status.
    pub fn from_status(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            Termination::Exited(code)
        } else if let Some(signal) = status.signal() {
            Termination::Signaled {
                signal,
                core_dumped: status.core_dumped(),
            }
        } else {
            // wait() only reports exits and deaths by signal; keep a failure
            // rather than inventing a success.
            Termination::Exited(255)
        }
    }

    /// Whether this counts as success (exit code 0).
    pub fn success(&self) -> bool {
        matches!(self, Termination::Exited(0))
    }

    /// The exit code shampoo-run passes on: the code itself, or 128 + signal.
    pub fn exit_code(&self) -> u8 {
        match *self {
            Termination::Exited(code) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
            Termination::Signaled { signal, .. } => signal_exit_code(signal),
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Termination::Exited(code) => write!(f, "exited with code {code}"),
            Termination::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "was killed by signal {}", signal_name(signal))?;
                if core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_signals_have_their_usual_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(2), "SIGINT");
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(1000), "signal 1000");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn realtime_signals_are_named_relative_to_sigrtmin() {
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Termination::Exited(3).exit_code(), 3);
        assert_eq!(Termination::Exited(0).exit_code(), 0);
        let killed = Termination::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false,
        };
        assert_eq!(killed.exit_code(), 137);
        assert_eq!(signal_exit_code(libc::SIGINT), 130);
        assert_eq!(signal_exit_code(libc::SIGTERM), 143);
    }

    #[test]
    fn wait_statuses_are_classified() {
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        assert_eq!(
            Termination::from_status(ExitStatus::from_raw(3 << 8)),
            Termination::Exited(3)
        );
        assert!(Termination::from_status(ExitStatus::from_raw(0)).success());
        let segv = Termination::from_status(ExitStatus::from_raw(libc::SIGSEGV | 0x80));
        assert_eq!(
            segv,
            Termination::Signaled {
                signal: libc::SIGSEGV,
                core_dumped: true
            }
        );
        assert_eq!(
            segv.to_string(),
            "was killed by signal SIGSEGV (core dumped)"
        );
        assert_eq!(Termination::Exited(3).to_string(), "exited with code 3");
    }
}
