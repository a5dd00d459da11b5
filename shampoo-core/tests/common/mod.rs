//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng, rngs::StdRng};
use shampoo_core::backend::*;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Result, Shampoo, ShampooConfig};

/// Deterministic normal-ish values.
pub fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub fn config(json: &str) -> ShampooConfig {
    ShampooConfig::from_json(json).expect("valid config")
}

/// Random gradients for `steps` steps.
pub fn gradients(seed: u64, shapes: &[Vec<usize>], steps: usize) -> Vec<Vec<Vec<f64>>> {
    let mut r = rng(seed);
    (0..steps)
        .map(|_| shapes.iter().map(|s| randn(&mut r, numel(s))).collect())
        .collect()
}

/// A float64 optimizer on the CPU.
pub fn optimizer64(config: ShampooConfig, shapes: &[Vec<usize>]) -> Shampoo<CpuBackend> {
    Shampoo::new(config, shapes, DType::F64, CpuBackend::new(2).unwrap()).unwrap()
}

/// One float64 step.
pub fn step64(opt: &mut Shampoo<CpuBackend>, params: &mut [Vec<f64>], grads: &[Option<&Vec<f64>>]) {
    let mut views: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    let g: Vec<Option<HostView<'_>>> = grads.iter().map(|g| g.map(|g| HostView::F64(g))).collect();
    opt.step(&mut views, &g).unwrap();
}

/// Runs `grads` through a fresh float64 optimizer from `init`.
pub fn run64(
    config: ShampooConfig,
    shapes: &[Vec<usize>],
    init: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
) -> Vec<Vec<f64>> {
    let mut opt = optimizer64(config, shapes);
    let mut params = init.to_vec();
    for g in grads {
        let gs: Vec<Option<&Vec<f64>>> = g.iter().map(Some).collect();
        step64(&mut opt, &mut params, &gs);
    }
    params
}

/// `max |a - b| / max |b|` over all tensors.
pub fn max_rel(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| shampoo_core::reference::relative_error(x, y))
        .fold(0.0, f64::max)
}

/// Reinterprets a job slice of `Flaky` as one of `CpuBackend`.
fn forward<A, B>(jobs: &mut [A]) -> &mut [B] {
    assert_eq!(std::mem::size_of::<A>(), std::mem::size_of::<B>());
    assert_eq!(std::mem::align_of::<A>(), std::mem::align_of::<B>());
    // SAFETY: jobs are repr(C), and Flaky's buffer, view and table types are
    // CpuBackend's, so `A` and `B` have the same layout (sizes checked).
    unsafe { std::slice::from_raw_parts_mut(jobs.as_mut_ptr().cast::<B>(), jobs.len()) }
}

/// What [`Flaky`]'s eigendecompositions do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Solve as the CPU backend does.
    Solve = 0,
    /// Report every block as failed (after the float64 retry).
    Fail = 1,
    /// Solve, and report every block as needing the float64 retry.
    Retry = 2,
}

/// The CPU backend, with eigendecompositions that fail (or report the
/// float64 retry) on demand.
pub struct Flaky {
    inner: CpuBackend,
    outcome: std::sync::atomic::AtomicU8,
    /// An operation this backend claims not to have.
    lacks: Option<Op>,
    /// Read-backs to the host so far.
    downloads: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    /// A one-thread CPU backend whose eigendecompositions do `outcome`.
    pub fn new(outcome: Outcome) -> Self {
        Flaky {
            inner: CpuBackend::new(1).unwrap(),
            outcome: (outcome as u8).into(),
            lacks: None,
            downloads: 0.into(),
        }
    }

    /// A backend that solves, and claims not to have `op`.
    pub fn lacking(op: Op) -> Self {
        Flaky {
            lacks: Some(op),
            ..Flaky::new(Outcome::Solve)
        }
    }

    /// Changes what the next eigendecompositions do.
    pub fn set(&self, outcome: Outcome) {
        self.outcome
            .store(outcome as u8, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times [`Backend::download`] was called.
    pub fn downloads(&self) -> usize {
        self.downloads.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn outcome(&self) -> u8 {
        self.outcome.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Backend for Flaky {
    type Buffer = <CpuBackend as Backend>::Buffer;
    type View<'a> = HostView<'a>;
    type ViewMut<'a> = HostViewMut<'a>;
    type BlockTable = <CpuBackend as Backend>::BlockTable;
    fn name(&self) -> String {
        "flaky".into()
    }
    fn alloc(&self, d: DType, n: usize) -> Result<Self::Buffer> {
        self.inner.alloc(d, n)
    }
    fn view<'a>(&self, b: &'a Self::Buffer) -> HostView<'a> {
        self.inner.view(b)
    }
    fn view_mut<'a>(&self, b: &'a mut Self::Buffer) -> HostViewMut<'a> {
        self.inner.view_mut(b)
    }
    fn shorten<'b, 'a: 'b>(v: HostView<'a>) -> HostView<'b> {
        v
    }
    fn as_view<'b>(&self, v: &'b HostViewMut<'_>) -> HostView<'b> {
        self.inner.as_view(v)
    }
    fn reborrow<'b>(&self, v: &'b mut HostViewMut<'_>) -> HostViewMut<'b> {
        self.inner.reborrow(v)
    }
    fn upload(&self, d: HostViewMut<'_>, s: HostView<'_>) -> Result<()> {
        self.inner.upload(d, s)
    }
    fn download(&self, s: HostView<'_>, d: HostViewMut<'_>) -> Result<()> {
        self.downloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.download(s, d)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn block_table(&self, e: Vec<TableEntry>) -> Result<Self::BlockTable> {
        self.inner.block_table(e)
    }
    fn gather(&self, j: &mut [GatherJob<'_, '_, Self>]) -> Result<()> {
        self.inner.gather(forward(j))
    }
    fn scatter(&self, j: &mut [ScatterJob<'_, Self>]) -> Result<()> {
        self.inner.scatter(forward(j))
    }
    fn mode_gram(&self, j: &mut [GramJob<'_, Self>]) -> Result<()> {
        self.inner.mode_gram(forward(j))
    }
    fn mode_product(&self, j: &mut [ModeProductJob<'_, Self>]) -> Result<()> {
        self.inner.mode_product(forward(j))
    }
    fn matmul(&self, j: &mut [MatmulJob<'_, Self>]) -> Result<()> {
        self.inner.matmul(forward(j))
    }
    fn eigh(&self, jobs: &mut [EighJob<'_, Self>]) -> Result<()> {
        if self.outcome() == Outcome::Fail as u8 {
            for j in jobs.iter_mut() {
                for s in j.status.iter_mut() {
                    *s = EighStatus::Failed;
                }
            }
            return Ok(());
        }
        // The CPU backend takes the status slices out of its jobs: give it
        // reborrowed jobs, so that ours keep theirs.
        let mut inner: Vec<EighJob<'_, CpuBackend>> = jobs
            .iter_mut()
            .map(|j| EighJob {
                a: self.inner.reborrow(&mut j.a),
                values: self.inner.reborrow(&mut j.values),
                n: j.n,
                count: j.count,
                status: &mut *j.status,
                select: j.select,
            })
            .collect();
        self.inner.eigh(&mut inner)?;
        drop(inner);
        if self.outcome() == Outcome::Retry as u8 {
            for j in jobs.iter_mut() {
                for s in j.status.iter_mut().filter(|s| **s == EighStatus::Ok) {
                    *s = EighStatus::RetriedF64;
                }
            }
        }
        Ok(())
    }
    fn map(&self, j: &mut [Map<'_, Self>]) -> Result<()> {
        self.inner.map(forward(j))
    }
    fn reduce(&self, j: &mut [ReduceJob<'_, Self>]) -> Result<()> {
        self.inner.reduce(forward(j))
    }
    fn qr(&self, j: &mut [QrJob<'_, Self>]) -> Result<()> {
        self.inner.qr(forward(j))
    }
    fn orthogonalize(&self, j: &mut [OrthogonalizeJob<'_, Self>]) -> Result<()> {
        self.inner.orthogonalize(forward(j))
    }
    fn supports(&self, op: Op) -> bool {
        self.lacks != Some(op) && self.inner.supports(op)
    }
    fn wire(&self, j: &mut [WireJob<'_, Self>]) -> Result<()> {
        self.inner.wire(forward(j))
    }
}
