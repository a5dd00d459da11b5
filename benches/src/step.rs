//! `shampoo-bench step`: optimizer step timings on random gradients.
//!
//! Three optimizers run on the same tensors: Shampoo on steps without a root
//! inverse, Shampoo on steps that recompute every block's root inverse, and
//! the diagonal baseline (Adam grafting alone: preconditioning never
//! starts). To sample both kinds of Shampoo step, the timed run recomputes
//! root inverses every `root_every` steps (default 2); nothing else of the
//! configuration changes.

use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use shampoo_core::backend::Backend;
use shampoo_core::config::{Grafting, StartStep};
use shampoo_core::layout::Layout;
use shampoo_core::{
    BlockRootInverseStats, DType, HostView, PhaseTimes, RootInverseCounters, Shampoo, ShampooConfig,
};

use crate::shapes::Tensor;

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// Shape set name (for the report).
    pub set: String,
    /// Parameter shapes.
    pub tensors: Vec<Tensor>,
    /// The Shampoo configuration.
    pub config: ShampooConfig,
    /// Parameter dtype.
    pub dtype: DType,
    /// Timed samples of each kind of step.
    pub steps: usize,
    /// Untimed steps first (at least one with a root inverse).
    pub warmup: usize,
    /// Root inverses every this many steps in the timed run.
    pub root_every: u64,
}

/// Statistics of one kind of step, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub median_ms: f64,
    /// Fastest.
    pub min_ms: f64,
    /// Number of samples.
    pub samples: usize,
}

impl Timing {
    fn from(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Timing::default();
        }
        v.sort_by(f64::total_cmp);
        Timing {
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            median_ms: v[v.len() / 2],
            min_ms: v[0],
            samples: v.len(),
        }
    }
}

/// Phase split in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Gather and factor statistics.
    pub statistics_ms: f64,
    /// Root inverses.
    pub root_inverse_ms: f64,
    /// Grafting, filtering, preconditioning.
    pub precondition_ms: f64,
    /// Final direction and parameter update.
    pub update_ms: f64,
}

impl Phases {
    fn mean(v: &[PhaseTimes]) -> Self {
        let n = v.len().max(1) as f64;
        let ms = |f: fn(&PhaseTimes) -> std::time::Duration| {
            v.iter().map(|p| f(p).as_secs_f64()).sum::<f64>() * 1e3 / n
        };
        Phases {
            statistics_ms: ms(|p| p.statistics),
            root_inverse_ms: ms(|p| p.root_inverse),
            precondition_ms: ms(|p| p.precondition),
            update_ms: ms(|p| p.update),
        }
    }
}

/// Matrix-product work of one step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Flops {
    /// Statistics products as this crate does them (lower triangle only).
    pub statistics: f64,
    /// Statistics products as full products (the published implementation).
    pub statistics_full: f64,
    /// Preconditioning products.
    pub precondition: f64,
    /// Root reconstruction products (`X = W^T W`, lower triangle) on
    /// root-inverse steps; eigendecompositions are not counted.
    pub reconstruction: f64,
    /// Number of eigendecompositions on a root-inverse step, by size.
    pub eigh_sizes: Vec<(usize, usize)>,
}

/// The full report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Shape set.
    pub set: String,
    /// Backend description.
    pub backend: String,
    /// Parameter dtype.
    pub dtype: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters.
    pub parameters: usize,
    /// Number of blocks.
    pub blocks: usize,
    /// Number of same-shape groups.
    pub groups: usize,
    /// Shampoo steps without a root inverse.
    pub shampoo: Timing,
    /// Shampoo steps with every root inverse.
    pub shampoo_root_inverse: Timing,
    /// Adam grafting alone.
    pub diagonal: Timing,
    /// Phase split of steps without a root inverse.
    pub phases: Phases,
    /// Phase split of steps with root inverses.
    pub phases_root_inverse: Phases,
    /// Matrix-product work.
    pub flops: Flops,
    /// GFLOP/s achieved on steps without a root inverse.
    pub gflops_per_s: f64,
    /// Root-inverse failures, float64 retries and kept previous roots of
    /// the timed optimizer over all its steps (warm-up included).
    pub root_inverse: RootInverseCounters,
    /// The same per block and factor, for those with any.
    pub root_inverse_blocks: Vec<BlockRootInverseStats>,
    /// What a CUDA step issues (CUDA backend only; counted on the planner
    /// for the same configuration, see `shampoo-bench plan`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launches: Option<Launches>,
}

/// Launches of a CUDA step, and the GEMM rate they achieve.
#[derive(Debug, Clone, Serialize)]
pub struct Launches {
    /// Kernel launches, library calls and copies of a step without root
    /// inverse.
    pub per_step: usize,
    /// The same for a step with every root inverse.
    pub per_root_inverse_step: usize,
    /// Host waits in a step without root inverse.
    pub host_waits_per_step: usize,
    /// Shape groups.
    pub groups: usize,
    /// GEMM work of a step without root inverse, as issued (full products).
    pub gemm_gflop_per_step: f64,
    /// That work over the measured mean step time without root inverse.
    pub gemm_gflops_per_s: f64,
}

/// Counts the matrix-product work of a layout.
pub fn count_flops(layout: &Layout) -> Flops {
    let mut f = Flops::default();
    let mut sizes = std::collections::BTreeMap::new();
    for g in &layout.groups {
        let (count, numel) = (g.count() as f64, g.numel as f64);
        for fac in &g.factors {
            let d = fac.size as f64;
            let rest = numel / d;
            f.statistics += count * d * (d + 1.0) * rest;
            f.statistics_full += count * 2.0 * d * d * rest;
            f.precondition += count * 2.0 * d * numel;
            f.reconstruction += count * d * (d + 1.0) * d;
            *sizes.entry(fac.size).or_insert(0) += g.count();
        }
    }
    f.eigh_sizes = sizes.into_iter().rev().collect();
    f
}

struct Tensors<B: Backend> {
    params: Vec<B::Buffer>,
    grads: Vec<Vec<B::Buffer>>,
}

fn random_tensors<B: Backend>(
    b: &B,
    shapes: &[Vec<usize>],
    dtype: DType,
    sets: usize,
) -> Result<Tensors<B>> {
    let mut rng = StdRng::seed_from_u64(0x05A4_DB00);
    let mut make = |n: usize, scale: f64| -> Result<B::Buffer> {
        let host: Vec<f64> = (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
            .collect();
        let mut buf = b.alloc(dtype, n)?;
        match dtype {
            DType::F64 => b.upload(b.view_mut(&mut buf), HostView::F64(&host))?,
            DType::F32 => {
                let h: Vec<f32> = host.iter().map(|&x| x as f32).collect();
                b.upload(b.view_mut(&mut buf), HostView::F32(&h))?
            }
        }
        Ok(buf)
    };
    let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let params = numels
        .iter()
        .map(|&n| make(n, 0.1))
        .collect::<Result<Vec<_>>>()?;
    let grads = (0..sets)
        .map(|_| {
            numels
                .iter()
                .map(|&n| make(n, 1.0))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensors { params, grads })
}

/// Runs `n` steps; returns the time of each (device synchronised) and
/// whether it had a root inverse.
fn timed<B: Backend>(
    opt: &mut Shampoo<B>,
    t: &mut Tensors<B>,
    n: usize,
    profile: bool,
) -> Result<Vec<(f64, bool, PhaseTimes)>> {
    opt.set_profiling(profile);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let root = opt.next_step_has_root_inverse();
        let set = i % t.grads.len();
        let b = opt.backend();
        let grads: Vec<Option<B::View<'_>>> =
            t.grads[set].iter().map(|g| Some(b.view(g))).collect();
        let mut params: Vec<B::ViewMut<'_>> = t.params.iter_mut().map(|p| b.view_mut(p)).collect();
        b.synchronize()?;
        let start = Instant::now();
        step(opt, &mut params, &grads)?;
        opt.backend().synchronize()?;
        out.push((start.elapsed().as_secs_f64() * 1e3, root, opt.phase_times()));
    }
    Ok(out)
}

fn step<B: Backend>(
    opt: &mut Shampoo<B>,
    p: &mut [B::ViewMut<'_>],
    g: &[Option<B::View<'_>>],
) -> Result<()> {
    Ok(opt.step(p, g)?)
}

/// Times the three optimizers on backends made by `backend`.
pub fn run<B: Backend>(bench: &StepBench, backend: impl Fn() -> Result<B>) -> Result<StepReport> {
    let shapes: Vec<Vec<usize>> = bench.tensors.iter().map(|t| t.shape.clone()).collect();
    let mut cfg = bench.config.clone();
    cfg.precondition_frequency = bench.root_every;
    cfg.start_preconditioning_step = StartStep::At(bench.root_every);
    cfg.validate()?;
    // Refuse a configuration whose state cannot fit before allocating it.
    if let Some(limit) = shampoo_core::memory::host_memory_bytes() {
        let name = |i: usize| format!("tensor {}", bench.tensors[i].name);
        shampoo_core::memory::check_allocation(
            &shapes,
            &cfg,
            bench.dtype,
            limit,
            "this machine's memory",
            &name,
        )?;
    }
    let mut opt = Shampoo::new(cfg.clone(), &shapes, bench.dtype, backend()?)?;
    let backend_name = opt.backend().name();
    let mut t = random_tensors(opt.backend(), &shapes, bench.dtype, 2)?;
    let warm = bench.warmup.max(bench.root_every as usize + 1);
    timed(&mut opt, &mut t, warm, false)?;
    let runs = timed(
        &mut opt,
        &mut t,
        bench.steps * bench.root_every as usize,
        false,
    )?;
    let plain: Vec<f64> = runs.iter().filter(|r| !r.1).map(|r| r.0).collect();
    let root: Vec<f64> = runs.iter().filter(|r| r.1).map(|r| r.0).collect();
    let prof = timed(&mut opt, &mut t, 2 * bench.root_every as usize, true)?;
    let phases_plain: Vec<PhaseTimes> = prof.iter().filter(|r| !r.1).map(|r| r.2).collect();
    let phases_root: Vec<PhaseTimes> = prof.iter().filter(|r| r.1).map(|r| r.2).collect();
    let layout = opt.layout().clone();
    let root_inverse = opt.root_inverse_totals();
    let root_inverse_blocks = opt.root_inverse_stats();
    drop(opt);

    let mut diag_cfg = bench.config.clone();
    diag_cfg.start_preconditioning_step = StartStep::Never;
    if !matches!(diag_cfg.grafting, Some(Grafting::Adam { .. })) {
        diag_cfg.grafting = Some(Grafting::Adam {
            beta2: 0.999,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false,
        });
    }
    let mut diag = Shampoo::new(diag_cfg, &shapes, bench.dtype, backend()?)?;
    let mut td = random_tensors(diag.backend(), &shapes, bench.dtype, 2)?;
    timed(&mut diag, &mut td, bench.warmup.max(2), false)?;
    let diagonal: Vec<f64> = timed(&mut diag, &mut td, bench.steps, false)?
        .into_iter()
        .map(|r| r.0)
        .collect();

    let flops = count_flops(&layout);
    let shampoo = Timing::from(plain);
    let per_step = flops.statistics + flops.precondition;
    Ok(StepReport {
        set: bench.set.clone(),
        backend: backend_name,
        dtype: bench.dtype.to_string(),
        tensors: shapes.len(),
        parameters: layout.numel(),
        blocks: layout.blocks.len(),
        groups: layout.groups.len(),
        gflops_per_s: if shampoo.mean_ms > 0.0 {
            per_step / (shampoo.mean_ms * 1e-3) / 1e9
        } else {
            0.0
        },
        shampoo,
        shampoo_root_inverse: Timing::from(root),
        diagonal: Timing::from(diagonal),
        phases: Phases::mean(&phases_plain),
        phases_root_inverse: Phases::mean(&phases_root),
        flops,
        root_inverse,
        root_inverse_blocks,
        launches: None,
    })
}

/// Several configurations' reports side by side (same shapes, one run),
/// with ratios to the first.
pub fn compare(reports: &[(String, StepReport)]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let Some((base_name, base)) = reports.first() else {
        return s;
    };
    let _ = writeln!(
        s,
        "\nside by side ({} tensors of {}, {}, {}); ratios to {base_name}:",
        base.tensors, base.set, base.backend, base.dtype
    );
    let _ = writeln!(
        s,
        "{:<28} {:>10} {:>14} {:>16} {:>8} {:>10} {:>9}",
        "config", "step ms", "amortized ms", "amortization ms", "step x", "amortized x", "amort. x"
    );
    for (name, r) in reports {
        let amort = r.phases_root_inverse.root_inverse_ms;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let _ = writeln!(
            s,
            "{name:<28} {:>10.3} {:>14.3} {:>16.3} {:>8.2} {:>10.2} {:>9.2}",
            r.shampoo.mean_ms,
            r.shampoo_root_inverse.mean_ms,
            amort,
            ratio(r.shampoo.mean_ms, base.shampoo.mean_ms),
            ratio(
                r.shampoo_root_inverse.mean_ms,
                base.shampoo_root_inverse.mean_ms
            ),
            ratio(amort, base.phases_root_inverse.root_inverse_ms),
        );
    }
    let _ = writeln!(
        s,
        "(step: a step without amortized work; amortized: a step that recomputes every block's root inverse, eigenpairs or eigenbasis; amortization: that work alone, from the profiled steps)"
    );
    s
}

/// The human-readable report.
pub fn render(r: &StepReport) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "shape set {}: {} tensors, {:.2} M parameters, {} blocks in {} groups; {}, {}",
        r.set,
        r.tensors,
        r.parameters as f64 / 1e6,
        r.blocks,
        r.groups,
        r.backend,
        r.dtype
    );
    let _ = writeln!(
        s,
        "{:<34} {:>9} {:>9} {:>9} {:>8}",
        "", "mean ms", "median", "min", "samples"
    );
    for (name, t) in [
        ("shampoo, no root inverse", &r.shampoo),
        ("shampoo, every root inverse", &r.shampoo_root_inverse),
        ("diagonal (Adam grafting only)", &r.diagonal),
    ] {
        let _ = writeln!(
            s,
            "{name:<34} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            t.mean_ms, t.median_ms, t.min_ms, t.samples
        );
    }
    let f = &r.flops;
    let _ = writeln!(
        s,
        "matrix products per step: {:.3} GFLOP (statistics {:.3} with symmetry, {:.3} as full products; preconditioning {:.3}) -> {:.1} GFLOP/s",
        (f.statistics + f.precondition) / 1e9,
        f.statistics / 1e9,
        f.statistics_full / 1e9,
        f.precondition / 1e9,
        r.gflops_per_s
    );
    let sizes: Vec<String> = f
        .eigh_sizes
        .iter()
        .map(|(n, c)| format!("{c}x{n}"))
        .collect();
    let _ = writeln!(
        s,
        "root-inverse steps add {} eigendecompositions ({}) and {:.3} GFLOP of reconstruction",
        f.eigh_sizes.iter().map(|x| x.1).sum::<usize>(),
        sizes.join(", "),
        f.reconstruction / 1e9
    );
    let c = &r.root_inverse;
    let _ = writeln!(
        s,
        "root inverses: {} failures ({} kept the previous root), {} needed the float64 retry",
        c.failures, c.kept_previous, c.f64_retries
    );
    for b in r.root_inverse_blocks.iter().take(10) {
        let _ = writeln!(
            s,
            "  block {} (tensor {}, shape {:?}), dimension {}: {} failures, {} float64 retries",
            b.block, b.param, b.shape, b.dim, b.counters.failures, b.counters.f64_retries
        );
    }
    if let Some(l) = &r.launches {
        let _ = writeln!(
            s,
            "CUDA launches per step: {} without root inverse ({} shape groups, {} host waits), {} with; GEMMs issued {:.3} GFLOP per step -> {:.1} GFLOP/s achieved",
            l.per_step,
            l.groups,
            l.host_waits_per_step,
            l.per_root_inverse_step,
            l.gemm_gflop_per_step,
            l.gemm_gflops_per_s
        );
    }
    for (name, p) in [
        ("no root inverse", &r.phases),
        ("root inverse", &r.phases_root_inverse),
    ] {
        let _ = writeln!(
            s,
            "phases ({name}): statistics {:.3} ms, root inverse {:.3} ms, precondition {:.3} ms, update {:.3} ms",
            p.statistics_ms, p.root_inverse_ms, p.precondition_ms, p.update_ms
        );
    }
    s
}
