//! Turning raw arguments plus the environment (Slurm, GPUs, cores) into a
//! validated [`LaunchPlan`].
//!
//! Precedence for every value: explicit flag, then Slurm (only when started
//! by `srun` and not `--standalone`), then the default. All checks that can be
//! made before starting anything happen here and fail with a [`PlanError`]
//! (exit code 2).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::args::{NprocSpec, RawArgs};
use crate::gpu::{self, VisibleGpus};
use crate::slurm::{SlurmEnv, SlurmError};

/// MASTER_PORT for multi-node jobs when neither a flag nor Slurm gives one
/// (torchrun's default).
pub const DEFAULT_MULTI_NODE_PORT: u16 = 29500;

/// The most ranks shampoo-run starts on one node.
pub const MAX_NPROC_PER_NODE: u32 = 1024;

/// What the plan needs to know about the machine; [`RealSystem`] asks the OS,
/// tests substitute fakes.
pub trait System {
    /// The launcher's environment variable `name`.
    fn var(&self, name: &str) -> Option<OsString>;
    /// Number of CPU cores this process may use.
    fn available_cores(&self) -> usize;
    /// The NVIDIA GPUs this process may use (only called when needed).
    fn visible_gpus(&self) -> VisibleGpus;
    /// This machine's host name.
    fn hostname(&self) -> String;
}

/// The real machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSystem;

impl System for RealSystem {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn available_cores(&self) -> usize {
        // Honours the affinity mask and cgroup CPU quota (e.g. Slurm's binding).
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    fn visible_gpus(&self) -> VisibleGpus {
        gpu::detect(std::env::var_os("CUDA_VISIBLE_DEVICES").as_deref())
    }

    fn hostname(&self) -> String {
        crate::sys::hostname()
    }
}

/// Where MASTER_PORT comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterPort {
    /// This port, on every attempt.
    Fixed(u16),
    /// A free port picked by the launcher before each attempt (single node
    /// only: no other node has to agree on it).
    PickFreshPerAttempt,
}

/// A validated description of what to launch on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The program every rank runs.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Ranks on this node (LOCAL_WORLD_SIZE).
    pub nproc_per_node: u32,
    /// Nodes in the job.
    pub nnodes: u32,
    /// This node's rank (GROUP_RANK).
    pub node_rank: u32,
    /// MASTER_ADDR.
    pub master_addr: String,
    /// MASTER_PORT policy.
    pub master_port: MasterPort,
    /// Restarts allowed after failures.
    pub max_restarts: u32,
    /// TORCHELASTIC_RUN_ID.
    pub run_id: String,
    /// Where per-rank log files go, if anywhere.
    pub log_dir: Option<PathBuf>,
    /// Whether rank output is shown on the console.
    pub console: bool,
    /// Time between SIGTERM and SIGKILL when stopping ranks.
    pub grace_period: Duration,
    /// With `--bind-gpus`: the device each local rank gets as its only
    /// CUDA_VISIBLE_DEVICES entry, indexed by local rank.
    pub gpu_binding: Option<Vec<String>>,
    /// OMP_NUM_THREADS / RAYON_NUM_THREADS for ranks that do not set them.
    pub threads_per_rank: usize,
    /// Lines of output kept per rank for the failure report.
    pub tail_lines: usize,
    /// How long a rank may run on after every other local rank exited
    /// successfully (`None`: forever).
    pub exit_barrier_timeout: Option<Duration>,
    /// SHAMPOO_COMM_TIMEOUT for the ranks (`None`: inherited).
    pub comm_timeout: Option<Duration>,
    /// This machine's host name, for messages.
    pub hostname: String,
    /// Whether any value was taken from Slurm.
    pub from_slurm: bool,
}

impl LaunchPlan {
    /// WORLD_SIZE: nodes times ranks per node (checked to fit at plan time).
    pub fn world_size(&self) -> u32 {
        self.nnodes * self.nproc_per_node
    }

    /// RANK of the given local rank.
    pub fn global_rank(&self, local_rank: u32) -> u32 {
        self.node_rank * self.nproc_per_node + local_rank
    }

    /// Whether this node must check, before each attempt, that MASTER_PORT
    /// is free: only node 0 hosts the store, and only a fixed port can be taken.
    pub fn checks_master_port(&self) -> bool {
        self.node_rank == 0 && matches!(self.master_port, MasterPort::Fixed(_))
    }

    /// A human-readable summary, used by `--dry-run` and `-v`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let first = self.global_rank(0);
        let last = self.global_rank(self.nproc_per_node - 1);
        let _ = writeln!(s, "program:        {}", self.command_line());
        let _ = writeln!(
            s,
            "ranks:          {first}..={last} of WORLD_SIZE {} ({} per node)",
            self.world_size(),
            self.nproc_per_node
        );
        let _ = writeln!(
            s,
            "node:           {} of {} ({})",
            self.node_rank, self.nnodes, self.hostname
        );
        let port = match self.master_port {
            MasterPort::Fixed(p) => p.to_string(),
            MasterPort::PickFreshPerAttempt => "<free port picked before each attempt>".to_owned(),
        };
        let _ = writeln!(s, "master:         {}:{port}", self.master_addr);
        let _ = writeln!(s, "run id:         {}", self.run_id);
        let _ = writeln!(s, "max restarts:   {}", self.max_restarts);
        let _ = writeln!(
            s,
            "threads/rank:   {} (OMP_NUM_THREADS, RAYON_NUM_THREADS if unset)",
            self.threads_per_rank
        );
        let gpus = match &self.gpu_binding {
            Some(devices) => format!("one per rank: {}", devices.join(",")),
            None => "CUDA_VISIBLE_DEVICES inherited; ranks use device LOCAL_RANK".to_owned(),
        };
        let _ = writeln!(s, "gpus:           {gpus}");
        let logs = match &self.log_dir {
            Some(d) => format!(
                "{}/attempt_<K>/rank_<RANK>/{{stdout,stderr}}.log",
                d.display()
            ),
            None => "console only".to_owned(),
        };
        let _ = writeln!(
            s,
            "logs:           {logs}{}",
            if self.console { "" } else { " (console quiet)" }
        );
        let _ = writeln!(s, "grace period:   {:?}", self.grace_period);
        let barrier = self
            .exit_barrier_timeout
            .map_or("none (wait forever)".to_owned(), |d| format!("{d:?}"));
        let _ = writeln!(s, "exit barrier:   {barrier}");
        let _ = writeln!(
            s,
            "from slurm:     {}",
            if self.from_slurm { "yes" } else { "no" }
        );
        s
    }

    /// PROGRAM and ARGS joined with spaces, for messages.
    pub fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Why a plan could not be made. All of these are usage errors (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No PROGRAM, or an empty one.
    #[error("no PROGRAM given (usage: shampoo-run [OPTIONS] [--] PROGRAM [ARGS]...)")]
    NoProgram,
    /// `--standalone` with `--nnodes` other than 1.
    #[error("--standalone runs on a single node, but --nnodes {0} was given")]
    StandaloneNnodes(u32),
    /// `--standalone` with `--node-rank` other than 0.
    #[error("--standalone runs on a single node, so --node-rank must be 0 (got {0})")]
    StandaloneNodeRank(u32),
    /// `--standalone` with `--master-addr`.
    #[error("--standalone always uses MASTER_ADDR=127.0.0.1; drop --master-addr or --standalone")]
    StandaloneMasterAddr,
    /// Node rank out of range.
    #[error("--node-rank {node_rank} is out of range: with --nnodes {nnodes} node ranks are 0..={max}", max = .nnodes - 1)]
    NodeRankOutOfRange {
        /// The node rank.
        node_rank: u32,
        /// The node count.
        nnodes: u32,
    },
    /// Several nodes but no node rank.
    #[error("--nnodes {0} needs --node-rank: 0 on the node at --master-addr, 1..={max} on the others", max = .0 - 1)]
    MissingNodeRank(u32),
    /// Several nodes but no master address.
    #[error("--nnodes {0} needs --master-addr: the address of the node with --node-rank 0")]
    MissingMasterAddr(u32),
    /// An unusable master address.
    #[error("--master-addr {0:?} is not a host name or IP address")]
    BadMasterAddr(String),
    /// `gpu` (or `--bind-gpus`) without GPUs.
    #[error("{what} needs NVIDIA GPUs, but none are visible ({source_desc})")]
    NoGpus {
        /// Which flag asked for GPUs.
        what: &'static str,
        /// How the GPUs were looked for.
        source_desc: String,
    },
    /// `--bind-gpus` with more ranks than GPUs.
    #[error(
        "--bind-gpus gives each rank its own GPU, but {nproc} ranks were asked for and only {visible} GPUs are visible ({source_desc})"
    )]
    NotEnoughGpus {
        /// Ranks per node.
        nproc: u32,
        /// GPUs visible.
        visible: usize,
        /// How the GPUs were looked for.
        source_desc: String,
    },
    /// nnodes × nproc overflows.
    #[error("--nnodes {nnodes} x --nproc-per-node {nproc} ranks is too large a world")]
    WorldTooLarge {
        /// Node count.
        nnodes: u32,
        /// Ranks per node.
        nproc: u32,
    },
    /// More than one srun task per node.
    #[error(
        "srun started {tasks} tasks on {nodes} nodes, but shampoo-run must run once per node \
         (use `srun --ntasks-per-node=1`, or pass --node-rank yourself, or --no-slurm)"
    )]
    SlurmTasksPerNode {
        /// Tasks in the step.
        tasks: u32,
        /// Nodes in the step.
        nodes: u32,
    },
    /// A Slurm variable could not be used.
    #[error("cannot use the Slurm environment (pass --no-slurm to ignore it)")]
    Slurm(#[from] SlurmError),
    /// An empty `--run-id`.
    #[error("--run-id must not be empty")]
    EmptyRunId,
    /// More ranks per node than shampoo-run starts.
    #[error(
        "--nproc-per-node {0} is more than the {MAX_NPROC_PER_NODE} ranks shampoo-run starts on one node; use more nodes (--nnodes) for a larger world"
    )]
    TooManyRanks(u32),
    /// A torchrun rendezvous backend other than c10d or static.
    #[error(
        "--rdzv-backend {0} is not supported: shampoo-run's rendezvous is rank 0's store at MASTER_ADDR:MASTER_PORT, which torchrun calls `c10d` or `static` (use one of those, or leave the flag out)"
    )]
    RdzvBackend(String),
    /// `--rdzv-conf`.
    #[error(
        "--rdzv-conf is not supported: shampoo-run has no rendezvous options; the peer timeout of the collectives is --comm-timeout SECS"
    )]
    RdzvConf,
    /// A malformed `--rdzv-endpoint`.
    #[error("--rdzv-endpoint {0}: expected HOST or HOST:PORT with a port 1-65535")]
    RdzvEndpoint(String),
    /// `--rdzv-endpoint` with `--master-addr` or `--master-port`.
    #[error(
        "--rdzv-endpoint and --master-addr/--master-port both say where rank 0's store is: give one of them"
    )]
    RdzvEndpointAndMaster,
    /// `--rdzv-id` with `--run-id`.
    #[error("--rdzv-id and --run-id both name the run: give one of them")]
    RdzvIdAndRunId,
}

/// Splits torchrun's `--rdzv-endpoint` into host and optional port
/// (`[v6]:port` for IPv6 with a port).
fn parse_endpoint(s: &str) -> Result<(String, Option<u16>), PlanError> {
    let bad = || PlanError::RdzvEndpoint(s.to_owned());
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(p) => Ok(Some(p)),
    };
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_owned(), port(p)?)),
            None if after.is_empty() => Ok((host.to_owned(), None)),
            None => Err(bad()),
        };
    }
    match s.split_once(':') {
        None if !s.is_empty() => Ok((s.to_owned(), None)),
        // More than one colon: an IPv6 address without a port.
        Some((_, rest)) if rest.contains(':') => Ok((s.to_owned(), None)),
        Some((host, p)) if !host.is_empty() => Ok((host.to_owned(), port(p)?)),
        _ => Err(bad()),
    }
}

fn valid_host(addr: &str) -> bool {
    !addr.is_empty()
        && addr.len() <= 255
        && addr
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]%".contains(&b))
}

fn fresh_run_id(hostname: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{hostname}-{}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

/// Lazily detected GPUs, so nvidia-smi only runs when a flag needs it.
struct Gpus<'a> {
    system: &'a dyn System,
    cached: Option<VisibleGpus>,
}

impl Gpus<'_> {
    fn get(&mut self) -> &VisibleGpus {
        self.cached
            .get_or_insert_with(|| self.system.visible_gpus())
    }
}

impl LaunchPlan {
    /// Validates `raw` against the machine described by `system`.
    pub fn new(raw: &RawArgs, system: &dyn System) -> Result<LaunchPlan, PlanError> {
        let (program, args) = match raw.command.split_first() {
            Some((p, rest)) if !p.is_empty() => (p.clone(), rest.to_vec()),
            _ => return Err(PlanError::NoProgram),
        };

        // torchrun's rendezvous flags, mapped onto ours.
        if let Some(b) = raw.rdzv_backend.as_deref()
            && !matches!(b, "c10d" | "static")
        {
            return Err(PlanError::RdzvBackend(b.to_owned()));
        }
        if raw.rdzv_conf.is_some() {
            return Err(PlanError::RdzvConf);
        }
        let (rdzv_addr, rdzv_port) = match &raw.rdzv_endpoint {
            Some(_) if raw.master_addr.is_some() || raw.master_port.is_some() => {
                return Err(PlanError::RdzvEndpointAndMaster);
            }
            Some(e) => {
                let (host, port) = parse_endpoint(e)?;
                (Some(host), port)
            }
            None => (None, None),
        };
        let flag_master_addr = raw.master_addr.clone().or(rdzv_addr);
        let flag_master_port = raw.master_port.or(rdzv_port);
        if raw.rdzv_id.is_some() && raw.run_id.is_some() {
            return Err(PlanError::RdzvIdAndRunId);
        }
        let flag_run_id = raw.run_id.clone().or_else(|| raw.rdzv_id.clone());

        let slurm = if raw.no_slurm {
            None
        } else {
            SlurmEnv::from_vars(|name| system.var(name))?
        };
        // Slurm's node layout only describes us when srun started us.
        let step = slurm.as_ref().filter(|s| s.in_step && !raw.standalone);
        if let Some(s) = &slurm
            && !s.in_step
            && s.nnodes.is_some_and(|n| n > 1)
            && raw.nnodes.is_none()
        {
            tracing::warn!(
                "inside Slurm job {} but not started by srun: running on this node only \
                 (start one shampoo-run per node with `srun --ntasks-per-node=1 shampoo-run ...`)",
                s.job_id
            );
        }
        let mut from_slurm = false;

        // --- nodes ---------------------------------------------------------
        let nnodes = if raw.standalone {
            match raw.nnodes {
                Some(n) if n != 1 => return Err(PlanError::StandaloneNnodes(n)),
                _ => 1,
            }
        } else if let Some(n) = raw.nnodes {
            if let Some(slurm_n) = step.and_then(|s| s.nnodes)
                && slurm_n != n
            {
                tracing::warn!("--nnodes {n} overrides the srun step's {slurm_n} nodes");
            }
            n
        } else if let Some(n) = step.and_then(|s| s.nnodes) {
            from_slurm = true;
            n
        } else {
            1
        };

        let node_rank = if raw.standalone {
            match raw.node_rank {
                Some(r) if r != 0 => return Err(PlanError::StandaloneNodeRank(r)),
                _ => 0,
            }
        } else if let Some(r) = raw.node_rank {
            r
        } else if let Some(s) = step.filter(|s| s.node_id.is_some()) {
            if let (Some(tasks), Some(nodes)) = (s.step_tasks, s.nnodes)
                && tasks > nodes
            {
                return Err(PlanError::SlurmTasksPerNode { tasks, nodes });
            }
            from_slurm = true;
            s.node_id.unwrap_or(0)
        } else if nnodes == 1 {
            0
        } else {
            return Err(PlanError::MissingNodeRank(nnodes));
        };
        if node_rank >= nnodes {
            return Err(PlanError::NodeRankOutOfRange { node_rank, nnodes });
        }

        // --- master address and port ---------------------------------------
        let master_addr = if raw.standalone {
            if flag_master_addr.is_some() {
                return Err(PlanError::StandaloneMasterAddr);
            }
            "127.0.0.1".to_owned()
        } else if let Some(a) = &flag_master_addr {
            a.trim().to_owned()
        } else if nnodes == 1 {
            "127.0.0.1".to_owned()
        } else if let Some(a) = step.map(SlurmEnv::master_addr).transpose()?.flatten() {
            from_slurm = true;
            a
        } else {
            return Err(PlanError::MissingMasterAddr(nnodes));
        };
        if !valid_host(&master_addr) {
            return Err(PlanError::BadMasterAddr(master_addr));
        }
        if let Some(s) = step
            && let Some(len) = s.nodelist_len()
            && u32::try_from(len).ok() != Some(nnodes)
        {
            tracing::warn!("the Slurm node list has {len} hosts but the job has {nnodes} nodes");
        }

        let master_port = match flag_master_port {
            Some(p) => MasterPort::Fixed(p),
            None if nnodes == 1 => MasterPort::PickFreshPerAttempt,
            None => match step.and_then(SlurmEnv::derived_port) {
                Some(p) => {
                    from_slurm = true;
                    MasterPort::Fixed(p)
                }
                None => MasterPort::Fixed(DEFAULT_MULTI_NODE_PORT),
            },
        };

        // --- ranks per node and GPUs ----------------------------------------
        let cores = system.available_cores().max(1);
        let mut gpus = Gpus {
            system,
            cached: None,
        };
        let nproc = match raw.nproc_per_node {
            Some(NprocSpec::Count(n)) => n.get(),
            Some(NprocSpec::Cpu) => u32::try_from(cores).unwrap_or(u32::MAX),
            Some(NprocSpec::Gpu) => {
                let g = gpus.get();
                if g.devices.is_empty() {
                    return Err(PlanError::NoGpus {
                        what: "--nproc-per-node gpu",
                        source_desc: g.source.clone(),
                    });
                }
                u32::try_from(g.devices.len()).unwrap_or(u32::MAX)
            }
            Some(NprocSpec::Auto) => match gpus.get().devices.len() {
                0 => 1,
                n => u32::try_from(n).unwrap_or(u32::MAX),
            },
            None => match slurm
                .as_ref()
                .and_then(|s| s.gpus_on_node)
                .filter(|&n| n > 0)
            {
                Some(n) => {
                    from_slurm = true;
                    n
                }
                None => 1,
            },
        };
        if nproc > MAX_NPROC_PER_NODE {
            return Err(PlanError::TooManyRanks(nproc));
        }
        if nnodes
            .checked_mul(nproc)
            .is_none_or(|w| w > i32::MAX as u32)
        {
            return Err(PlanError::WorldTooLarge { nnodes, nproc });
        }

        let gpu_binding = if raw.bind_gpus {
            let g = gpus.get();
            if g.devices.is_empty() {
                return Err(PlanError::NoGpus {
                    what: "--bind-gpus",
                    source_desc: g.source.clone(),
                });
            }
            let n = usize::try_from(nproc).unwrap_or(usize::MAX);
            if g.devices.len() < n {
                return Err(PlanError::NotEnoughGpus {
                    nproc,
                    visible: g.devices.len(),
                    source_desc: g.source.clone(),
                });
            }
            Some(g.devices[..n].to_vec())
        } else {
            None
        };

        let hostname = system.hostname();
        let run_id = match &flag_run_id {
            Some(id) if id.trim().is_empty() => return Err(PlanError::EmptyRunId),
            Some(id) => id.clone(),
            None => match &slurm {
                Some(s) => s.job_id.clone(),
                None => fresh_run_id(&hostname),
            },
        };

        let threads_per_rank = (cores / usize::try_from(nproc).unwrap_or(usize::MAX)).max(1);

        Ok(LaunchPlan {
            program,
            args,
            nproc_per_node: nproc,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            max_restarts: raw.max_restarts,
            run_id,
            log_dir: raw.log_dir.clone(),
            console: !raw.quiet,
            grace_period: raw.grace_period,
            gpu_binding,
            threads_per_rank,
            tail_lines: raw.tail_lines,
            exit_barrier_timeout: Some(raw.exit_barrier_timeout).filter(|d| !d.is_zero()),
            comm_timeout: raw.comm_timeout,
            hostname,
            from_slurm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::cell::Cell;
    use std::collections::HashMap;

    /// A fake machine: fixed env, cores and GPUs; counts GPU probes.
    struct Fake {
        env: HashMap<String, OsString>,
        cores: usize,
        gpus: usize,
        probes: Cell<usize>,
    }

    impl Fake {
        fn new(cores: usize, gpus: usize, env: &[(&str, &str)]) -> Self {
            Fake {
                env: env.iter().map(|(k, v)| (k.to_string(), v.into())).collect(),
                cores,
                gpus,
                probes: Cell::new(0),
            }
        }
    }

    impl System for Fake {
        fn var(&self, name: &str) -> Option<OsString> {
            self.env.get(name).cloned()
        }
        fn available_cores(&self) -> usize {
            self.cores
        }
        fn visible_gpus(&self) -> VisibleGpus {
            self.probes.set(self.probes.get() + 1);
            VisibleGpus {
                devices: (0..self.gpus).map(|i| format!("{}", i + 4)).collect(),
                source: "fake".into(),
            }
        }
        fn hostname(&self) -> String {
            "fakehost".into()
        }
    }

    fn plan(args: &str, system: &Fake) -> Result<LaunchPlan, PlanError> {
        let raw =
            RawArgs::try_parse_from(std::iter::once("shampoo-run").chain(args.split_whitespace()))
                .expect("test arguments parse");
        LaunchPlan::new(&raw, system)
    }

    const SLURM_STEP: &[(&str, &str)] = &[
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_NNODES", "2"),
        ("SLURM_STEP_NUM_NODES", "2"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_PROCID", "1"),
        ("SLURM_STEP_NODELIST", "node[07-08]"),
        ("SLURM_JOB_NODELIST", "node[07-08]"),
        ("SLURM_GPUS_ON_NODE", "4"),
    ];

    #[test]
    fn defaults_are_one_local_rank_with_a_fresh_port() {
        let p = plan("train", &Fake::new(8, 0, &[])).unwrap();
        assert_eq!((p.nproc_per_node, p.nnodes, p.node_rank), (1, 1, 0));
        assert_eq!(p.master_addr, "127.0.0.1");
        assert_eq!(p.master_port, MasterPort::PickFreshPerAttempt);
        assert_eq!(p.threads_per_rank, 8);
        assert!(p.console);
        assert!(!p.from_slurm);
        assert!(p.run_id.starts_with("fakehost-"));
    }

    #[test]
    fn multi_node_ranks_and_threads() {
        let p = plan(
            "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --nproc-per-node 3 train",
            &Fake::new(8, 0, &[]),
        )
        .unwrap();
        assert_eq!(p.world_size(), 6);
        assert_eq!(p.global_rank(0), 3);
        assert_eq!(p.global_rank(2), 5);
        assert_eq!(p.master_port, MasterPort::Fixed(DEFAULT_MULTI_NODE_PORT));
        assert!(!p.checks_master_port(), "only node 0 checks the port");
        assert_eq!(p.threads_per_rank, 2);
    }

    #[test]
    fn threads_per_rank_never_drops_below_one() {
        let p = plan("--nproc-per-node 3 train", &Fake::new(2, 0, &[])).unwrap();
        assert_eq!(p.threads_per_rank, 1);
    }

    #[test]
    fn bad_combinations_are_rejected() {
        let f = Fake::new(4, 0, &[]);
        let cases = [
            (
                "--standalone --nnodes 2 x",
                "--standalone runs on a single node",
            ),
            ("--standalone --node-rank 1 x", "--node-rank must be 0"),
            ("--standalone --master-addr h x", "drop --master-addr"),
            ("--nnodes 2 --node-rank 2 --master-addr h x", "out of range"),
            ("--node-rank 1 x", "out of range"),
            ("--nnodes 2 --master-addr h x", "needs --node-rank"),
            ("--nnodes 2 --node-rank 0 x", "needs --master-addr"),
            ("--master-addr bad/addr x", "not a host name"),
            ("--nproc-per-node gpu x", "none are visible"),
            ("--bind-gpus x", "none are visible"),
            ("--run-id= x", "must not be empty"),
            (
                "--nnodes 100000000 --node-rank 0 --master-addr h --nproc-per-node 1000 x",
                "too large",
            ),
            ("--nproc-per-node 1025 x", "more than the 1024 ranks"),
            ("--rdzv-backend etcd-v2 x", "is not supported"),
            ("--rdzv-endpoint [::1 x", "expected HOST or HOST:PORT"),
        ];
        for (args, want) in cases {
            let err = plan(args, &f).unwrap_err().to_string();
            assert!(err.contains(want), "{args}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn rdzv_endpoints_parse_like_torchrun() {
        assert_eq!(
            parse_endpoint("h:29400").unwrap(),
            ("h".into(), Some(29400))
        );
        assert_eq!(parse_endpoint("h").unwrap(), ("h".into(), None));
        assert_eq!(parse_endpoint("[::1]:7").unwrap(), ("::1".into(), Some(7)));
        assert_eq!(parse_endpoint("[::1]").unwrap(), ("::1".into(), None));
        assert_eq!(parse_endpoint("fe80::1").unwrap(), ("fe80::1".into(), None));
        for bad in ["h:0", "h:x", ":1", "", "[::1]x"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn standalone_is_single_node_with_fresh_port() {
        let p = plan(
            "--standalone --nproc-per-node 2 x",
            &Fake::new(4, 0, SLURM_STEP),
        )
        .unwrap();
        assert_eq!((p.nnodes, p.node_rank), (1, 0));
        assert_eq!(p.master_addr, "127.0.0.1");
        assert_eq!(p.master_port, MasterPort::PickFreshPerAttempt);
        let fixed = plan("--standalone --master-port 1234 x", &Fake::new(4, 0, &[])).unwrap();
        assert!(fixed.checks_master_port());
    }

    #[test]
    fn gpu_counts_come_from_detection_only_when_needed() {
        let f = Fake::new(16, 4, &[]);
        assert_eq!(plan("--nproc-per-node 2 x", &f).unwrap().gpu_binding, None);
        assert_eq!(f.probes.get(), 0, "a plain number must not probe GPUs");
        assert_eq!(
            plan("--nproc-per-node gpu x", &f).unwrap().nproc_per_node,
            4
        );
        assert_eq!(
            plan("--nproc-per-node auto x", &f).unwrap().nproc_per_node,
            4
        );
        assert_eq!(
            plan("--nproc-per-node cpu x", &f).unwrap().nproc_per_node,
            16
        );
        let none = Fake::new(16, 0, &[]);
        let auto = plan("--nproc-per-node auto x", &none).unwrap();
        assert_eq!((auto.nproc_per_node, auto.threads_per_rank), (1, 16));
    }

    #[test]
    fn bind_gpus_assigns_the_local_rank_th_visible_device() {
        let f = Fake::new(8, 4, &[]);
        let p = plan("--bind-gpus --nproc-per-node 3 x", &f).unwrap();
        assert_eq!(
            p.gpu_binding.as_deref(),
            Some(&["4".to_owned(), "5".into(), "6".into()][..])
        );
        let err = plan("--bind-gpus --nproc-per-node 5 x", &f).unwrap_err();
        assert!(matches!(
            err,
            PlanError::NotEnoughGpus {
                nproc: 5,
                visible: 4,
                ..
            }
        ));
    }

    #[test]
    fn slurm_step_provides_topology() {
        let f = Fake::new(8, 0, SLURM_STEP);
        let p = plan("train", &f).unwrap();
        assert_eq!((p.nnodes, p.node_rank, p.nproc_per_node), (2, 1, 4));
        assert_eq!(p.master_addr, "node07");
        assert_eq!(p.master_port, MasterPort::Fixed(24242));
        assert_eq!(p.run_id, "4242");
        assert!(p.from_slurm);
    }

    #[test]
    fn explicit_flags_override_slurm() {
        let f = Fake::new(8, 0, SLURM_STEP);
        let p = plan(
            "--nproc-per-node 1 --node-rank 0 --master-addr m --master-port 999 --run-id r train",
            &f,
        )
        .unwrap();
        assert_eq!((p.nnodes, p.node_rank, p.nproc_per_node), (2, 0, 1));
        assert_eq!(p.master_addr, "m");
        assert_eq!(p.master_port, MasterPort::Fixed(999));
        assert_eq!(p.run_id, "r");
        let ignored = plan("--no-slurm train", &f).unwrap();
        assert_eq!(
            (ignored.nnodes, ignored.node_rank, ignored.nproc_per_node),
            (1, 0, 1)
        );
    }

    #[test]
    fn several_srun_tasks_per_node_is_an_error() {
        let mut env = SLURM_STEP.to_vec();
        env.retain(|(k, _)| *k != "SLURM_STEP_NUM_TASKS");
        env.push(("SLURM_STEP_NUM_TASKS", "8"));
        let err = plan("train", &Fake::new(8, 0, &env)).unwrap_err();
        assert!(matches!(
            err,
            PlanError::SlurmTasksPerNode { tasks: 8, nodes: 2 }
        ));
    }

    #[test]
    fn batch_script_without_srun_runs_locally() {
        let env: Vec<_> = SLURM_STEP
            .iter()
            .copied()
            .filter(|(k, _)| !k.starts_with("SLURM_STEP"))
            .collect();
        let p = plan("train", &Fake::new(8, 0, &env)).unwrap();
        assert_eq!((p.nnodes, p.node_rank), (1, 0));
        assert_eq!(p.master_addr, "127.0.0.1");
        // GPUs on the node and the job id are still taken from Slurm.
        assert_eq!(p.nproc_per_node, 4);
        assert_eq!(p.run_id, "4242");
    }

    #[test]
    fn unparsable_slurm_nodelist_is_reported() {
        let mut env = SLURM_STEP.to_vec();
        env.retain(|(k, _)| !k.ends_with("NODELIST"));
        env.push(("SLURM_STEP_NODELIST", "node[07-"));
        let err = plan("train", &Fake::new(8, 0, &env)).unwrap_err();
        assert!(matches!(err, PlanError::Slurm(_)));
        // ... unless the master address is given explicitly.
        assert!(plan("--master-addr m train", &Fake::new(8, 0, &env)).is_ok());
    }
}
