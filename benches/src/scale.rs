//! `shampoo-bench scale`: how the per-rank optimizer time and state shrink
//! as data-parallel ranks are added, and how many bytes a step moves.
//!
//! For each world size `W` the blocks are assigned exactly as
//! `shampoo_dist::DistributedShampoo` assigns them; then every rank's share
//! is built and stepped **alone, one rank after the other**, on a backend of
//! its own (the CPU backend on one thread, or the CUDA backend), so the
//! figures are what a rank with a core or a GPU of its own spends and holds:
//!
//! - step times: the median of preconditioned steps without a root inverse,
//!   and one step that recomputes every root, of the slowest rank (the
//!   device is synchronised before the clock is read);
//! - state: the persistent optimizer state of each rank
//!   (`Shampoo::state_bytes`, what its checkpoint holds), its largest over
//!   the ranks against the ideal `1/W` of the `W = 1` total;
//! - device memory (CUDA): what building the rank's optimizer took from the
//!   device (`cuMemGetInfo` before and after: state plus scratch);
//! - communication: what one rank receives per step, the gradient
//!   all-reduce plus the other ranks' direction slots
//!   (`DistributedShampoo::comm_bytes_per_step`), in full precision and
//!   bf16.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use shampoo_core::backend::Backend;
use shampoo_core::layout::Layout;
use shampoo_core::{DType, HostView, Shampoo, ShampooConfig};
use shampoo_dist::assign::{assign_blocks, block_costs, slots};

use crate::shapes::Tensor;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ScaleBench {
    /// Shape set name.
    pub set: String,
    /// Its tensors.
    pub tensors: Vec<Tensor>,
    /// Optimizer config.
    pub config: ShampooConfig,
    /// World sizes.
    pub ranks: Vec<usize>,
    /// Timed preconditioned steps without root inverse per rank.
    pub steps: usize,
}

/// The config of the benchmark: `max_preconditioner_dim` `max_dim`, roots
/// every 4 steps from step 4, Adam grafting.
pub fn config(max_dim: usize) -> Result<ShampooConfig> {
    Ok(ShampooConfig::from_json(&format!(
        r#"{{"lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1e-12,
            "max_preconditioner_dim": {max_dim}, "precondition_frequency": 4,
            "start_preconditioning_step": 4,
            "grafting": {{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}}}"#
    ))?)
}

/// One world size.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Ranks.
    pub world: usize,
    /// Fewest and most blocks of a rank.
    pub blocks: (usize, usize),
    /// Slowest rank's median step without root inverse (ms).
    pub step_ms: f64,
    /// The `W = 1` total over `W` (ms).
    pub ideal_step_ms: f64,
    /// Slowest rank's step with every root inverse (ms).
    pub root_ms: f64,
    /// The `W = 1` total over `W` (ms).
    pub ideal_root_ms: f64,
    /// Largest per-rank state (bytes).
    pub state_bytes: usize,
    /// The `W = 1` state over `W` (bytes).
    pub ideal_state_bytes: f64,
    /// `state_bytes / ideal_state_bytes`.
    pub state_ratio: f64,
    /// Largest per-rank device memory taken by the optimizer (bytes; CUDA).
    pub device_bytes: Option<usize>,
    /// Bytes one rank receives per step, full precision.
    pub comm_full_bytes: usize,
    /// The same with bf16 directions.
    pub comm_bf16_bytes: usize,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Backend name.
    pub backend: String,
    /// Shape set.
    pub set: String,
    /// Parameters.
    pub params: usize,
    /// Elements.
    pub numel: usize,
    /// Blocks.
    pub blocks: usize,
    /// `max_preconditioner_dim`.
    pub max_dim: usize,
    /// One row per world size.
    pub rows: Vec<ScaleRow>,
}

/// What one rank's share measured.
struct RankFigures {
    step: Duration,
    root: Duration,
    state: usize,
    device: Option<usize>,
    blocks: usize,
}

/// Deterministic values for parameters (`scale` 1e-3) and gradients (1e-2).
fn fill(n: usize, period: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i % period) as f32 - (period / 2) as f32) * scale)
        .collect()
}

/// Builds and steps the share `owned` alone.
fn time_rank<B: Backend>(
    bench: &ScaleBench,
    shapes: &[Vec<usize>],
    owned: &dyn Fn(usize) -> bool,
    backend: B,
    memory: &dyn Fn(&B) -> Result<Option<usize>>,
) -> Result<RankFigures> {
    // Parameters and gradients first, so that the memory difference is the
    // optimizer's alone.
    let upload = |len: usize, period: usize, scale: f32| -> Result<B::Buffer> {
        let mut b = backend.alloc(DType::F32, len)?;
        backend.upload(
            backend.view_mut(&mut b),
            HostView::F32(&fill(len, period, scale)),
        )?;
        Ok(b)
    };
    let lens: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let params = lens
        .iter()
        .map(|&n| upload(n, 97, 1e-3))
        .collect::<Result<Vec<_>>>()?;
    let grads = lens
        .iter()
        .map(|&n| upload(n, 89, 1e-2))
        .collect::<Result<Vec<_>>>()?;
    backend.synchronize()?;
    let before = memory(&backend)?;
    let mut opt =
        Shampoo::with_owned_blocks(bench.config.clone(), shapes, DType::F32, backend, owned)?;
    opt.backend().synchronize()?;
    let device = match (before, memory(opt.backend())?) {
        (Some(b), Some(a)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let be = opt.backend();
    let pv: Vec<B::View<'_>> = params.iter().map(|b| be.view(b)).collect();
    let gv: Vec<Option<B::View<'_>>> = grads.iter().map(|b| Some(be.view(b))).collect();
    let mut plain = Vec::new();
    let mut root = Duration::ZERO;
    // Roots every `precondition_frequency` steps from that step; steps
    // before the first root inverse are grafting alone and not timed.
    while plain.len() < bench.steps || root.is_zero() {
        let has_root = opt.next_step_has_root_inverse();
        let t = Instant::now();
        opt.compute_directions(&pv, &gv)?;
        opt.backend().synchronize()?;
        let dt = t.elapsed();
        if has_root {
            root = dt.max(Duration::from_nanos(1));
        } else if !root.is_zero() {
            plain.push(dt);
        }
    }
    plain.sort();
    Ok(RankFigures {
        step: plain[plain.len() / 2],
        root,
        state: opt.state_bytes(),
        device,
        blocks: opt.layout().groups.iter().map(|g| g.count()).sum(),
    })
}

/// Runs the benchmark on backends from `make` (one per rank share), with
/// `memory` giving the device's free bytes (`None` on the host).
pub fn run<B: Backend>(
    bench: &ScaleBench,
    make: impl Fn() -> Result<B>,
    memory: impl Fn(&B) -> Result<Option<usize>>,
) -> Result<ScaleReport> {
    let shapes: Vec<Vec<usize>> = bench.tensors.iter().map(|t| t.shape.clone()).collect();
    let full = Layout::new(&shapes, &bench.config, &|_| true)?;
    let costs = block_costs(&full, &bench.config);
    let mut rows = Vec::new();
    let mut backend_name = String::new();
    let mut base: Option<(Duration, Duration, usize)> = None;
    let numel = full.numel();
    for &w in &bench.ranks {
        if w == 0 {
            bail!("world sizes must be at least 1");
        }
        let owner = assign_blocks(&costs, w);
        let mut per = Vec::new();
        for r in 0..w {
            let be = make()?;
            backend_name = be.name();
            per.push(time_rank(
                bench,
                &shapes,
                &|id| owner[id] == r,
                be,
                &memory,
            )?);
            tracing::info!(w, r, "timed");
        }
        let (b_step, b_root, b_state) = *base.get_or_insert_with(|| {
            (
                per.iter().map(|p| p.step).sum(),
                per.iter().map(|p| p.root).sum(),
                per.iter().map(|p| p.state).sum(),
            )
        });
        let slot = slots(&shapes, &bench.config, &owner, w)?.len;
        let comm = |elem: usize| {
            if w == 1 {
                0
            } else {
                4 * numel + (w - 1) * slot * elem
            }
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let state = per.iter().map(|p| p.state).max().unwrap_or(0);
        let ideal_state = b_state as f64 / w as f64;
        rows.push(ScaleRow {
            world: w,
            blocks: (
                per.iter().map(|p| p.blocks).min().unwrap_or(0),
                per.iter().map(|p| p.blocks).max().unwrap_or(0),
            ),
            step_ms: ms(per.iter().map(|p| p.step).max().unwrap_or_default()),
            ideal_step_ms: ms(b_step) / w as f64,
            root_ms: ms(per.iter().map(|p| p.root).max().unwrap_or_default()),
            ideal_root_ms: ms(b_root) / w as f64,
            state_bytes: state,
            ideal_state_bytes: ideal_state,
            state_ratio: state as f64 / ideal_state,
            device_bytes: per.iter().filter_map(|p| p.device).max(),
            comm_full_bytes: comm(4),
            comm_bf16_bytes: comm(2),
        });
    }
    Ok(ScaleReport {
        backend: backend_name,
        set: bench.set.clone(),
        params: shapes.len(),
        numel,
        blocks: full.blocks.len(),
        max_dim: bench.config.max_preconditioner_dim,
        rows,
    })
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / (1u64 << 20) as f64)
}

/// The report as a Markdown table with a header line.
pub fn render(r: &ScaleReport) -> String {
    let mut s = format!(
        "shape set {}: {} parameters, {} elements, {} blocks (max_preconditioner_dim {}); \
         {}, each rank's share built and stepped alone\n\n",
        r.set, r.params, r.numel, r.blocks, r.max_dim, r.backend
    );
    s.push_str(
        "| W | blocks/rank | step/rank, max (ms) | ideal T/W | with root inverse, max (ms) | ideal | state/rank, max (MiB) | ideal | max/ideal | device memory/rank, max (MiB) | comm/step full (MiB) | comm/step bf16 (MiB) |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {}-{} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.3} | {} | {} | {} |\n",
            row.world,
            row.blocks.0,
            row.blocks.1,
            row.step_ms,
            row.ideal_step_ms,
            row.root_ms,
            row.ideal_root_ms,
            mib(row.state_bytes as f64),
            mib(row.ideal_state_bytes),
            row.state_ratio,
            row.device_bytes
                .map_or_else(|| "-".to_string(), |b| mib(b as f64)),
            mib(row.comm_full_bytes as f64),
            mib(row.comm_bf16_bytes as f64),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_rank_state_follows_one_over_w_on_the_cpu() {
        let bench = ScaleBench {
            set: "cpu_small".into(),
            tensors: crate::shapes::load("cpu_small", None).unwrap(),
            config: config(64).unwrap(),
            ranks: vec![1, 2, 3],
            steps: 1,
        };
        let r = run(
            &bench,
            || Ok(shampoo_core::CpuBackend::new(1)?),
            |_| Ok(None),
        )
        .unwrap();
        assert_eq!(r.rows.len(), 3);
        assert_eq!(r.rows[0].state_ratio, 1.0);
        for row in &r.rows {
            assert!(
                row.state_ratio <= 1.10,
                "W {}: {}",
                row.world,
                row.state_ratio
            );
            assert!(row.device_bytes.is_none());
        }
        assert_eq!(r.rows[0].comm_full_bytes, 0);
        assert!(r.rows[1].comm_bf16_bytes < r.rows[1].comm_full_bytes);
        let table = render(&r);
        assert_eq!(table.lines().filter(|l| l.starts_with("| ")).count(), 4);
    }
}
