//! Optimizer state of one group of same-shape blocks, and its allocation.
//!
//! All memory a step needs is allocated here, once, at construction: state
//! (factors, roots, accumulators) and scratch (gathered gradients, products,
//! root-inverse work). A steady-state step allocates nothing on the backend.

use crate::backend::{Backend, EighStatus, TableEntry};
use crate::config::{
    Amortized, Eigendecomposition, Orthogonalization, Preconditioner, RootInverse, ShampooConfig,
    WeightDecayType,
};
use crate::layout::{FactorSpec, Group, Layout};
use crate::{DType, Result};

/// State and scratch of one preconditioned dimension of a group.
pub(crate) struct FactorState<B: Backend> {
    /// Which dimension, its size and exponent.
    pub spec: FactorSpec,
    /// Statistics `L` (factor dtype), `count * n * n`, lower triangle valid.
    pub stats: B::Buffer,
    /// Inverse roots `X` (parameter dtype; for eigendecomposed Shampoo the
    /// root formed from `eigvecs` and `eigvals`), or the eigenbasis for
    /// eigenvalue-corrected Shampoo (column-major). Starts at identity.
    pub root: B::Buffer,
    /// Eigendecomposed Shampoo's eigenvectors (column-major) and
    /// eigenvalues (factor dtype); identity and ones at first.
    pub eigen: Option<(B::Buffer, B::Buffer)>,
    /// Root-inverse work: damped factor, then eigenvectors (factor dtype).
    pub work: B::Buffer,
    /// Root-inverse matrices (factor dtype), by role through `roles`; only
    /// the roles the method uses are allocated (see [`scratch_roles`]).
    pub scratch: Vec<B::Buffer>,
    /// Physical index in `scratch` of each [`Role`] (roles swap for free).
    pub roles: [usize; ROLES],
    /// Eigenvalue powers when a root is formed from kept eigenvalues
    /// (eigendecomposed Shampoo), `count * n`.
    pub powers: Option<B::Buffer>,
    /// The block shape of a matrix, `[n, n]`.
    pub square: [usize; 2],
    /// Eigenvalues, or Frobenius norms for Newton (factor dtype), `count * n`.
    pub values: B::Buffer,
    /// Per-block flags: `[input finite; result finite; residual]`,
    /// `FLAG_SECTIONS * count` (factor dtype); the iterations also use the
    /// second and third sections for their per-block errors and scalars.
    pub flags: B::Buffer,
    /// Consecutive root-inverse failures per block.
    pub failures: Vec<u32>,
    /// Root-inverse outcomes per block since construction (telemetry).
    pub counters: Vec<super::telemetry::RootInverseCounters>,
    /// Per-block eigendecomposition outcome of the last root inverse.
    pub status: Vec<EighStatus>,
    /// Host copy of `flags` (or Newton errors).
    pub host_flags: Vec<f64>,
    /// Per-step selection scratch.
    pub accept: Vec<u32>,
    /// A second selection (adaptive and QR eigendecompositions).
    pub keep: Vec<u32>,
    /// Per-block iteration state of the coupled higher-order method:
    /// `(last error, iterations)`.
    pub iteration: Vec<(f64, u32)>,
}

/// Sections of `count` values in a factor's flags (see
/// [`FactorState::flags`]).
pub(crate) const FLAG_SECTIONS: usize = 3;

/// Number of scratch roles.
pub(crate) const ROLES: usize = 8;

/// What a root-inverse scratch matrix is used for. Methods allocate the
/// roles up to the highest one they use, so the order matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The candidate root `X`.
    X = 0,
    /// Product target; eigendecompositions: a copy of the eigenvectors.
    T = 1,
    /// Coupled iterations' `M`; eigendecompositions: `B = Q^T A Q`.
    M = 2,
    /// Binary exponentiation's running square; eigendecompositions: the
    /// current eigenvectors `Q` (as rows).
    Z = 3,
    /// Coupled iterations' `M'`.
    Mp = 4,
    /// Binary exponentiation's result; QR's `R`.
    R = 5,
    /// The higher-order iteration's `E = I - M`.
    E = 6,
    /// The higher-order iteration's ridged factor `A_r`.
    A = 7,
}

/// How many scratch roles (from [`Role::X`] on) an amortized method uses.
pub(crate) fn scratch_roles(config: &ShampooConfig) -> usize {
    let eigen = |e: Eigendecomposition, formed: bool| match e {
        Eigendecomposition::Eigh { tolerance: 0.0, .. } => {
            if formed {
                Role::T as usize + 1
            } else {
                0
            }
        }
        Eigendecomposition::Eigh { .. } => Role::Z as usize + 1,
        Eigendecomposition::Qr { .. } => Role::R as usize + 1,
    };
    match config.amortized() {
        Amortized::RootInverse(RootInverse::Eigh { .. }) => 1,
        Amortized::RootInverse(RootInverse::CoupledNewton { .. }) => Role::R as usize + 1,
        Amortized::RootInverse(RootInverse::CoupledHigherOrder { .. }) => ROLES,
        Amortized::RootInverse(RootInverse::BatchedNewton { .. }) => Role::E as usize + 1,
        Amortized::Eigenpairs(e) => eigen(e, true),
        Amortized::Eigenbasis(e) => eigen(e, false),
        Amortized::None => 0,
    }
}

impl<B: Backend> FactorState<B> {
    /// Swaps the buffers of two roles.
    pub fn swap(&mut self, a: Role, b: Role) {
        self.roles.swap(a as usize, b as usize);
    }
}

/// State and scratch of one group.
pub(crate) struct GroupState<B: Backend> {
    /// Geometry for gathering the group's blocks.
    pub gather: B::BlockTable,
    /// Raw gradients (after L2 weight decay), parameter dtype.
    pub grad: B::Buffer,
    /// Gradients in the factor dtype when it differs.
    pub grad_factor: Option<B::Buffer>,
    /// Gathered parameters, for decoupled weight decay.
    pub weights: Option<B::Buffer>,
    /// Filtered gradient state `M1` and its bias-corrected copy `Gf`.
    pub filtered: Option<(B::Buffer, B::Buffer)>,
    /// Grafting accumulator `V`.
    pub graft: Option<B::Buffer>,
    /// Momentum buffer.
    pub momentum: Option<B::Buffer>,
    /// Eigenvalue-corrected second moments `D`.
    pub corrected: Option<B::Buffer>,
    /// Iterate averaging's sequence `Z`.
    pub z: Option<B::Buffer>,
    /// Spectral descent's Newton-Schulz matrices `B` and `B B`, one square
    /// per block of the smaller side.
    pub ortho: Option<[B::Buffer; 2]>,
    /// Per-block scalars of the preconditioning (norms, nuclear norms).
    pub scalars: B::Buffer,
    /// Ping-pong product buffers.
    pub work: [B::Buffer; 2],
    /// Per-block `(sum graft^2, sum P_sh^2)`.
    pub sq_norms: B::Buffer,
    /// One per preconditioned dimension.
    pub factors: Vec<FactorState<B>>,
    /// Blocks with a gradient this step (`None`: all of them).
    pub active: Option<Vec<u32>>,
    /// Where this step's preconditioned gradient `P_sh` is.
    pub p_sh: Loc,
    /// Whether any block has a gradient this step.
    pub any_active: bool,
}

/// A group buffer holding a block-shaped intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// The raw gradient.
    Grad,
    /// The filtered gradient (the raw gradient when `beta1 == 0`).
    Gf,
    /// One of the two product buffers.
    Work(usize),
}

impl Loc {
    /// The buffer this location names, from a group's fields (taken apart
    /// so that the caller can borrow other fields at the same time).
    pub fn of<'a, B: Backend>(
        self,
        grad: &'a B::Buffer,
        filtered: &'a Option<(B::Buffer, B::Buffer)>,
        work: &'a [B::Buffer; 2],
    ) -> &'a B::Buffer {
        match self {
            Loc::Grad => grad,
            Loc::Gf => filtered.as_ref().map_or(grad, |(_, gf)| gf),
            Loc::Work(i) => &work[i],
        }
    }

    /// The buffer this location names, exclusively.
    pub fn of_mut<'a, B: Backend>(
        self,
        grad: &'a mut B::Buffer,
        filtered: &'a mut Option<(B::Buffer, B::Buffer)>,
        work: &'a mut [B::Buffer; 2],
    ) -> &'a mut B::Buffer {
        match (self, filtered) {
            (Loc::Gf, Some((_, gf))) => gf,
            (Loc::Grad | Loc::Gf, _) => grad,
            (Loc::Work(i), _) => &mut work[i],
        }
    }
}

/// Allocates the state of every group of `layout`.
pub(crate) fn allocate_groups<B: Backend>(
    backend: &B,
    config: &ShampooConfig,
    layout: &Layout,
    dtype: DType,
) -> Result<Vec<GroupState<B>>> {
    let fdtype = config.factor_dtype_for(dtype);
    layout
        .groups
        .iter()
        .map(|g| allocate_group(backend, config, layout, g, dtype, fdtype))
        .collect()
}

fn allocate_group<B: Backend>(
    backend: &B,
    config: &ShampooConfig,
    layout: &Layout,
    group: &Group,
    dtype: DType,
    fdtype: DType,
) -> Result<GroupState<B>> {
    let len = group.len();
    let count = group.count();
    let ec = config.is_eigenvalue_corrected();
    let roles = scratch_roles(config);
    let eigenpairs = matches!(config.amortized(), Amortized::Eigenpairs(_));
    let entries = group
        .blocks
        .iter()
        .enumerate()
        .map(|(slot, &id)| TableEntry {
            block: layout.blocks[id].clone(),
            packed_offset: slot * group.numel,
        })
        .collect();
    let opt = |cond: bool, dt: DType, n: usize| -> Result<Option<B::Buffer>> {
        if cond {
            Ok(Some(backend.alloc(dt, n)?))
        } else {
            Ok(None)
        }
    };
    let has_factors = !group.factors.is_empty();
    let mut factors = Vec::with_capacity(group.factors.len());
    for spec in &group.factors {
        let n = spec.size;
        let mats = count * n * n;
        let mut root = backend.alloc(dtype, mats)?;
        fill_identity(backend, &mut root, dtype, n, count)?;
        let eigen = if eigenpairs {
            let mut vectors = backend.alloc(fdtype, mats)?;
            fill_identity(backend, &mut vectors, fdtype, n, count)?;
            let mut values = backend.alloc(fdtype, count * n)?;
            upload_f64(
                backend,
                backend.view_mut(&mut values),
                &vec![1.0; count * n],
                fdtype,
            )?;
            Some((vectors, values))
        } else {
            None
        };
        factors.push(FactorState {
            stats: backend.alloc(fdtype, mats)?,
            root,
            eigen,
            work: backend.alloc(fdtype, mats)?,
            scratch: (0..roles)
                .map(|_| backend.alloc(fdtype, mats))
                .collect::<Result<_>>()?,
            roles: std::array::from_fn(|i| i),
            powers: opt(eigenpairs, fdtype, count * n)?,
            square: [n, n],
            values: backend.alloc(fdtype, count * n)?,
            flags: backend.alloc(fdtype, FLAG_SECTIONS * count)?,
            failures: vec![0; count],
            counters: vec![Default::default(); count],
            status: vec![EighStatus::Skipped; count],
            host_flags: vec![0.0; FLAG_SECTIONS * count],
            accept: Vec::with_capacity(count),
            keep: Vec::with_capacity(count),
            iteration: vec![(0.0, 0); count],
            spec: spec.clone(),
        });
    }
    let graft = config.grafting.filter(|g| g.has_accumulator());
    let averaging = config.iterate_averaging.is_some();
    let decay = config.weight_decay != 0.0 && config.weight_decay_type != WeightDecayType::L2;
    let ortho = match &config.preconditioner {
        Preconditioner::SpectralDescent {
            orthogonalization: Orthogonalization::NewtonSchulz { .. },
        } => {
            let k = group.dims.iter().copied().min().unwrap_or(0);
            Some([
                backend.alloc(dtype, count * k * k)?,
                backend.alloc(dtype, count * k * k)?,
            ])
        }
        _ => None,
    };
    Ok(GroupState {
        gather: backend.block_table(entries)?,
        grad: backend.alloc(dtype, len)?,
        grad_factor: opt(has_factors && fdtype != dtype, fdtype, len)?,
        weights: opt(decay || averaging, dtype, len)?,
        filtered: if config.betas[0] != 0.0 {
            Some((backend.alloc(dtype, len)?, backend.alloc(dtype, len)?))
        } else {
            None
        },
        graft: opt(graft.is_some(), dtype, len)?,
        momentum: opt(config.momentum.is_some(), dtype, len)?,
        corrected: opt(ec, dtype, len)?,
        z: opt(averaging, dtype, len)?,
        ortho,
        scalars: backend.alloc(dtype, count.max(1))?,
        work: [backend.alloc(dtype, len)?, backend.alloc(dtype, len)?],
        sq_norms: backend.alloc(dtype, 2 * count)?,
        factors,
        active: None,
        p_sh: Loc::Gf,
        any_active: true,
    })
}

/// Writes `count` identity matrices into `buf`.
pub(crate) fn fill_identity<B: Backend>(
    backend: &B,
    buf: &mut B::Buffer,
    dtype: DType,
    n: usize,
    count: usize,
) -> Result<()> {
    let mut eye = vec![0.0f64; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    let host: Vec<f64> = (0..count).flat_map(|_| eye.iter().copied()).collect();
    upload_f64(backend, backend.view_mut(buf), &host, dtype)
}

/// Uploads `f64` host data into a view of either dtype.
pub(crate) fn upload_f64<B: Backend>(
    backend: &B,
    dst: B::ViewMut<'_>,
    host: &[f64],
    dtype: DType,
) -> Result<()> {
    match dtype {
        DType::F64 => backend.upload(dst, crate::HostView::F64(host)),
        DType::F32 => {
            let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
            backend.upload(dst, crate::HostView::F32(&v))
        }
    }
}

/// Downloads every active factor's flags into its `host_flags`, waiting for
/// the device once.
pub(crate) fn download_flags<B: Backend>(
    backend: &B,
    groups: &mut [GroupState<B>],
    dtype: DType,
) -> Result<()> {
    let mut targets: Vec<(&B::Buffer, &mut Vec<f64>)> = groups
        .iter_mut()
        .filter(|g| g.any_active)
        .flat_map(|g| g.factors.iter_mut().map(|f| (&f.flags, &mut f.host_flags)))
        .collect();
    match dtype {
        DType::F64 => backend.download_all(
            targets
                .iter_mut()
                .map(|(b, h)| (backend.view(b), crate::HostViewMut::F64(&mut h[..])))
                .collect(),
        ),
        DType::F32 => {
            let mut temps: Vec<Vec<f32>> =
                targets.iter().map(|(_, h)| vec![0f32; h.len()]).collect();
            backend.download_all(
                targets
                    .iter()
                    .zip(temps.iter_mut())
                    .map(|((b, _), t)| (backend.view(b), crate::HostViewMut::F32(&mut t[..])))
                    .collect(),
            )?;
            for ((_, h), t) in targets.iter_mut().zip(&temps) {
                for (x, y) in h.iter_mut().zip(t) {
                    *x = f64::from(*y);
                }
            }
            Ok(())
        }
    }
}

/// Downloads a view of either dtype into `f64` host memory.
pub(crate) fn download_f64<B: Backend>(
    backend: &B,
    src: B::View<'_>,
    host: &mut [f64],
    dtype: DType,
) -> Result<()> {
    match dtype {
        DType::F64 => backend.download(src, crate::HostViewMut::F64(host)),
        DType::F32 => {
            let mut v = vec![0f32; host.len()];
            backend.download(src, crate::HostViewMut::F32(&mut v))?;
            for (h, x) in host.iter_mut().zip(v) {
                *h = x as f64;
            }
            Ok(())
        }
    }
}

/// Every factor of every group with active blocks, with its group's block
/// count and active selection.
pub(crate) fn active_factors<'a, B: Backend>(
    groups: &'a mut [GroupState<B>],
    layout: &'a Layout,
) -> impl Iterator<Item = (&'a mut FactorState<B>, usize, Option<&'a [u32]>)> {
    groups
        .iter_mut()
        .zip(&layout.groups)
        .filter(|(g, _)| g.any_active)
        .flat_map(|(g, spec)| {
            let GroupState {
                active, factors, ..
            } = g;
            let select = active.as_deref();
            let count = spec.count();
            factors.iter_mut().map(move |f| (f, count, select))
        })
}

/// Every group with active blocks, with its layout.
pub(crate) fn active_groups<'a, B: Backend>(
    groups: &'a mut [GroupState<B>],
    layout: &'a Layout,
) -> impl Iterator<Item = (&'a mut GroupState<B>, &'a Group)> {
    groups
        .iter_mut()
        .zip(&layout.groups)
        .filter(|(g, _)| g.any_active)
}

/// Borrows `a` and `b` shared and `c` exclusively from one slice
/// (`a` may equal `b`; neither may equal `c`).
#[track_caller]
pub(crate) fn pick3<T>(items: &mut [T], a: usize, b: usize, c: usize) -> (&T, &T, &mut T) {
    assert!(
        a != c && b != c,
        "pick3: the output must differ from the inputs"
    );
    let (left, right) = items.split_at_mut(c);
    let (out, right) = right.split_first_mut().expect("index in range");
    let get = |i: usize| -> &T { if i < c { &left[i] } else { &right[i - c - 1] } };
    (get(a), get(b), out)
}

/// Borrows `a` and `b` exclusively from one slice (`a != b`).
#[track_caller]
pub(crate) fn pick2_mut<T>(items: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert!(a != b, "pick2_mut: the two items must differ");
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&mut left[a], &mut right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&mut right[0], &mut left[b])
    }
}
