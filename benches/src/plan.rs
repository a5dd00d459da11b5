//! What a CUDA step issues, counted without a GPU: the optimizer runs on a
//! [`CudaBackend::planner`], which executes the CUDA backend's own code and
//! records every kernel launch, library call, copy and host wait instead of
//! issuing it. Reported per phase for the first step with a root inverse,
//! the steady step without one that follows it, and the next step with a
//! root inverse (whose tables the first uploaded).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use shampoo_core::backend::Backend;
use shampoo_core::backend::cuda::plan::{Call, Launch};
use shampoo_core::{CudaBackend, DType, Shampoo, ShampooConfig};

use crate::shapes::Tensor;

/// The launches of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepPlan {
    /// Whether the step computed root inverses.
    pub root_inverse: bool,
    /// Per phase, in order: `(phase, [(call, count)])`.
    pub phases: Vec<(String, Vec<(String, usize)>)>,
    /// Kernel launches, library calls and copies.
    pub launches: usize,
    /// Times the host waits for the device.
    pub host_waits: usize,
    /// Floating-point operations of the step's GEMMs.
    pub gemm_flops: f64,
    /// Matrix products of the step's GEMMs (over their batches).
    pub gemm_products: usize,
}

/// A shape set's plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Shape set.
    pub set: String,
    /// Parameters.
    pub tensors: usize,
    /// Blocks.
    pub blocks: usize,
    /// Groups of same-shape blocks.
    pub groups: usize,
    /// The first step with root inverses.
    pub root_inverse_step: StepPlan,
    /// The step without root inverse after it (steady state).
    pub step: StepPlan,
    /// The next step with root inverses (steady state: its tables were
    /// uploaded by the first).
    pub later_root_inverse_step: StepPlan,
}

fn summarize(calls: &[Launch], root_inverse: bool) -> StepPlan {
    let mut phases: Vec<(String, BTreeMap<String, usize>)> = Vec::new();
    for c in calls {
        if phases.last().is_none_or(|(p, _)| p != c.phase) {
            phases.push((c.phase.to_string(), BTreeMap::new()));
        }
        let (_, m) = phases.last_mut().expect("pushed above");
        *m.entry(c.call.name()).or_default() += 1;
    }
    StepPlan {
        root_inverse,
        phases: phases
            .into_iter()
            .map(|(p, m)| (p, m.into_iter().collect()))
            .collect(),
        launches: calls.iter().filter(|c| c.call.is_launch()).count(),
        host_waits: calls.iter().filter(|c| c.call == Call::HostWait).count(),
        gemm_flops: calls.iter().map(|c| c.flops).sum(),
        gemm_products: calls.iter().map(|c| c.products).sum(),
    }
}

/// Plans `tensors` under `config` in `dtype`: steps a planner until it has
/// seen a root-inverse step and the steady step without one after it.
pub fn run(
    set: &str,
    tensors: &[Tensor],
    config: &ShampooConfig,
    dtype: DType,
) -> Result<PlanReport> {
    if config.effective_frequency() == 1 {
        anyhow::bail!(
            "the config computes root inverses on every step (precondition_frequency 1, or a mode that forces it: spectral and sign descent): no step without one to plan"
        );
    }
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.shape.clone()).collect();
    let mut opt = Shampoo::new(config.clone(), &shapes, dtype, CudaBackend::planner())?;
    let be = opt.backend();
    let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let mut params = numels
        .iter()
        .map(|&n| be.alloc(dtype, n))
        .collect::<shampoo_core::Result<Vec<_>>>()?;
    let grads = numels
        .iter()
        .map(|&n| be.alloc(dtype, n))
        .collect::<shampoo_core::Result<Vec<_>>>()?;
    be.take_plan();
    let mut root_step = None;
    let mut plain_step = None;
    // Enough steps for any start and frequency a config can name within
    // reason; a config that never preconditions is reported as such.
    let limit = 10_000;
    for _ in 0..limit {
        let root = opt.next_step_has_root_inverse();
        {
            let b = opt.backend();
            let g: Vec<_> = grads.iter().map(|g| Some(b.view(g))).collect();
            let mut p: Vec<_> = params.iter_mut().map(|p| b.view_mut(p)).collect();
            opt.step(&mut p, &g)?;
        }
        let calls = opt.backend().take_plan();
        match (&root_step, &plain_step, root) {
            (None, _, true) => root_step = Some(summarize(&calls, true)),
            (Some(_), None, false) => plain_step = Some(summarize(&calls, false)),
            (Some(_), Some(_), true) => {
                let layout = opt.layout();
                return Ok(PlanReport {
                    set: set.to_string(),
                    tensors: tensors.len(),
                    blocks: layout.blocks.len(),
                    groups: layout.groups.len(),
                    root_inverse_step: root_step.expect("matched Some"),
                    step: plain_step.expect("matched Some"),
                    later_root_inverse_step: summarize(&calls, true),
                });
            }
            _ => {}
        }
    }
    anyhow::bail!(
        "no root-inverse step, a step without one, then another root-inverse step in {limit} steps (does the config precondition?)"
    )
}

fn render_step(out: &mut String, title: &str, s: &StepPlan) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "{title}");
    for (phase, calls) in &s.phases {
        let n: usize = calls.iter().map(|c| c.1).sum();
        let _ = writeln!(out, "  {phase} ({n})");
        for (name, count) in calls {
            let _ = writeln!(out, "    {count:>6}  {name}");
        }
    }
    let _ = writeln!(
        out,
        "  total: {} launches, {} host waits, {:.2} GFLOP in GEMMs",
        s.launches,
        s.host_waits,
        s.gemm_flops / 1e9
    );
}

/// The report as text, ending with the budget line.
pub fn render(r: &PlanReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "CUDA plan of {}: {} tensors, {} blocks in {} shape groups",
        r.set, r.tensors, r.blocks, r.groups
    );
    render_step(
        &mut out,
        "first step with root inverse:",
        &r.root_inverse_step,
    );
    render_step(
        &mut out,
        "next step with root inverse:",
        &r.later_root_inverse_step,
    );
    render_step(&mut out, "step without root inverse:", &r.step);
    let _ = writeln!(
        out,
        "launches per step without root inverse: {} ({} shape groups)",
        r.step.launches, r.groups
    );
    out
}

/// The launches of `bench`'s timed configuration (root inverses every
/// `root_every` steps), with the GEMM rate of `report`'s measured steps.
pub fn launches(
    bench: &crate::step::StepBench,
    report: &crate::step::StepReport,
) -> Result<crate::step::Launches> {
    let mut cfg = bench.config.clone();
    cfg.precondition_frequency = bench.root_every;
    cfg.start_preconditioning_step = shampoo_core::config::StartStep::At(bench.root_every);
    let r = run(&bench.set, &bench.tensors, &cfg, bench.dtype)?;
    let gflop = r.step.gemm_flops / 1e9;
    let ms = report.shampoo.mean_ms;
    Ok(crate::step::Launches {
        per_step: r.step.launches,
        per_root_inverse_step: r.root_inverse_step.launches,
        host_waits_per_step: r.step.host_waits,
        groups: r.groups,
        gemm_gflop_per_step: gflop,
        gemm_gflops_per_s: if ms > 0.0 { gflop / (ms * 1e-3) } else { 0.0 },
    })
}
