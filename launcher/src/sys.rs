//! Thin, safe wrappers over the few POSIX/Linux calls the launcher needs.
//!
//! Every `unsafe` block of the crate lives in this module.

use std::io;
use std::process::Command;

/// Sends `signal` to every process in the process group `pgid`.
///
/// Returns `Ok(true)` if the group existed (the signal was sent to at least one
/// process), `Ok(false)` if it has no members left (`ESRCH`).
pub(crate) fn signal_group(pgid: u32, signal: i32) -> io::Result<bool> {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    if pgid <= 1 {
        // killpg(0) would signal our own group and killpg(1) is never a rank;
        // refuse rather than risk signalling the wrong processes.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: killpg has no memory-safety preconditions; pgid > 1 so it only
    // targets the process group whose leader was one of our ranks.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc == 0 {
        Ok(true)
    } else {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(err)
        }
    }
}

/// Whether the process group `pgid` still has a member that is not a zombie.
///
/// `kill(-pgid, 0)` alone also counts zombies (orphaned grandchildren that
/// init has not reaped yet, common in containers), so on Linux a positive
/// answer is confirmed by scanning `/proc`.
pub(crate) fn group_has_live_members(pgid: u32) -> bool {
    match signal_group(pgid, 0) {
        Ok(false) => false,
        // EPERM: a member exists that we may not signal; treat it as alive.
        Ok(true) | Err(_) => live_member_in_proc(pgid).unwrap_or(true),
    }
}

/// Scans `/proc/<pid>/stat` for a non-zombie process in group `pgid`.
/// `None` when `/proc` cannot be read.
#[cfg(target_os = "linux")]
fn live_member_in_proc(pgid: u32) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited while we were looking
        };
        if let Some((state, group)) = parse_proc_stat(&stat)
            && group == pgid
            && state != 'Z'
            && state != 'X'
        {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(not(target_os = "linux"))]
fn live_member_in_proc(_pgid: u32) -> Option<bool> {
    None
}

/// Extracts (state, process group) from the contents of `/proc/<pid>/stat`:
/// `pid (comm) state ppid pgrp ...`, where `comm` may contain spaces and
/// parentheses, so parsing starts after the last `)`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn parse_proc_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Arranges for the child started by `cmd` to be sent SIGKILL when the
/// launcher dies, even by SIGKILL (Linux `PR_SET_PDEATHSIG`).
///
/// The "parent" the kernel watches is the *thread* that forks the child, so
/// ranks must be spawned from a thread that lives as long as the launcher
/// (the main thread does). Only the direct child is covered; its own children
/// are not (see docs/launcher.md). Elsewhere this is a no-op.
#[cfg(target_os = "linux")]
pub(crate) fn kill_when_parent_dies(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;

    let Ok(parent) = libc::pid_t::try_from(std::process::id()) else {
        return;
    };
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It calls prctl and getppid
    // (both async-signal-safe system calls), reads errno through
    // io::Error::last_os_error and builds an io::Error from a raw code; none
    // of these allocate, take locks or touch state shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            // The argument is an unsigned long in the kernel's ABI.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the launcher died between fork and prctl, the death signal
            // will never come: refuse to start instead of running orphaned.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn kill_when_parent_dies(_cmd: &mut Command) {}

/// This machine's host name, or `"localhost"` if it cannot be read.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is a valid, writable buffer and its exact length is passed,
    // so gethostname writes at most buf.len() bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..end]).trim() {
        "" => "localhost".to_owned(),
        name => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parsing_survives_odd_command_names() {
        let stat = "4242 (my (weird) prog) S 1 4240 4240 0 -1 4194560 100";
        assert_eq!(parse_proc_stat(stat), Some(('S', 4240)));
        let zombie = "77 (sh) Z 1 70 70 0 -1";
        assert_eq!(parse_proc_stat(zombie), Some(('Z', 70)));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("1 (x) R 0 notanumber"), None);
    }

    #[test]
    fn signalling_a_missing_group_reports_false() {
        // pid_max is at most 2^22 on Linux, so this group cannot exist.
        assert!(!signal_group(4_194_305 + 7, 0).unwrap_or(false));
        assert!(!group_has_live_members(4_194_305 + 7));
    }

    #[test]
    fn refuses_to_signal_init_or_own_group() {
        assert!(signal_group(0, 0).is_err());
        assert!(signal_group(1, 0).is_err());
    }

    #[test]
    fn hostname_is_not_empty() {
        assert!(!hostname().is_empty());
    }
}
