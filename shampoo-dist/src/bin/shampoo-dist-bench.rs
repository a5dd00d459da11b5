//! `shampoo-dist-bench scale`: how the per-rank optimizer time and state
//! shrink as ranks are added, and how many bytes a step communicates.
//!
//! For each world size `W`, blocks are assigned exactly as
//! [`DistributedShampoo`] assigns them; then every rank's share is built and
//! stepped **in isolation, one rank after the other, each on one CPU
//! thread**, so the times are what a rank with a core of its own spends on
//! its blocks (a machine with fewer cores than ranks cannot run them
//! concurrently without distorting the times). Bytes communicated per step
//! (received by one rank from the others) come from a real
//! [`DistributedShampoo`] per rank (in-process transport).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use shampoo_core::layout::Layout;
use shampoo_core::{CpuBackend, DType, HostView, Shampoo, ShampooConfig};
use shampoo_dist::assign::{assign_blocks, block_costs};
use shampoo_dist::{
    CommDType, CommOptions, DistOptions, DistributedShampoo, in_process, state_bytes,
};

const SHAPE_SETS: &str = include_str!("../../../benches/data/shape_sets.json");

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Scaling benchmark of distributed Shampoo on CPU ranks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Per-rank optimizer time and state against the ideal 1/W, and bytes
    /// communicated per step in f32 and bf16.
    Scale {
        /// Shape set of benches/data/shape_sets.json.
        #[arg(long, default_value = "resnet18")]
        shapes: String,
        /// Another shape-sets file.
        #[arg(long)]
        shape_file: Option<PathBuf>,
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
    },
}

#[derive(Deserialize)]
struct Entry {
    shape: Vec<usize>,
}

fn load_shapes(set: &str, file: Option<&PathBuf>) -> Result<Vec<Vec<usize>>> {
    let text = match file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => SHAPE_SETS.to_string(),
    };
    let sets: BTreeMap<String, Vec<Entry>> = serde_json::from_str(&text)
        .context("shape sets: expected {\"set\": [{\"name\", \"shape\"}]}")?;
    match sets.get(set) {
        Some(e) => Ok(e.iter().map(|e| e.shape.clone()).collect()),
        None => bail!(
            "no shape set {set:?}; available: {}",
            sets.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// One rank's share, stepped alone: (median step without root inverse,
/// step with root inverse, state bytes, blocks).
fn time_rank(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    owned: &dyn Fn(usize) -> bool,
    steps: usize,
) -> Result<(Duration, Duration, usize, usize)> {
    let mut opt = Shampoo::with_owned_blocks(
        config.clone(),
        shapes,
        DType::F32,
        CpuBackend::new(1)?,
        owned,
    )?;
    let params: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
                .collect()
        })
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|i| ((i % 89) as f32 - 44.0) * 1e-2)
                .collect()
        })
        .collect();
    let pv: Vec<HostView<'_>> = params.iter().map(|p| HostView::F32(p)).collect();
    let gv: Vec<Option<HostView<'_>>> = grads.iter().map(|g| Some(HostView::F32(g))).collect();
    let mut plain = Vec::new();
    let mut root = Duration::ZERO;
    // The config recomputes roots every `precondition_frequency` steps,
    // starting at that step.
    while plain.len() < steps || root.is_zero() {
        let has_root = opt.next_step_has_root_inverse();
        let t = Instant::now();
        opt.compute_directions(&pv, &gv)?;
        let dt = t.elapsed();
        if has_root {
            root = dt.max(Duration::from_nanos(1));
        } else if !root.is_zero() {
            // Preconditioned steps only: those before the first root inverse
            // are grafting alone.
            plain.push(dt);
        }
    }
    plain.sort();
    let blocks = opt.layout().groups.iter().map(|g| g.count()).sum();
    Ok((plain[plain.len() / 2], root, state_bytes(&opt), blocks))
}

/// Bytes received per step from other ranks, from real optimizers.
fn comm_bytes(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    world: usize,
    comm_dtype: CommDType,
) -> Result<usize> {
    let comms = in_process(world, &CommOptions::default());
    let results: Vec<Result<usize>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c: Arc<dyn shampoo_dist::Communicator>| {
                s.spawn(move || -> Result<usize> {
                    let opt = DistributedShampoo::new(
                        config.clone(),
                        shapes,
                        DType::F32,
                        CpuBackend::new(1)?,
                        c,
                        DistOptions {
                            comm_dtype,
                            ..DistOptions::default()
                        },
                    )?;
                    Ok(opt.comm_bytes_per_step())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("rank thread panicked")))
            })
            .collect()
    });
    results.into_iter().next().context("no ranks")?
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn mib(b: usize) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn scale(
    set: &str,
    file: Option<&PathBuf>,
    ranks: &[usize],
    max_dim: usize,
    steps: usize,
) -> Result<()> {
    let shapes = load_shapes(set, file)?;
    let config = ShampooConfig::from_json(&format!(
        r#"{{"lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1e-12,
            "max_preconditioner_dim": {max_dim}, "precondition_frequency": 4,
            "start_preconditioning_step": 4,
            "grafting": {{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}}}"#
    ))?;
    let full = Layout::new(&shapes, &config, &|_| true)?;
    let costs = block_costs(&full, &config);
    println!(
        "shape set {set}: {} parameters, {} elements, {} blocks (max_preconditioner_dim {max_dim}); \
         cpu backend, 1 thread per rank, ranks timed one after the other",
        shapes.len(),
        full.numel(),
        full.blocks.len()
    );
    println!();
    println!(
        "| W | blocks/rank | optimizer step/rank, max (ms) | ideal T/W | with root inverse, max (ms) | ideal | state/rank, max (MiB) | ideal | comm/step f32 (MiB) | comm/step bf16 (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut base: Option<(Duration, Duration, usize)> = None;
    for &w in ranks {
        if w == 0 {
            bail!("world sizes must be at least 1");
        }
        let owner = assign_blocks(&costs, w);
        let mut per = Vec::new();
        for r in 0..w {
            let owned = |id: usize| owner[id] == r;
            per.push(time_rank(&config, &shapes, &owned, steps)?);
            tracing::info!(w, r, "timed");
        }
        let plain = per.iter().map(|p| p.0).max().unwrap_or_default();
        let root = per.iter().map(|p| p.1).max().unwrap_or_default();
        let state = per.iter().map(|p| p.2).max().unwrap_or_default();
        let bmin = per.iter().map(|p| p.3).min().unwrap_or_default();
        let bmax = per.iter().map(|p| p.3).max().unwrap_or_default();
        // Ideal: the first world size's total work (summed over its ranks)
        // divided by W.
        let (b1_plain, b1_root, b1_state) = *base.get_or_insert_with(|| {
            (
                per.iter().map(|p| p.0).sum::<Duration>(),
                per.iter().map(|p| p.1).sum::<Duration>(),
                per.iter().map(|p| p.2).sum::<usize>(),
            )
        });
        let total = comm_bytes(&config, &shapes, w, CommDType::F32)?;
        let bf16 = comm_bytes(&config, &shapes, w, CommDType::Bf16)?;
        println!(
            "| {w} | {bmin}-{bmax} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ms(plain),
            ms(b1_plain / w as u32),
            ms(root),
            ms(b1_root / w as u32),
            mib(state),
            mib(b1_state / w),
            mib(total),
            mib(bf16),
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Scale {
            shapes,
            shape_file,
            ranks,
            max_dim,
            steps,
        } => scale(&shapes, shape_file.as_ref(), &ranks, max_dim, steps.max(1)),
    }
}
