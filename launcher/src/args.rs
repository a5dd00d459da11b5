//! Raw command-line arguments, exactly as the user typed them.
//!
//! Every flag is defined once, here, with clap's derive API; `--help` and the
//! flag reference in `docs/launcher.md` are both derived from these
//! definitions (a test checks that the document quotes the current `--help`
//! output). Nothing in this module looks at the environment or checks that
//! flags make sense together: that is [`crate::plan`]'s job.

use std::ffi::OsString;
use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgAction, Parser};

/// Exit codes, shown at the end of `--help`.
const AFTER_HELP: &str = "\
Exit codes:
  0        every rank exited with code 0
  1-255    the exit code of the first rank that failed (128+N if it was killed by signal N)
  124      a rank was still running --exit-barrier-timeout after the others exited successfully
  2        usage error: bad flags or a combination that cannot work on this machine
  125      shampoo-run itself failed (port in use, log directory not writable, ...)
  126/127  PROGRAM could not be executed / was not found
  130/143  shampoo-run was interrupted by SIGINT/SIGTERM (129 SIGHUP, 131 SIGQUIT)

Documentation: docs/launcher.md";

/// How many ranks to start on this node, as given to `--nproc-per-node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NprocSpec {
    /// An explicit number of ranks (at least 1).
    Count(NonZeroU32),
    /// One rank per visible NVIDIA GPU; an error if there is none.
    Gpu,
    /// One rank per available CPU core.
    Cpu,
    /// One rank per visible GPU if there is any, else a single CPU rank.
    Auto,
}

/// The error returned when a `--nproc-per-node` value cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a number of ranks (at least 1), `gpu`, `cpu` or `auto`, got {0:?}")]
pub struct NprocSpecError(String);

impl FromStr for NprocSpec {
    type Err = NprocSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gpu" => Ok(NprocSpec::Gpu),
            "cpu" => Ok(NprocSpec::Cpu),
            "auto" => Ok(NprocSpec::Auto),
            other => other
                .parse::<NonZeroU32>()
                .map(NprocSpec::Count)
                .map_err(|_| NprocSpecError(s.to_owned())),
        }
    }
}

impl fmt::Display for NprocSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NprocSpec::Count(n) => write!(f, "{n}"),
            NprocSpec::Gpu => f.write_str("gpu"),
            NprocSpec::Cpu => f.write_str("cpu"),
            NprocSpec::Auto => f.write_str("auto"),
        }
    }
}

/// Parses `--nnodes`: a positive number. torchrun's elastic `MIN:MAX` form is
/// rejected with a message that says so, rather than a bare "invalid digit".
fn parse_nnodes(s: &str) -> Result<u32, String> {
    if s.contains(':') {
        return Err(format!(
            "elastic node ranges like {s:?} are not supported; give the exact number of nodes"
        ));
    }
    match s.trim().parse::<u32>() {
        Ok(0) => Err("the number of nodes must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a number of nodes, got {s:?}")),
    }
}

/// Parses `--master-port`: 1..=65535.
fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err(
            "port 0 is not a usable MASTER_PORT (omit --master-port to have a free port picked)"
                .to_owned(),
        ),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("expected a TCP port number 1-65535, got {s:?}")),
    }
}

/// Parses a duration in (possibly fractional) seconds, e.g. `3` or `0.5`.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {s:?}"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!(
            "expected a non-negative number of seconds, got {s:?}"
        ));
    }
    if secs > 24.0 * 3600.0 {
        return Err(format!(
            "{s} seconds is more than a day; pick something shorter"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a timeout that must be positive, in (possibly fractional) seconds.
fn parse_positive_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s)?;
    if d.is_zero() {
        return Err(format!(
            "the timeout must be more than 0 seconds, got {s:?}"
        ));
    }
    Ok(d)
}

/// Start the ranks of a data-parallel training program on this node, with
/// the environment torchrun would give them, and supervise them.
///
/// Every rank gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
/// the other variables torchrun sets, runs in its own process group, and has
/// its output prefixed with `[rankN]: `. When one rank fails, the others are
/// stopped at once and shampoo-run exits with the failed rank's exit code.
/// Under `srun` (one shampoo-run per node), the node count, node rank and
/// master address are read from Slurm's variables; explicit flags win.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "shampoo-run",
    version,
    about = "Launch and supervise the ranks of a data-parallel training program (a torchrun replacement)",
    after_help = AFTER_HELP,
    after_long_help = AFTER_HELP,
    max_term_width = 100
)]
pub struct RawArgs {
    /// Ranks to start on this node: a number, `gpu` (one per visible NVIDIA GPU),
    /// `cpu` (one per available core) or `auto` (one per GPU, else a single CPU
    /// rank). Default: 1, or SLURM_GPUS_ON_NODE under srun.
    #[arg(long, alias = "nproc_per_node", value_name = "N|gpu|cpu|auto")]
    pub nproc_per_node: Option<NprocSpec>,

    /// Number of nodes (one shampoo-run per node). Default: 1, or the srun
    /// step's node count.
    #[arg(long, value_name = "N", value_parser = parse_nnodes)]
    pub nnodes: Option<u32>,

    /// This node's rank, 0..nnodes-1; node 0 hosts MASTER_ADDR. Required when
    /// --nnodes is more than 1, unless srun provides SLURM_NODEID.
    #[arg(long, alias = "node_rank", value_name = "R")]
    pub node_rank: Option<u32>,

    /// Address of node 0, given to ranks as MASTER_ADDR. Default: 127.0.0.1 on
    /// a single node, the first host of the Slurm node list under srun.
    #[arg(long, alias = "master_addr", value_name = "ADDR")]
    pub master_addr: Option<String>,

    /// Port on MASTER_ADDR for the rendezvous store (MASTER_PORT). Default: a
    /// free port on a single node; 20000 + SLURM_JOB_ID % 10000 under srun;
    /// 29500 otherwise. On node 0 the port is checked to be free before any
    /// rank starts.
    #[arg(long, alias = "master_port", value_name = "PORT", value_parser = parse_port)]
    pub master_port: Option<u16>,

    /// Single-node job: MASTER_ADDR=127.0.0.1 and a free MASTER_PORT picked
    /// for each attempt; Slurm's node layout is ignored.
    #[arg(long)]
    pub standalone: bool,

    /// Restart all ranks of this node up to K times after a failure;
    /// TORCHELASTIC_RESTART_COUNT tells ranks which attempt they are in.
    #[arg(long, alias = "max_restarts", value_name = "K", default_value_t = 0)]
    pub max_restarts: u32,

    /// Also write each rank's output to `DIR/attempt_<K>/rank_<RANK>/{stdout,stderr}.log`
    /// (byte-exact, no prefix). Created if missing; existing files are overwritten.
    #[arg(long, alias = "log_dir", value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Show rank output on the console as well as in --log-dir files. This is
    /// already the default; the flag exists for torchrun compatibility.
    #[arg(long, conflicts_with = "quiet")]
    pub tee: bool,

    /// Do not show rank output on the console (it still goes to --log-dir
    /// files, and the failed rank's last lines are still printed).
    #[arg(short, long)]
    pub quiet: bool,

    /// Seconds ranks get to exit after SIGTERM before they are sent SIGKILL.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_seconds)]
    pub grace_period: Duration,

    /// Once every other rank of this node has exited successfully, a rank
    /// still running after this many seconds is stopped and reported as the
    /// failure (exit code 124). 0: wait for it forever, as torchrun does.
    #[arg(long, alias = "exit_barrier_timeout", value_name = "SECS", default_value = "300", value_parser = parse_seconds)]
    pub exit_barrier_timeout: Duration,

    /// Peer timeout of the collectives (how long a rank waits for another in
    /// a collective or at rendezvous before failing with an error naming
    /// it), passed to ranks as SHAMPOO_COMM_TIMEOUT. Default: the ranks'
    /// own (300 s, or SHAMPOO_COMM_TIMEOUT if set).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_seconds)]
    pub comm_timeout: Option<Duration>,

    /// torchrun's rendezvous backend: `c10d` or `static`, which both mean what
    /// shampoo-run does (rank 0 hosts the store at MASTER_ADDR:MASTER_PORT);
    /// other backends are refused.
    #[arg(long, alias = "rdzv_backend", value_name = "NAME")]
    pub rdzv_backend: Option<String>,

    /// torchrun's rendezvous endpoint HOST[:PORT]: the same as --master-addr
    /// HOST --master-port PORT.
    #[arg(long, alias = "rdzv_endpoint", value_name = "HOST[:PORT]")]
    pub rdzv_endpoint: Option<String>,

    /// torchrun's rendezvous id: the same as --run-id.
    #[arg(long, alias = "rdzv_id", value_name = "ID")]
    pub rdzv_id: Option<String>,

    /// torchrun's rendezvous options: not supported (refused, with what to
    /// use instead).
    #[arg(long, alias = "rdzv_conf", value_name = "KEY=VALUE,...")]
    pub rdzv_conf: Option<String>,

    /// Give each rank exactly one GPU: CUDA_VISIBLE_DEVICES is set to the
    /// LOCAL_RANK-th visible device, so every rank sees its GPU as device 0.
    #[arg(long)]
    pub bind_gpus: bool,

    /// Value of TORCHELASTIC_RUN_ID. Default: SLURM_JOB_ID under Slurm, else a
    /// fresh id per launch (give the same value on every node if ranks use it).
    #[arg(long, alias = "run_id", value_name = "ID")]
    pub run_id: Option<String>,

    /// Ignore all SLURM_* variables, as if not running under Slurm.
    #[arg(long)]
    pub no_slurm: bool,

    /// Lines of the failed rank's output to print with the error.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub tail_lines: usize,

    /// Print the launch plan and every local rank's environment, then exit
    /// without starting anything.
    #[arg(long)]
    pub dry_run: bool,

    /// More launcher messages on stderr (-v: debug, -vv: trace).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,

    /// The program to run on every rank, and its arguments. Everything after
    /// PROGRAM is passed to it unchanged; `--` before PROGRAM is optional.
    #[arg(
        value_name = "PROGRAM",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    pub command: Vec<OsString>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<RawArgs, clap::Error> {
        RawArgs::try_parse_from(std::iter::once("shampoo-run").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        RawArgs::command().debug_assert();
    }

    #[test]
    fn nproc_spec_parses_numbers_and_keywords() {
        assert_eq!("gpu".parse(), Ok(NprocSpec::Gpu));
        assert_eq!("CPU".parse(), Ok(NprocSpec::Cpu));
        assert_eq!("auto".parse(), Ok(NprocSpec::Auto));
        assert_eq!(
            "4".parse(),
            Ok(NprocSpec::Count(NonZeroU32::new(4).unwrap()))
        );
        assert!("0".parse::<NprocSpec>().is_err());
        assert!("-1".parse::<NprocSpec>().is_err());
        assert!("gpus".parse::<NprocSpec>().is_err());
    }

    #[test]
    fn program_arguments_are_passed_through_untouched() {
        let a = parse(&["--nproc-per-node", "2", "train", "--lr", "0.1", "-v"]).unwrap();
        assert_eq!(a.command, ["train", "--lr", "0.1", "-v"]);
        assert_eq!(a.verbose, 0);
        let b = parse(&["--", "train", "--nnodes", "3"]).unwrap();
        assert_eq!(b.command, ["train", "--nnodes", "3"]);
        assert_eq!(b.nnodes, None);
    }

    #[test]
    fn torchrun_underscore_spellings_are_accepted() {
        let a = parse(&["--nproc_per_node=2", "--master_port", "1234", "x"]).unwrap();
        assert_eq!(
            a.nproc_per_node,
            Some(NprocSpec::Count(NonZeroU32::new(2).unwrap()))
        );
        assert_eq!(a.master_port, Some(1234));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["--nnodes", "1:2", "x"][..],
            &["--nnodes", "0", "x"],
            &["--master-port", "0", "x"],
            &["--master-port", "70000", "x"],
            &["--grace-period", "-1", "x"],
            &["--nproc-per-node", "many", "x"],
            &["--tee", "--quiet", "x"],
            &["--no-such-flag", "x"],
            &[],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }

    #[test]
    fn grace_period_accepts_fractions() {
        let a = parse(&["--grace-period", "0.25", "x"]).unwrap();
        assert_eq!(a.grace_period, Duration::from_millis(250));
        let d = parse(&["x"]).unwrap();
        assert_eq!(d.grace_period, Duration::from_secs(3));
    }
}
