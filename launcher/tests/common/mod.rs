//! Helpers shared by the integration tests: run the real `shampoo-run`
//! binary with a clean environment and a hard timeout, collect its output,
//! and check that processes are gone.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shampoo-run");

/// No single launcher run in these tests may take longer than this.
pub const HARD_TIMEOUT: Duration = Duration::from_secs(20);

/// `shampoo-run` with `args`, in an environment free of anything that would
/// change the plan (Slurm, CUDA, thread counts, an enclosing launcher).
pub fn launcher<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("SLURM_")
            || k.starts_with("TORCHELASTIC_")
            || [
                "CUDA_VISIBLE_DEVICES",
                "OMP_NUM_THREADS",
                "RAYON_NUM_THREADS",
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// A launcher that is running, with its output being collected.
pub struct Running {
    pub child: Child,
    pub started: Instant,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
}

/// What a finished launcher did.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code; panics (with the output) if it died by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("shampoo-run died by a signal: {self:#?}"))
    }
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Starts `cmd` with piped output.
pub fn start(mut cmd: Command) -> Running {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start shampoo-run");
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    Running {
        child,
        started: Instant::now(),
        out,
        err,
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the launcher only.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child, which has not been waited for yet, so it is still ours.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the launcher to exit; kills it and panics after
    /// [`HARD_TIMEOUT`].
    pub fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > HARD_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stdout = self.out.join().unwrap();
                let stderr = self.err.join().unwrap();
                panic!(
                    "shampoo-run did not exit within {HARD_TIMEOUT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        Finished {
            status,
            // Output threads end when every holder of the pipes has exited;
            // a leak would hang here, which the tests would notice.
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap(),
            elapsed,
        }
    }
}

/// Runs `cmd` to completion.
pub fn run(cmd: Command) -> Finished {
    start(cmd).finish()
}

/// Parses console lines `[rankN]: KEY=VALUE` into rank → key → value.
pub fn env_by_rank(stdout: &str) -> BTreeMap<u32, BTreeMap<String, String>> {
    let mut out: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("[rank") else {
            continue;
        };
        let Some((rank, kv)) = rest.split_once("]: ") else {
            continue;
        };
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        out.entry(rank.parse().unwrap())
            .or_default()
            .insert(k.to_owned(), v.to_owned());
    }
    out
}

/// Waits until every file exists and holds a pid; returns the pids.
pub fn wait_for_pids(paths: &[std::path::PathBuf]) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<Option<i32>> = paths
            .iter()
            .map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
            .collect();
        if pids.iter().all(Option::is_some) {
            return pids.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "ranks did not write their pid files: {paths:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is gone or a zombie (dead, merely not reaped by its new
/// parent, which may be a container's init that never reaps).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            matches!(after.split_whitespace().next(), Some("Z" | "X"))
        }
    }
}

/// Asserts every pid is dead, allowing `within` for the kernel to finish.
pub fn assert_all_dead(pids: &[i32], within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|&p| is_dead(p)) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| !is_dead(p)).collect();
    // Clean up so a failing test does not leave sleepers behind.
    for &p in &alive {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    panic!("processes still alive: {alive:?}");
}

/// The pid files `dir/pid.<rank>` for ranks `0..n`.
pub fn pid_files(dir: &Path, n: u32) -> Vec<std::path::PathBuf> {
    (0..n).map(|r| dir.join(format!("pid.{r}"))).collect()
}
