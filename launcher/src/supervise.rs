//! Starting the ranks of one attempt, watching them, and stopping them.
//!
//! Every rank is the leader of its own process group, so signals reach the
//! rank and anything it started. Events (a rank exited, an output pipe
//! closed, the launcher got a signal) arrive on one channel: a thread per
//! rank waits for it, a thread per output stream copies it, and a thread
//! turns signals into events. The main thread runs the state machine below,
//! so timeouts (SIGTERM → SIGKILL escalation) need no extra timers.
//!
//! Stopping means: SIGTERM (or the forwarded signal) to every rank's process
//! group, then SIGKILL to the groups still alive after the grace period. The
//! attempt only ends when every rank has been reaped and no process is left
//! in any rank's process group.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use signal_hook::iterator::Signals;

use crate::env::rank_env;
use crate::error::LaunchError;
use crate::output::{Sink, Stream, Tail};
use crate::plan::LaunchPlan;
use crate::signals::{FORWARDED_SIGNALS, Termination, signal_name};
use crate::sys;

/// How long to wait for ranks to be reaped after SIGKILL before giving up
/// on them (only a process stuck in the kernel survives SIGKILL).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to wait, after every rank exited, for its output pipes to close.
/// Only a process that left the rank's process group can hold them longer.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for processes that are not our children.
const POLL: Duration = Duration::from_millis(20);

/// Something that happened during a run.
#[derive(Debug)]
pub(crate) enum Event {
    /// A rank's process ended.
    Exited {
        attempt: u32,
        index: usize,
        status: std::io::Result<std::process::ExitStatus>,
    },
    /// One output stream of a rank reached end of file.
    StreamClosed { attempt: u32, index: usize },
    /// The launcher received a signal.
    Signal(i32),
}

/// The first failure of an attempt: the root cause.
#[derive(Debug, Clone)]
pub struct RankFailure {
    /// Global rank.
    pub rank: u32,
    /// Rank on this node.
    pub local_rank: u32,
    /// Process id (and process group id) of the rank.
    pub pid: u32,
    /// Host it ran on.
    pub host: String,
    /// Attempt number (0-based).
    pub attempt: u32,
    /// How it ended.
    pub termination: Termination,
    /// Its last lines of output, prefixed, oldest first.
    pub tail: Vec<Vec<u8>>,
    /// Directory holding its log files, with `--log-dir`.
    pub log_dir: Option<PathBuf>,
    /// How long it ran.
    pub runtime: Duration,
    /// Set when it was stopped for running this long after every other
    /// rank of the node had exited successfully (`--exit-barrier-timeout`).
    pub still_running_after: Option<Duration>,
    /// Other ranks stopped for the same reason.
    pub also_running: Vec<u32>,
}

impl RankFailure {
    /// The root-cause line: `rank 1 (host h, pid 1234) exited with code 3`.
    pub fn headline(&self) -> String {
        let who = format!("rank {} (host {}, pid {})", self.rank, self.host, self.pid);
        match self.still_running_after {
            None => format!("{who} {}", self.termination),
            Some(t) => {
                let also = if self.also_running.is_empty() {
                    String::new()
                } else {
                    let ranks: Vec<String> =
                        self.also_running.iter().map(|r| r.to_string()).collect();
                    format!("; also still running: rank(s) {}", ranks.join(", "))
                };
                format!(
                    "{who} was still running {t:?} after the other ranks exited successfully (--exit-barrier-timeout {}{also}); it was stopped",
                    t.as_secs_f64()
                )
            }
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// Every rank exited with code 0.
    Succeeded,
    /// A rank failed; the others were stopped.
    Failed(Box<RankFailure>),
    /// The launcher received this signal; all ranks were stopped.
    Interrupted(i32),
}

/// Owns the event channel and the signal handlers for a whole run.
pub(crate) struct Supervisor {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    signals: signal_hook::iterator::Handle,
    signal_thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Installs handlers for [`FORWARDED_SIGNALS`]; from now on they are
    /// delivered as events instead of killing the launcher.
    pub(crate) fn new() -> Result<Self, LaunchError> {
        let (tx, rx) = mpsc::channel();
        let mut signals = Signals::new(FORWARDED_SIGNALS).map_err(LaunchError::Signals)?;
        let handle = signals.handle();
        let signal_tx = tx.clone();
        let signal_thread = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal_tx.send(Event::Signal(signal)).is_err() {
                        break;
                    }
                }
            })
            .map_err(LaunchError::Thread)?;
        Ok(Supervisor {
            tx,
            rx,
            signals: handle,
            signal_thread: Some(signal_thread),
        })
    }

    /// A signal that arrived while no attempt was running, if any.
    pub(crate) fn pending_signal(&self) -> Option<i32> {
        // Other events left in the channel belong to finished attempts.
        self.rx.try_iter().find_map(|event| match event {
            Event::Signal(signal) => Some(signal),
            _ => None,
        })
    }

    /// Runs attempt `attempt` of `plan` with MASTER_PORT `master_port`, until
    /// every rank has ended and nothing of it is left running.
    ///
    /// Must be called from the main thread: ranks are spawned from the
    /// calling thread, and their parent-death signal fires when it exits.
    pub(crate) fn run_attempt(
        &mut self,
        plan: &LaunchPlan,
        attempt: u32,
        master_port: u16,
    ) -> Result<AttemptOutcome, LaunchError> {
        let mut run = Attempt {
            plan,
            number: attempt,
            ranks: Vec::new(),
            stop: None,
            kill_at: None,
            killed_at: None,
            first_success: None,
        };
        let mut launch_error = None;
        for local_rank in 0..plan.nproc_per_node {
            // Handle what happened so far (a Ctrl-C, a rank that died at once)
            // before starting more ranks.
            while let Ok(event) = self.rx.try_recv() {
                run.handle(event);
            }
            if run.stop.is_some() {
                break;
            }
            match spawn_rank(plan, attempt, local_rank, master_port, &self.tx) {
                Ok(rank) => run.ranks.push(rank),
                Err(e) => {
                    run.begin_stop(Stop::LaunchFailed, libc::SIGTERM);
                    launch_error = Some(e);
                    break;
                }
            }
        }
        run.wait(&self.rx);
        match launch_error {
            Some(e) => Err(e),
            None => Ok(run.outcome()),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.signals.close();
        if let Some(thread) = self.signal_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why an attempt is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Rank at this index failed first: the root cause.
    Failure(usize),
    /// The launcher received this signal.
    Signal(i32),
    /// A rank could not be started.
    LaunchFailed,
    /// Every rank succeeded, but processes remain in their groups.
    Cleanup,
    /// The rank at this index (the first of those) was still running
    /// `--exit-barrier-timeout` after every other rank exited successfully.
    ExitBarrier(usize),
}

/// A started rank.
struct RankProc {
    local_rank: u32,
    rank: u32,
    pid: u32,
    started: Instant,
    end: Option<(Termination, Instant)>,
    open_streams: u8,
    tail: Arc<Tail>,
}

/// State of one attempt.
struct Attempt<'a> {
    plan: &'a LaunchPlan,
    number: u32,
    ranks: Vec<RankProc>,
    stop: Option<Stop>,
    /// When SIGKILL is due, once stopping has begun.
    kill_at: Option<Instant>,
    /// When SIGKILL was sent.
    killed_at: Option<Instant>,
    /// When the first rank exited successfully (starts the exit barrier).
    first_success: Option<Instant>,
}

impl Attempt<'_> {
    /// Sends `signal` to the process group of every rank, including ranks
    /// that already exited (their group may still hold their children).
    fn signal_all(&self, signal: i32) {
        for r in &self.ranks {
            if let Err(e) = sys::signal_group(r.pid, signal) {
                tracing::warn!(
                    "cannot send {} to rank {} (process group {}): {e}",
                    signal_name(signal),
                    r.rank,
                    r.pid
                );
            }
        }
    }

    /// Starts stopping every rank with `signal`, unless already stopping.
    fn begin_stop(&mut self, reason: Stop, signal: i32) {
        if self.stop.is_some_and(|s| s != Stop::Cleanup) {
            return;
        }
        self.stop = Some(reason);
        let grace = self.plan.grace_period;
        tracing::debug!(
            "stopping all ranks with {} (SIGKILL after {grace:?})",
            signal_name(signal)
        );
        self.signal_all(signal);
        self.kill_at = Some(Instant::now() + grace);
    }

    /// Sends SIGKILL to every rank's group, once.
    fn kill_all(&mut self) {
        if self.killed_at.is_some() {
            return;
        }
        for r in &self.ranks {
            let what = if r.end.is_none() {
                "is"
            } else if sys::group_has_live_members(r.pid) {
                "left processes that are"
            } else {
                continue;
            };
            tracing::warn!(
                "rank {} (pid {}) {what} still running {:?} after being asked to stop; sending SIGKILL",
                r.rank,
                r.pid,
                self.plan.grace_period
            );
        }
        self.signal_all(libc::SIGKILL);
        self.killed_at = Some(Instant::now());
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited {
                attempt,
                index,
                status,
            } if attempt == self.number => {
                let termination = match status {
                    Ok(status) => Termination::from_status(status),
                    Err(e) => {
                        tracing::error!("cannot wait for rank {index}: {e}");
                        Termination::Exited(255)
                    }
                };
                let Some(r) = self.ranks.get_mut(index) else {
                    return;
                };
                r.end = Some((termination, Instant::now()));
                let rank = r.rank;
                if termination.success() {
                    tracing::debug!("rank {rank} exited with code 0");
                    self.first_success.get_or_insert_with(Instant::now);
                } else if self.stop.is_none_or(|s| s == Stop::Cleanup) {
                    tracing::debug!("rank {rank} {termination}: stopping the other ranks");
                    self.begin_stop(Stop::Failure(index), libc::SIGTERM);
                } else if let Some(Stop::Failure(first)) = self.stop
                    && let Some(first_end) = self.ranks[first].end
                    && outside_kill_is_root_cause(
                        first_end,
                        (termination, Instant::now()),
                        self.killed_at.is_some(),
                    )
                {
                    tracing::debug!(
                        "rank {rank} {termination} right after rank {} failed: \
                         taking the outside signal as the root cause",
                        self.ranks[first].rank
                    );
                    self.stop = Some(Stop::Failure(index));
                } else {
                    tracing::debug!("rank {rank} {termination} while stopping");
                }
            }
            Event::StreamClosed { attempt, index } if attempt == self.number => {
                if let Some(r) = self.ranks.get_mut(index) {
                    r.open_streams = r.open_streams.saturating_sub(1);
                }
            }
            Event::Signal(signal) => match self.stop {
                None | Some(Stop::Cleanup) => {
                    tracing::warn!(
                        "received {}: forwarding it to all ranks",
                        signal_name(signal)
                    );
                    self.begin_stop(Stop::Signal(signal), signal);
                }
                Some(_) => {
                    tracing::warn!(
                        "received {} while stopping: killing all ranks now",
                        signal_name(signal)
                    );
                    self.kill_all();
                }
            },
            // Events of an earlier attempt.
            Event::Exited { .. } | Event::StreamClosed { .. } => {}
        }
    }

    /// Runs the attempt's event loop until every rank has been reaped, no
    /// process is left in their groups, and their output has been copied.
    fn wait(&mut self, rx: &Receiver<Event>) {
        loop {
            let now = Instant::now();
            if self.killed_at.is_none() && self.kill_at.is_some_and(|t| now >= t) {
                self.kill_all();
            }
            if let Some(k) = self.killed_at
                && now >= k + KILL_WAIT
            {
                let stuck: Vec<String> = self
                    .ranks
                    .iter()
                    .filter(|r| r.end.is_none() || sys::group_has_live_members(r.pid))
                    .map(|r| format!("{} (pid {})", r.rank, r.pid))
                    .collect();
                if !stuck.is_empty() {
                    tracing::error!(
                        "processes of rank(s) {} survived SIGKILL for {KILL_WAIT:?} \
                         (stuck in the kernel?); giving up on them",
                        stuck.join(", ")
                    );
                }
                break;
            }

            let mut timeout = None;
            if let Some(deadline) = self.exit_barrier_deadline() {
                if now >= deadline {
                    self.exit_barrier_expired();
                    continue;
                }
                timeout = Some(deadline - now);
            }
            if self.ranks.iter().all(|r| r.end.is_some()) {
                let lingering: Vec<&RankProc> = self
                    .ranks
                    .iter()
                    .filter(|r| sys::group_has_live_members(r.pid))
                    .collect();
                if lingering.is_empty() {
                    break;
                }
                if self.stop.is_none() {
                    let which: Vec<String> = lingering.iter().map(|r| r.rank.to_string()).collect();
                    tracing::warn!(
                        "rank(s) {} exited but left processes running in their process group; stopping them",
                        which.join(", ")
                    );
                    self.begin_stop(Stop::Cleanup, libc::SIGTERM);
                }
                timeout = Some(POLL);
            }
            let deadline = match (self.killed_at, self.kill_at) {
                (Some(k), _) => Some(k + KILL_WAIT),
                (None, Some(t)) => Some(t),
                (None, None) => None,
            };
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(now);
                timeout = Some(timeout.map_or(left, |t: Duration| t.min(left)));
            }
            let event = match timeout {
                Some(t) => rx.recv_timeout(t),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.drain(rx);
    }

    /// When the ranks still running must have exited: `--exit-barrier-timeout`
    /// after the first successful exit, while nothing is being stopped and
    /// some rank still runs.
    fn exit_barrier_deadline(&self) -> Option<Instant> {
        let timeout = self.plan.exit_barrier_timeout?;
        let first = self.first_success?;
        let running = self.ranks.iter().any(|r| r.end.is_none());
        (self.stop.is_none() && running && self.ranks.len() == self.plan.nproc_per_node as usize)
            .then_some(first + timeout)
    }

    /// Stops the ranks still running after the exit barrier's timeout; the
    /// first of them is the root cause.
    fn exit_barrier_expired(&mut self) {
        let running: Vec<usize> = (0..self.ranks.len())
            .filter(|&i| self.ranks[i].end.is_none())
            .collect();
        let Some(&first) = running.first() else {
            return;
        };
        let names: Vec<String> = running
            .iter()
            .map(|&i| self.ranks[i].rank.to_string())
            .collect();
        tracing::warn!(
            "rank(s) {} still running {:?} after the other ranks exited successfully; stopping them",
            names.join(", "),
            self.plan.exit_barrier_timeout.unwrap_or_default()
        );
        self.begin_stop(Stop::ExitBarrier(first), libc::SIGTERM);
    }

    /// Waits (briefly) for the output threads to copy the last lines.
    fn drain(&mut self, rx: &Receiver<Event>) {
        let deadline = Instant::now() + DRAIN_WAIT;
        while self.ranks.iter().any(|r| r.open_streams > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(event) => self.handle(event),
                Err(_) => {
                    let open: Vec<String> = self
                        .ranks
                        .iter()
                        .filter(|r| r.open_streams > 0)
                        .map(|r| r.rank.to_string())
                        .collect();
                    tracing::warn!(
                        "output of rank(s) {} is still open after they exited (a process that left \
                         their process group holds it); not waiting for it",
                        open.join(", ")
                    );
                    break;
                }
            }
        }
    }

    fn outcome(&self) -> AttemptOutcome {
        match self.stop {
            Some(Stop::Failure(index) | Stop::ExitBarrier(index)) => {
                let barrier = matches!(self.stop, Some(Stop::ExitBarrier(_)));
                let r = &self.ranks[index];
                let (termination, ended) =
                    r.end.unwrap_or((Termination::Exited(255), Instant::now()));
                AttemptOutcome::Failed(Box::new(RankFailure {
                    rank: r.rank,
                    local_rank: r.local_rank,
                    pid: r.pid,
                    host: self.plan.hostname.clone(),
                    attempt: self.number,
                    termination,
                    tail: r.tail.lines(),
                    log_dir: self
                        .plan
                        .log_dir
                        .as_ref()
                        .map(|d| rank_log_dir(d, self.number, r.rank)),
                    runtime: ended.saturating_duration_since(r.started),
                    still_running_after: barrier
                        .then(|| self.plan.exit_barrier_timeout.unwrap_or_default()),
                    also_running: if barrier {
                        self.ranks
                            .iter()
                            .filter(|o| {
                                o.rank != r.rank && o.end.is_some_and(|(t, _)| !t.success())
                            })
                            .map(|o| o.rank)
                            .collect()
                    } else {
                        Vec::new()
                    },
                }))
            }
            Some(Stop::Signal(signal)) => AttemptOutcome::Interrupted(signal),
            Some(Stop::LaunchFailed | Stop::Cleanup) | None => AttemptOutcome::Succeeded,
        }
    }
}

/// How soon after the first failure a death by an outside signal still
/// counts as its cause (the order in which the kernel reports deaths need not
/// be the order in which they happened).
const ROOT_CAUSE_WINDOW: Duration = Duration::from_secs(1);

/// Whether a rank that ended while the others were being stopped is a better
/// root cause than the rank that failed first.
///
/// A rank killed from outside (say by SIGKILL from the OOM killer) breaks
/// its peers' connections, and a peer may exit with an error code before the
/// launcher has seen the kill. So when the first failure was an exit code and
/// a rank then died within [`ROOT_CAUSE_WINDOW`] by a signal that the
/// launcher did not send (anything but SIGTERM before the launcher's own
/// SIGKILL), that death is the cause and the exit its consequence.
fn outside_kill_is_root_cause(
    first: (Termination, Instant),
    later: (Termination, Instant),
    launcher_sent_sigkill: bool,
) -> bool {
    let (Termination::Exited(_), first_at) = first else {
        return false;
    };
    let (Termination::Signaled { signal, .. }, later_at) = later else {
        return false;
    };
    signal != libc::SIGTERM
        && !(launcher_sent_sigkill && signal == libc::SIGKILL)
        && later_at.saturating_duration_since(first_at) <= ROOT_CAUSE_WINDOW
}

/// `DIR/attempt_<K>/rank_<RANK>`: where a rank's log files go.
pub fn rank_log_dir(log_dir: &std::path::Path, attempt: u32, rank: u32) -> PathBuf {
    log_dir
        .join(format!("attempt_{attempt}"))
        .join(format!("rank_{rank}"))
}

fn create_log_file(path: PathBuf) -> Result<File, LaunchError> {
    File::create(&path).map_err(|source| LaunchError::LogDir { path, source })
}

/// Starts a thread copying one output stream; returns whether it started.
fn spawn_reader(
    reader: Option<impl Read + Send + 'static>,
    sink: Sink,
    name: String,
    attempt: u32,
    index: usize,
    tx: &Sender<Event>,
) -> bool {
    let Some(reader) = reader else { return false };
    let tx = tx.clone();
    let started = thread::Builder::new().name(name).spawn(move || {
        sink.pump(reader);
        let _ = tx.send(Event::StreamClosed { attempt, index });
    });
    match started {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("cannot start an output thread: {e}; that output is lost");
            false
        }
    }
}

/// Starts one rank in its own process group, with its output threads and
/// the thread that waits for it.
fn spawn_rank(
    plan: &LaunchPlan,
    attempt: u32,
    local_rank: u32,
    master_port: u16,
    tx: &Sender<Event>,
) -> Result<RankProc, LaunchError> {
    let rank = plan.global_rank(local_rank);
    let index = usize::try_from(local_rank).unwrap_or(usize::MAX);
    let env = rank_env(plan, local_rank, attempt, master_port, &|name| {
        std::env::var_os(name)
    });

    let (out_file, err_file) = match &plan.log_dir {
        Some(dir) => {
            let dir = rank_log_dir(dir, attempt, rank);
            std::fs::create_dir_all(&dir).map_err(|source| LaunchError::LogDir {
                path: dir.clone(),
                source,
            })?;
            (
                Some(create_log_file(dir.join("stdout.log"))?),
                Some(create_log_file(dir.join("stderr.log"))?),
            )
        }
        None => (None, None),
    };

    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (name, value) in &env.set {
        cmd.env(name, value);
    }
    for name in &env.remove {
        cmd.env_remove(name);
    }
    sys::kill_when_parent_dies(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        rank,
        program: plan.program.to_string_lossy().into_owned(),
        source,
    })?;
    let pid = child.id();
    tracing::debug!("started rank {rank} (local rank {local_rank}) as pid {pid}");

    let tail = Arc::new(Tail::new(plan.tail_lines));
    let stdout_sink = Sink::new(
        rank,
        Stream::Stdout,
        plan.console,
        out_file,
        Arc::clone(&tail),
    );
    let stderr_sink = Sink::new(
        rank,
        Stream::Stderr,
        plan.console,
        err_file,
        Arc::clone(&tail),
    );
    let mut open_streams = 0;
    for started in [
        spawn_reader(
            child.stdout.take(),
            stdout_sink,
            format!("rank{rank}-stdout"),
            attempt,
            index,
            tx,
        ),
        spawn_reader(
            child.stderr.take(),
            stderr_sink,
            format!("rank{rank}-stderr"),
            attempt,
            index,
            tx,
        ),
    ] {
        open_streams += u8::from(started);
    }

    let waiter_tx = tx.clone();
    let waiter = thread::Builder::new()
        .name(format!("rank{rank}-wait"))
        .spawn(move || {
            let status = child.wait();
            let _ = waiter_tx.send(Event::Exited {
                attempt,
                index,
                status,
            });
        });
    if let Err(e) = waiter {
        // Without a waiter the rank could never be reaped: kill it now.
        let _ = sys::signal_group(pid, libc::SIGKILL);
        return Err(LaunchError::Thread(e));
    }

    Ok(RankProc {
        local_rank,
        rank,
        pid,
        started: Instant::now(),
        end: None,
        open_streams,
        tail,
    })
}

#[cfg(test)]
mod root_cause_tests {
    use super::*;

    fn killed(signal: i32) -> Termination {
        Termination::Signaled {
            signal,
            core_dumped: false,
        }
    }

    #[test]
    fn an_outside_kill_right_after_an_exit_is_the_cause() {
        let t = Instant::now();
        let soon = t + Duration::from_millis(200);
        let exit = (Termination::Exited(1), t);
        assert!(outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGKILL), soon),
            false
        ));
        assert!(outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGSEGV), soon),
            false
        ));
        assert!(outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGSEGV), soon),
            true
        ));
    }

    #[test]
    fn the_launchers_own_signals_and_late_deaths_are_not() {
        let t = Instant::now();
        let soon = t + Duration::from_millis(200);
        let late = t + ROOT_CAUSE_WINDOW + Duration::from_millis(1);
        let exit = (Termination::Exited(1), t);
        assert!(!outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGTERM), soon),
            false
        ));
        assert!(!outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGKILL), soon),
            true
        ));
        assert!(!outside_kill_is_root_cause(
            exit,
            (killed(libc::SIGKILL), late),
            false
        ));
        assert!(!outside_kill_is_root_cause(
            exit,
            (Termination::Exited(2), soon),
            false
        ));
        let first_killed = (killed(libc::SIGKILL), t);
        assert!(!outside_kill_is_root_cause(
            first_killed,
            (killed(libc::SIGSEGV), soon),
            false
        ));
    }
}
