//! The least-squares fixture of the launch tests: a model trained with
//! distributed Shampoo, run as a process by `shampoo-run`.
//!
//! The launch tests start their own test executable as the program of each
//! rank, running only the ignored test `lsq_fixture` (which calls [`main`]),
//! with the fixture's arguments in `SHAMPOO_LSQ_ARGS` (separated by `\x1f`).
//!
//! Model `y = W x + b` (`W`: 16 x 24, `b`: 16, plus a parameter `unused`
//! that never gets a gradient), trained on a synthetic global batch of 24
//! examples per step, split into one contiguous shard per rank. Each rank
//! writes its final parameters (raw little-endian bytes) to
//! `OUT_DIR/rank-<R>.bin` (and its pid to `OUT_DIR/pid-<R>`).
//!
//! `--simulate-world W` runs one process without any communicator that
//! computes the same `W` shard gradients, averages them like the transports
//! do and steps the core optimizer: its `reference.bin` must equal every
//! rank's file bitwise.
//!
//! Failure injection: `--fail-rank R --fail-step S --fail-mode
//! exit3|sigkill|hang`, and `--mismatch-rank R` (that rank builds its
//! optimizer for other shapes).
//!
//! Exit codes: 0 success, 1 any error (printed as `lsq: error: ...`); a rank
//! whose peer died waits 0.5 s before exiting, so that the launcher reports
//! the dead peer as the root cause.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};
use shampoo_dist::{
    CommDType, CommOptions, DistOptions, DistributedShampoo, communicator_from_env,
    mean_in_rank_order,
};

/// The variable holding the fixture's arguments.
pub const ARGS_VAR: &str = "SHAMPOO_LSQ_ARGS";
/// Separator of the arguments in [`ARGS_VAR`].
pub const SEP: char = '\x1f';

const LOST_PEER_DELAY_MS: u64 = 500;
const D_OUT: usize = 16;
const D_IN: usize = 24;
const BATCH: usize = 24;
const CONFIG: &str = r#"{"lr": 0.02, "betas": [0.9, 0.999], "epsilon": 1e-8,
    "max_preconditioner_dim": 8, "precondition_frequency": 4,
    "start_preconditioning_step": 4,
    "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailMode {
    Exit3,
    Sigkill,
    Hang,
}

#[derive(Debug)]
struct Args {
    steps: u64,
    out_dir: PathBuf,
    simulate_world: Option<usize>,
    timeout: f64,
    comm_dtype: CommDType,
    fail_rank: Option<usize>,
    fail_step: u64,
    fail_mode: FailMode,
    mismatch_rank: Option<usize>,
}

fn parse(list: &[String]) -> Result<Args, String> {
    let mut a = Args {
        steps: 12,
        out_dir: PathBuf::new(),
        simulate_world: None,
        timeout: 300.0,
        comm_dtype: CommDType::Full,
        fail_rank: None,
        fail_step: 3,
        fail_mode: FailMode::Exit3,
        mismatch_rank: None,
    };
    let mut it = list.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--steps" => a.steps = num(v)?,
            "--out-dir" => a.out_dir = PathBuf::from(v),
            "--simulate-world" => a.simulate_world = Some(num(v)? as usize),
            "--timeout" => a.timeout = v.parse().map_err(|e| format!("--timeout {v}: {e}"))?,
            "--comm-dtype" => a.comm_dtype = v.parse()?,
            "--fail-rank" => a.fail_rank = Some(num(v)? as usize),
            "--fail-step" => a.fail_step = num(v)?,
            "--fail-mode" => {
                a.fail_mode = match v.as_str() {
                    "exit3" => FailMode::Exit3,
                    "sigkill" => FailMode::Sigkill,
                    "hang" => FailMode::Hang,
                    m => return Err(format!("unknown --fail-mode {m}")),
                }
            }
            "--mismatch-rank" => a.mismatch_rank = Some(num(v)? as usize),
            f => return Err(format!("unknown argument {f}")),
        }
    }
    if a.out_dir.as_os_str().is_empty() {
        return Err("--out-dir is required".into());
    }
    Ok(a)
}

fn noise(seed: u64) -> f32 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    ((x >> 11) as f64 / (1u64 << 52) as f64 - 1.0) as f32
}

/// The true model the data come from.
fn truth(o: usize, i: usize) -> f32 {
    noise((o * D_IN + i) as u64 + 7)
}

/// Gradients of `0.5 * mean ||W x + b - y||^2` over shard `shard` of `world`
/// of step `step`'s batch.
fn shard_grads(
    w: &[f32],
    b: &[f32],
    step: u64,
    shard: usize,
    world: usize,
) -> (Vec<f32>, Vec<f32>, f32) {
    let (lo, hi) = (shard * BATCH / world, (shard + 1) * BATCH / world);
    let mut gw = vec![0f32; D_OUT * D_IN];
    let mut gb = vec![0f32; D_OUT];
    let mut loss = 0f32;
    for e in lo..hi {
        let x: Vec<f32> = (0..D_IN)
            .map(|i| noise(step * 1_000_003 + (e * D_IN + i) as u64))
            .collect();
        for o in 0..D_OUT {
            let mut pred = b[o];
            let mut y = 0.1 * noise(step * 7_777 + (e * D_OUT + o) as u64);
            for i in 0..D_IN {
                pred += w[o * D_IN + i] * x[i];
                y += truth(o, i) * x[i];
            }
            let r = pred - y;
            loss += 0.5 * r * r;
            gb[o] += r;
            for i in 0..D_IN {
                gw[o * D_IN + i] += r * x[i];
            }
        }
    }
    let n = (hi - lo) as f32;
    gw.iter_mut().for_each(|g| *g /= n);
    gb.iter_mut().for_each(|g| *g /= n);
    (gw, gb, loss / n)
}

fn shapes(mismatch: bool) -> Vec<Vec<usize>> {
    let d_in = if mismatch { D_IN + 1 } else { D_IN };
    vec![vec![D_OUT, d_in], vec![D_OUT], vec![4]]
}

fn init() -> Vec<Vec<f32>> {
    vec![vec![0.0; D_OUT * D_IN], vec![0.0; D_OUT], vec![1.0; 4]]
}

/// An error and whether it is a lost peer's consequence.
type Failure = (String, bool);

fn fail(e: impl std::fmt::Display) -> Failure {
    (e.to_string(), false)
}

fn dist(context: &str, e: shampoo_dist::Error) -> Failure {
    let lost = e.lost_peer().is_some();
    (format!("{context}{e}"), lost)
}

fn write_params(path: &Path, params: &[Vec<f32>]) -> Result<(), Failure> {
    let bytes: Vec<u8> = params
        .iter()
        .flat_map(|p| p.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(fail)?;
    std::fs::write(path, bytes).map_err(|e| fail(format!("writing {}: {e}", path.display())))
}

fn simulate(args: &Args, world: usize) -> Result<(), Failure> {
    let config = ShampooConfig::from_json(CONFIG).map_err(fail)?;
    let backend = CpuBackend::new(1).map_err(fail)?;
    let mut opt = Shampoo::new(config, &shapes(false), DType::F32, backend).map_err(fail)?;
    let mut params = init();
    for step in 1..=args.steps {
        let per: Vec<(Vec<f32>, Vec<f32>, f32)> = (0..world)
            .map(|r| shard_grads(&params[0], &params[1], step, r, world))
            .collect();
        let mut gw = vec![0f32; D_OUT * D_IN];
        let mut gb = vec![0f32; D_OUT];
        mean_in_rank_order(
            &per.iter().map(|p| p.0.as_slice()).collect::<Vec<_>>(),
            &mut gw,
        );
        mean_in_rank_order(
            &per.iter().map(|p| p.1.as_slice()).collect::<Vec<_>>(),
            &mut gb,
        );
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        opt.step(
            &mut views,
            &[Some(HostView::F32(&gw)), Some(HostView::F32(&gb)), None],
        )
        .map_err(fail)?;
    }
    write_params(&args.out_dir.join("reference.bin"), &params)
}

fn train(args: &Args) -> Result<(), Failure> {
    let opts = CommOptions {
        timeout: Duration::from_secs_f64(args.timeout),
    };
    let comm = communicator_from_env(&opts).map_err(|e| dist("joining the job: ", e))?;
    let (rank, world) = (comm.rank(), comm.world_size());
    std::fs::create_dir_all(&args.out_dir).map_err(fail)?;
    std::fs::write(
        args.out_dir.join(format!("pid-{rank}")),
        std::process::id().to_string(),
    )
    .map_err(fail)?;
    let config = ShampooConfig::from_json(CONFIG).map_err(fail)?;
    let opts = DistOptions {
        comm_dtype: args.comm_dtype,
        ..DistOptions::default()
    };
    let mut opt = DistributedShampoo::new(
        config,
        &shapes(args.mismatch_rank == Some(rank)),
        DType::F32,
        CpuBackend::new(1).map_err(fail)?,
        comm,
        opts,
    )
    .map_err(|e| dist("", e))?;
    let mut params = init();
    for step in 1..=args.steps {
        if args.fail_rank == Some(rank) && args.fail_step == step {
            match args.fail_mode {
                FailMode::Exit3 => {
                    eprintln!("rank {rank}: failing on purpose with exit code 3 at step {step}");
                    std::process::exit(3);
                }
                FailMode::Sigkill => {
                    eprintln!("rank {rank}: killing itself with SIGKILL at step {step}");
                    // SAFETY: kill(2) on our own pid has no memory-safety
                    // preconditions; it does not return.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                FailMode::Hang => {
                    eprintln!("rank {rank}: hanging at step {step}");
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
            }
        }
        let (mut gw, mut gb, loss) = shard_grads(&params[0], &params[1], step, rank, world);
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        opt.step(
            &mut views,
            &mut [
                Some(HostViewMut::F32(&mut gw)),
                Some(HostViewMut::F32(&mut gb)),
                None,
            ],
        )
        .map_err(|e| dist(&format!("step {step}: "), e))?;
        if rank == 0 {
            println!("step {step} loss {loss:.6}");
        }
    }
    write_params(&args.out_dir.join(format!("rank-{rank}.bin")), &params)?;
    println!(
        "rank {rank}: done, {} of {} blocks, state {} bytes, {} bytes communicated per step",
        opt.owned_blocks().len(),
        opt.assignment().len(),
        opt.state_bytes(),
        opt.comm_bytes_per_step()
    );
    Ok(())
}

/// The fixture's process: runs with the arguments of [`ARGS_VAR`] and exits.
pub fn main() -> ! {
    let list: Vec<String> = std::env::var(ARGS_VAR)
        .unwrap_or_default()
        .split(SEP)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let result = parse(&list)
        .map_err(fail)
        .and_then(|args| match args.simulate_world {
            Some(0) => Err(fail("--simulate-world must be at least 1")),
            Some(w) => simulate(&args, w),
            None => train(&args),
        });
    match result {
        Ok(()) => std::process::exit(0),
        Err((msg, lost)) => {
            eprintln!("lsq: error: {msg}");
            if lost {
                std::thread::sleep(Duration::from_millis(LOST_PEER_DELAY_MS));
            }
            std::process::exit(1);
        }
    }
}
