//! `shampoo-bench`: reference parity, optimizer step timings, the
//! CPU-versus-CUDA self-check and the data-parallel scaling benchmark.
//!
//! Exit codes: 0 success; 1 a parity case over its tolerance or one that
//! could not be replayed (bad file, invalid config, unavailable backend:
//! reported with its reason, the other cases still run), a self-check
//! problem over its bound, or a rank's state over `--max-state-ratio` of
//! the ideal in `scale`; 2 usage or input error (unknown shape set,
//! invalid config, unavailable backend).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use shampoo_bench::{parity, scale, selfcheck, shapes, step};
use shampoo_core::{CpuBackend, DType, ShampooConfig};

#[derive(Parser)]
#[command(
    name = "shampoo-bench",
    version,
    about = "Shampoo reference parity and step timings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    /// faer + rayon on this machine's cores.
    Cpu,
    /// NVIDIA GPU through CUDA (needs a build with `--features cuda`).
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Replay reference trajectories (float64) and report each case's
    /// largest error, max|ours - ref| / max|ref| over steps and tensors.
    Parity {
        /// Case files (`<case>.safetensors` in the published format).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest error that passes.
        #[arg(long, default_value_t = 1e-5)]
        tolerance: f64,
        /// Backend to replay on.
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// CPU threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time optimizer steps on random gradients for a shape set.
    Step {
        /// Shape set name (cpu_small, resnet18, resnet50, gpt2_small).
        #[arg(long)]
        shapes: String,
        /// Shape sets file (default: the one built into this binary).
        #[arg(long)]
        shapes_file: Option<PathBuf>,
        /// Shampoo config (JSON, the reference schema). Give several to time
        /// them side by side in one run (a comparison table follows, with
        /// ratios to the first).
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// Parameter dtype.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Timed samples of each kind of step.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Root inverses every this many steps in the timed run.
        #[arg(long, default_value_t = 2)]
        root_every: u64,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// CPU threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Data-parallel scaling: each world size's ranks built and stepped one
    /// after the other; per-rank step time, state and device memory against
    /// the ideal 1/W, and bytes communicated per step. Exits with 1 when a
    /// rank's state exceeds --max-state-ratio times the ideal.
    Scale {
        /// Shape set name (cpu_small, resnet18, resnet50, gpt2_small).
        #[arg(long, default_value = "resnet18")]
        shapes: String,
        /// Shape sets file (default: the one built into this binary).
        #[arg(long)]
        shapes_file: Option<PathBuf>,
        /// World sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        ranks: Vec<usize>,
        /// max_preconditioner_dim.
        #[arg(long, default_value_t = 256)]
        max_dim: usize,
        /// Timed preconditioned steps without root inverse per rank (median
        /// reported).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Backend of every rank (cpu: one thread per rank).
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Largest state per rank over the ideal 1/W that passes.
        #[arg(long, default_value_t = 1.1)]
        max_state_ratio: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Count what a CUDA step would issue (kernel launches, library calls,
    /// copies, host waits), per phase, without a GPU: the optimizer runs on
    /// the CUDA backend's planner. Ends with the line `launches per step
    /// without root inverse: N (G shape groups)`.
    Plan {
        /// Shape set name (cpu_small, resnet18, resnet50, gpt2_small).
        #[arg(long)]
        shapes: String,
        /// Shape sets file (default: the one built into this binary).
        #[arg(long)]
        shapes_file: Option<PathBuf>,
        /// Shampoo config (JSON, the reference schema; default:
        /// benches/configs/resnet50_train.json, built in: Adam grafting,
        /// max_preconditioner_dim 1024, root inverses every 100 steps).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Parameter dtype.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the CPU and CUDA backends side by side on random problems of
    /// every shape class and report the largest difference of a step
    /// (bounds and their justification: docs/cuda-backend.md).
    Selfcheck {
        /// Parameter dtype.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Steps per problem (root inverses every 2 steps from step 8).
        #[arg(long, default_value_t = 12)]
        steps: usize,
        /// Largest difference that passes (default: 5e-3 for f32, 1e-9 for
        /// f64).
        #[arg(long)]
        bound: Option<f64>,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// CPU threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The documented selfcheck bound of a dtype (docs/cuda-backend.md).
fn default_bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 5e-3,
        DType::F64 => 1e-9,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_unavailable() -> anyhow::Error {
    anyhow::anyhow!(
        "backend cuda: this binary was built without CUDA support; rebuild with `--features cuda`"
    )
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shampoo-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Parity {
            files,
            tolerance,
            backend,
            threads,
            json,
        } => {
            let mut failed = 0;
            if !json {
                println!(
                    "{:<30} {:>6} {:>12}  {:<6} worst at",
                    "case", "steps", "max error", "result"
                );
            }
            for f in &files {
                // A case that cannot run is reported as failed, with its
                // reason, and the others still run.
                let r = match backend {
                    BackendKind::Cpu => CpuBackend::new(threads)
                        .map_err(anyhow::Error::from)
                        .and_then(|b| parity::run_case(f, tolerance, b)),
                    #[cfg(feature = "cuda")]
                    BackendKind::Cuda => shampoo_core::CudaBackend::new(0)
                        .map_err(anyhow::Error::from)
                        .and_then(|b| parity::run_case(f, tolerance, b)),
                    #[cfg(not(feature = "cuda"))]
                    BackendKind::Cuda => Err(cuda_unavailable()),
                }
                .unwrap_or_else(|e| parity::CaseResult::failed(f, format!("{e:#}")));
                failed += usize::from(!r.pass);
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else if let Some(e) = &r.error {
                    println!("{:<30} {:>6} {:>12}  {:<6} {e}", r.name, "-", "-", "FAIL");
                } else {
                    println!(
                        "{:<30} {:>6} {:>12.3e}  {:<6} step {} {}",
                        r.name,
                        r.steps,
                        r.max_error,
                        if r.pass { "ok" } else { "FAIL" },
                        r.worst_at.0,
                        r.worst_at.1
                    );
                }
            }
            if !json {
                println!(
                    "{} of {} cases within {tolerance:e}",
                    files.len() - failed,
                    files.len()
                );
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Step {
            shapes: set,
            shapes_file,
            config,
            dtype,
            steps,
            warmup,
            root_every,
            backend,
            threads,
            json,
        } => {
            if steps == 0 || root_every < 2 {
                bail!("--steps must be >= 1 and --root-every >= 2");
            }
            let tensors = shapes::load(&set, shapes_file.as_deref())?;
            let mut benches = Vec::new();
            for path in &config {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let config = ShampooConfig::from_json(&text)
                    .with_context(|| format!("config {}", path.display()))?;
                let name = path
                    .file_stem()
                    .map_or_else(|| "config".into(), |s| s.to_string_lossy().into_owned());
                let bench = step::StepBench {
                    tensors: tensors.clone(),
                    set: set.clone(),
                    config,
                    dtype,
                    steps,
                    warmup,
                    root_every,
                };
                benches.push((name, bench));
            }
            let mut reports = Vec::new();
            for (name, bench) in &benches {
                let report = match backend {
                    BackendKind::Cpu => step::run(bench, || Ok(CpuBackend::new(threads)?))?,
                    #[cfg(feature = "cuda")]
                    BackendKind::Cuda => {
                        let mut r = step::run(bench, || Ok(shampoo_core::CudaBackend::new(0)?))?;
                        r.launches = Some(shampoo_bench::plan::launches(bench, &r)?);
                        r
                    }
                    #[cfg(not(feature = "cuda"))]
                    BackendKind::Cuda => return Err(cuda_unavailable()),
                };
                if !json {
                    if benches.len() > 1 {
                        println!("== {name}");
                    }
                    print!("{}", step::render(&report));
                }
                reports.push((name.clone(), report));
            }
            if json {
                if reports.len() == 1 {
                    println!("{}", serde_json::to_string_pretty(&reports[0].1)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                }
            } else if reports.len() > 1 {
                print!("{}", step::compare(&reports));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale {
            shapes: set,
            shapes_file,
            ranks,
            max_dim,
            steps,
            backend,
            device,
            max_state_ratio,
            json,
        } => {
            let bench = scale::ScaleBench {
                tensors: shapes::load(&set, shapes_file.as_deref())?,
                set,
                config: scale::config(max_dim)?,
                ranks,
                steps: steps.max(1),
            };
            let report = match backend {
                BackendKind::Cpu => scale::run(&bench, || Ok(CpuBackend::new(1)?), |_| Ok(None))?,
                #[cfg(feature = "cuda")]
                BackendKind::Cuda => scale::run(
                    &bench,
                    || Ok(shampoo_core::CudaBackend::new(device)?),
                    |b| Ok(Some(b.memory_info()?.0)),
                )?,
                #[cfg(not(feature = "cuda"))]
                BackendKind::Cuda => {
                    let _ = device;
                    return Err(cuda_unavailable());
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", scale::render(&report));
            }
            let over: Vec<String> = report
                .rows
                .iter()
                .filter(|r| r.state_ratio > max_state_ratio)
                .map(|r| format!("W = {}: {:.3}", r.world, r.state_ratio))
                .collect();
            if over.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "shampoo-bench: state per rank over {max_state_ratio} times the ideal 1/W: {}",
                    over.join(", ")
                );
                Ok(ExitCode::from(1))
            }
        }
        Command::Plan {
            shapes: set,
            shapes_file,
            config,
            dtype,
            json,
        } => {
            let tensors = shapes::load(&set, shapes_file.as_deref())?;
            let config = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    ShampooConfig::from_json(&text)
                        .with_context(|| format!("config {}", path.display()))?
                }
                None => ShampooConfig::from_json(include_str!("../configs/resnet50_train.json"))?,
            };
            #[cfg(feature = "cuda")]
            {
                let report = shampoo_bench::plan::run(&set, &tensors, &config, dtype)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", shampoo_bench::plan::render(&report));
                }
                Ok(ExitCode::SUCCESS)
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (tensors, config, dtype, json);
                Err(cuda_unavailable())
            }
        }
        Command::Selfcheck {
            dtype,
            steps,
            bound,
            device,
            threads,
            json,
        } => {
            let bound = bound.unwrap_or_else(|| default_bound(dtype));
            if steps == 0 {
                bail!("--steps must be >= 1");
            }
            #[cfg(feature = "cuda")]
            {
                let results = selfcheck::run(
                    || Ok(CpuBackend::new(threads)?),
                    || Ok(shampoo_core::CudaBackend::new(device)?),
                    dtype,
                    steps,
                    bound,
                )?;
                report_selfcheck(&results, dtype, bound, json)
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (device, threads, json, bound);
                Err(cuda_unavailable())
            }
        }
    }
}

/// Prints selfcheck results; exit code 1 when one is over the bound.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn report_selfcheck(
    results: &[selfcheck::CheckResult],
    dtype: DType,
    bound: f64,
    json: bool,
) -> Result<ExitCode> {
    let failed = results.iter().filter(|r| !r.pass).count();
    if json {
        for r in results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<10} {:<30} {:>6} {:>12}  {:<6} worst at",
            "class", "variant", "steps", "max diff", "result"
        );
        for r in results {
            println!(
                "{:<10} {:<30} {:>6} {:>12.3e}  {:<6} step {}",
                r.class,
                r.variant,
                r.steps,
                r.max_difference,
                if r.pass { "ok" } else { "FAIL" },
                r.worst_step
            );
        }
        let worst = results
            .iter()
            .map(|r| r.max_difference)
            .fold(0.0f64, |m, x| {
                if x.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(x)
                }
            });
        println!(
            "largest difference {worst:.3e} ({dtype}); {} of {} within {bound:e}",
            results.len() - failed,
            results.len()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
