//! The backend seam.
//!
//! The algorithm ([`crate::algorithm`]) is written once against the
//! [`Backend`] trait. A backend owns memory ([`Backend::Buffer`]) and runs a
//! handful of batched primitives shaped around Shampoo's work:
//!
//! | primitive | math |
//! | --- | --- |
//! | [`gather`](Backend::gather) | copy blocks out of parameters/gradients into a group buffer (optionally `+ c * W`) |
//! | [`scatter`](Backend::scatter) | add (or copy) block directions back into a parameter |
//! | [`mode_gram`](Backend::mode_gram) | `F <- beta F; F += alpha * T_(k) T_(k)^T` (contraction over all dims but `k`) |
//! | [`mode_product`](Backend::mode_product) | `T x_k M` (or `M^T`) |
//! | [`matmul`](Backend::matmul) | batched `C = alpha op(A) op(B) (+ C)` |
//! | [`eigh`](Backend::eigh) | batched symmetric eigendecomposition, in place |
//! | [`qr`](Backend::qr) | batched QR factorization `A = Q R` |
//! | [`orthogonalize`](Backend::orthogonalize) | `U V^T` of each matrix's reduced SVD (and the sum of its singular values) |
//! | [`map`](Backend::map) | the fused elementwise kernels of [`Map`] |
//! | [`reduce`](Backend::reduce) | per-matrix reductions of [`Reduction`] |
//! | [`wire`](Backend::wire) | 16-bit communication formats: `round16(x)` and back ([`WireJob`]) |
//!
//! Every primitive takes a slice of jobs, so that a backend can balance all
//! blocks of all groups at once (the CPU backend) or launch one batched call
//! per job (the CUDA backend). Jobs in one call never write overlapping
//! memory, and no job reads what another job of the same call writes.
//!
//! Conventions: matrices are stored row-major, `n x n` per block, blocks of a
//! batch back to back. A factor `F` is only valid in its lower triangle
//! unless a job says otherwise. Eigenvectors are stored *column-major*
//! (equivalently: row `j` of the row-major storage is eigenvector `j`).
//! Scalars in jobs are `f64`; a backend rounds them to the data's dtype.
//!
//! Jobs are `#[repr(C)]`: a backend that wraps another one with the same
//! buffer and view types (for fault injection or tracing) may forward them
//! by reinterpretation.

mod checks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::blocking::BlockSpec;
use crate::{DType, Error, HostView, HostViewMut, Result};

/// Which blocks (matrices) of a batch a job touches: `None` = all.
pub type Selection<'a> = Option<&'a [u32]>;

/// Iterates the indices a selection covers.
pub fn selected(select: Selection<'_>, count: usize) -> impl Iterator<Item = usize> + '_ {
    let all = select.is_none();
    (0..if all { count } else { 0 }).chain(select.unwrap_or(&[]).iter().map(|&i| i as usize))
}

/// One row of a [`Backend::BlockTable`]: where a block lives in its
/// parameter, and where its packed copy lives.
#[derive(Debug, Clone)]
pub struct TableEntry {
    /// Geometry of the block in its parameter.
    pub block: BlockSpec,
    /// Offset of the packed block (in the group buffer for gathers, in the
    /// directions buffer for scatters).
    pub packed_offset: usize,
}

/// Checks a block table's geometry, the same for every backend: no two
/// blocks overlap, neither in a parameter nor in their packed ranges. The
/// parameter check runs on the logical order (a strided parameter's map to
/// memory is one to one, checked when it was made). Returns, per parameter
/// index, one past the largest element of its memory any block touches
/// (a strided parameter's blocks may touch any of its elements).
pub fn check_table(table: &[TableEntry]) -> Result<Vec<usize>> {
    const OP: &str = "block_table";
    let mut extent: Vec<usize> = Vec::new();
    let mut touched: Vec<(usize, usize, usize)> = Vec::new();
    let mut packed: Vec<(usize, usize)> = Vec::with_capacity(table.len());
    for e in table {
        let b = &e.block;
        let p = b.param;
        if extent.len() <= p {
            extent.resize(p + 1, 0);
        }
        b.for_each_run(|src, _, len| {
            extent[p] = extent[p].max(src + len);
            touched.push((p, src, len));
        });
        if b.memory.is_some() {
            extent[p] = extent[p].max(b.param_numel());
        }
        packed.push((e.packed_offset, b.numel()));
    }
    touched.sort_unstable();
    for w in touched.windows(2) {
        let ((p0, s0, l0), (p1, s1, _)) = (w[0], w[1]);
        if p0 == p1 && s0 + l0 > s1 {
            return Err(Error::backend(
                OP,
                format!("blocks overlap in parameter {p0}"),
            ));
        }
    }
    packed.sort_unstable();
    if packed.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(Error::backend(OP, "packed blocks overlap"));
    }
    Ok(extent)
}

/// Read-only view operations every backend view type provides.
pub trait ViewOps: Copy + Send + Sync {
    /// Element type.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the view is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A sub-range.
    fn slice(self, start: usize, len: usize) -> Self;
}

/// Mutable view operations every backend view type provides.
pub trait ViewMutOps: Send + Sized {
    /// Element type.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the view is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Splits into `[0, mid)` and `[mid, len)`.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// A compute backend: memory plus Shampoo's batched primitives.
pub trait Backend: Send + Sync + Sized + 'static {
    /// Owned memory of one dtype.
    type Buffer: Send + Sync;
    /// Shared view of backend memory (also how callers hand in gradients).
    type View<'a>: ViewOps
    where
        Self: 'a;
    /// Exclusive view of backend memory (also how callers hand in parameters).
    type ViewMut<'a>: ViewMutOps
    where
        Self: 'a;
    /// Block geometry prepared once (e.g. uploaded to the device).
    type BlockTable: Send + Sync;

    /// Human-readable name, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    /// Allocates `len` zeroed elements.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;
    /// Shared view of a whole buffer.
    fn view<'a>(&self, buf: &'a Self::Buffer) -> Self::View<'a>;
    /// Exclusive view of a whole buffer.
    fn view_mut<'a>(&self, buf: &'a mut Self::Buffer) -> Self::ViewMut<'a>;
    /// The same view with a shorter lifetime (views are covariant in their
    /// lifetime; the trait cannot say so, so backends spell it out).
    fn shorten<'b, 'a: 'b>(v: Self::View<'a>) -> Self::View<'b>;
    /// Shared view of an exclusive view.
    fn as_view<'b>(&self, v: &'b Self::ViewMut<'_>) -> Self::View<'b>;
    /// Shorter-lived exclusive view.
    fn reborrow<'b>(&self, v: &'b mut Self::ViewMut<'_>) -> Self::ViewMut<'b>;
    /// Copies host memory into a view (same dtype, same length).
    fn upload(&self, dst: Self::ViewMut<'_>, src: HostView<'_>) -> Result<()>;
    /// Copies a view into host memory (same dtype, same length).
    fn download(&self, src: Self::View<'_>, dst: HostViewMut<'_>) -> Result<()>;
    /// Copies every `(source, destination)` pair to the host, waiting for
    /// the device once (by default, one [`Backend::download`] each).
    fn download_all<'a>(&self, pairs: Vec<(Self::View<'a>, HostViewMut<'a>)>) -> Result<()> {
        for (src, dst) in pairs {
            self.download(src, dst)?;
        }
        Ok(())
    }
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// The algorithm enters phase `name` of a step (`statistics`,
    /// `root_inverse`, `precondition`, `update`): a hint for backends that
    /// report per phase (the CUDA planner); nothing by default.
    fn phase(&self, _name: &'static str) {}
    /// Prepares block geometry for gathers and scatters.
    fn block_table(&self, entries: Vec<TableEntry>) -> Result<Self::BlockTable>;

    /// Copies blocks out of parameter-shaped tensors into packed buffers.
    fn gather(&self, jobs: &mut [GatherJob<'_, '_, Self>]) -> Result<()>;
    /// Adds (or copies) packed blocks into a parameter.
    fn scatter(&self, jobs: &mut [ScatterJob<'_, Self>]) -> Result<()>;
    /// Factor statistics: contraction of each tensor with itself over all
    /// dimensions but one.
    fn mode_gram(&self, jobs: &mut [GramJob<'_, Self>]) -> Result<()>;
    /// Multiplies each tensor by a matrix along one dimension.
    fn mode_product(&self, jobs: &mut [ModeProductJob<'_, Self>]) -> Result<()>;
    /// Batched matrix products.
    fn matmul(&self, jobs: &mut [MatmulJob<'_, Self>]) -> Result<()>;
    /// Batched symmetric eigendecomposition.
    fn eigh(&self, jobs: &mut [EighJob<'_, Self>]) -> Result<()>;
    /// Fused elementwise kernels.
    fn map(&self, jobs: &mut [Map<'_, Self>]) -> Result<()>;
    /// Per-matrix reductions.
    fn reduce(&self, jobs: &mut [ReduceJob<'_, Self>]) -> Result<()>;
    /// Batched QR factorization of square matrices (QR eigendecomposition).
    fn qr(&self, jobs: &mut [QrJob<'_, Self>]) -> Result<()>;
    /// Batched orthogonal polar factor `U V^T` of the reduced SVD (spectral
    /// descent by SVD).
    fn orthogonalize(&self, jobs: &mut [OrthogonalizeJob<'_, Self>]) -> Result<()>;
    /// Whether this backend implements `op` (the optimizer asks at
    /// construction, so that a configuration the backend cannot run is a
    /// clear error then, not a failure at some later step).
    fn supports(&self, op: Op) -> bool;
    /// Packs values into a 16-bit communication format, or unpacks them.
    fn wire(&self, jobs: &mut [WireJob<'_, Self>]) -> Result<()>;
}

/// Operations (primitives, or variants of one) that a backend may not
/// implement yet. Every other operation of the trait is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Backend::qr`].
    Qr,
    /// [`Backend::orthogonalize`].
    Orthogonalize,
    /// [`EigenRule::ShiftNonnegative`] and [`EigenRule::PseudoInverse`] in
    /// [`Map::EigenPower`].
    EigenRules,
    /// [`Map::NewtonInit`] with a `scale` other than 2.
    CoupledInit,
    /// [`GradientStatistics`](Map::GradientStatistics) with `beta3 != beta1`,
    /// and an [`GraftKernel::Ema`] weight other than `1 - beta2`.
    FilterOptions,
    /// [`Map::EigenvalueUpdate`] with a weight other than `1 - beta2`, and
    /// [`Map::EigenvalueScale`] with an exponent other than 1/2.
    EigenvalueOptions,
    /// [`Reduction::Trace`] and [`Reduction::MaxRowAbsSum`].
    TraceReductions,
    /// [`Reduction::OffDiagonalRatio`].
    OffDiagonalRatio,
    /// [`Map::TraceScale`] and [`Map::AddRidge`].
    RidgeMaps,
    /// [`Map::Eigenpairs`].
    Eigenpairs,
    /// [`Map::ScaleByNorm`], [`Map::Axpby`], [`Map::ScaleBlocks`],
    /// [`Map::Sign`].
    DirectionMaps,
    /// [`Map::IterateAverage`] and [`Map::Interpolate`].
    AveragingMaps,
}

/// A 16-bit floating-point format of the direction all-gather.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// bfloat16: 8 exponent bits, 7 mantissa bits (f32's range).
    Bf16,
    /// IEEE binary16: 5 exponent bits, 10 mantissa bits.
    F16,
}

/// Elements of `dtype` whose bytes hold `n` 16-bit values (the size of a
/// wire buffer, which is an ordinary buffer of the data's dtype).
pub fn wire16_len(dtype: DType, n: usize) -> usize {
    (2 * n).div_ceil(dtype.size())
}

/// Converts between a dtype and a 16-bit wire format.
///
/// A wire view is a view of the data's dtype whose bytes hold 16-bit values
/// in the machine's byte order (little-endian on every supported host and
/// GPU): value `i` is bytes `2i, 2i + 1`. It has at least
/// [`wire16_len`]`(dtype, n)` elements for `n` values.
///
/// Rounding is IEEE round-to-nearest, ties to even, directly from the data's
/// dtype (one rounding, also from f64); values beyond the format's range
/// become infinities, values below half its smallest subnormal become signed
/// zeros; infinities stay infinities; a NaN stays a NaN (quiet bit set, sign
/// and leading payload bits kept). Widening is exact.
#[repr(C)]
pub enum WireJob<'a, B: Backend> {
    /// `wire[i] = round16(src[i])` for `i < src.len()`; every later 16-bit
    /// slot of `wire` is set to zero (the padding of a rank's slot).
    Pack {
        /// Values.
        src: B::View<'a>,
        /// Wire buffer (same dtype as `src`).
        wire: B::ViewMut<'a>,
        /// The 16-bit format.
        format: WireFormat,
    },
    /// `dst[i] = widen(wire[i])` for `i < dst.len()`.
    Unpack {
        /// Wire buffer (same dtype as `dst`).
        wire: B::View<'a>,
        /// Values.
        dst: B::ViewMut<'a>,
        /// The 16-bit format.
        format: WireFormat,
    },
}

/// Copy blocks of parameter-shaped sources into a packed buffer:
/// `out[e] = src[e] (+ coef * add[e])` for every selected table entry `e`.
/// (`'s` is the callers' tensors' lifetime, `'a` the job's.)
#[repr(C)]
pub struct GatherJob<'a, 's, B: Backend> {
    /// Geometry; `packed_offset` is the block's offset in `out`.
    pub table: &'a B::BlockTable,
    /// Source tensors, indexed by the blocks' parameter index.
    pub sources: &'a [Option<B::View<'s>>],
    /// Optional second term `coef * tensor` (L2 weight decay).
    pub add: Option<(&'a [Option<B::View<'s>>], f64)>,
    /// Packed destination.
    pub out: B::ViewMut<'a>,
    /// Which table entries.
    pub select: Selection<'a>,
}

/// Add (or copy) packed blocks into one parameter.
#[repr(C)]
pub struct ScatterJob<'a, B: Backend> {
    /// Geometry of the parameter's blocks; `packed_offset` indexes `source`.
    pub table: &'a B::BlockTable,
    /// Packed directions.
    pub source: B::View<'a>,
    /// The parameter.
    pub dst: B::ViewMut<'a>,
    /// `dst += source` when true, `dst = source` when false.
    pub add: bool,
}

/// `out[b] <- beta * out[b]; out[b] += alpha * gram_k(input[b])` where
/// `gram_k(T)[i, j] = sum over all indices but k of T[.., i, ..] T[.., j, ..]`.
/// Two roundings when `beta` is neither 0 nor 1, as the published
/// implementation does. Only the lower triangle of `out` is defined unless
/// `full` is set.
#[repr(C)]
pub struct GramJob<'a, B: Backend> {
    /// `count` tensors of shape `dims`, back to back.
    pub input: B::View<'a>,
    /// Tensor shape.
    pub dims: &'a [usize],
    /// Number of tensors.
    pub count: usize,
    /// Dimension kept.
    pub mode: usize,
    /// `count` matrices of `dims[mode]^2`.
    pub out: B::ViewMut<'a>,
    /// Scale of the old value (0 replaces it).
    pub beta: f64,
    /// Scale of the new contraction.
    pub alpha: f64,
    /// Also fill the upper triangle.
    pub full: bool,
    /// Operand precision of the products.
    pub precision: Precision,
    /// Which tensors.
    pub select: Selection<'a>,
}

/// `out[b] = input[b] x_mode M[b]`, i.e.
/// `out[.., i, ..] = sum_l M[i, l] input[.., l, ..]` (or `M[l, i]` when
/// `transpose`).
#[repr(C)]
pub struct ModeProductJob<'a, B: Backend> {
    /// `count` tensors of shape `dims`.
    pub input: B::View<'a>,
    /// Tensor shape.
    pub dims: &'a [usize],
    /// Number of tensors.
    pub count: usize,
    /// Dimension multiplied.
    pub mode: usize,
    /// `count` full row-major matrices of `dims[mode]^2`.
    pub matrices: B::View<'a>,
    /// Use `M^T`.
    pub transpose: bool,
    /// `count` tensors of shape `dims`.
    pub out: B::ViewMut<'a>,
    /// Operand precision of the products.
    pub precision: Precision,
    /// Which tensors.
    pub select: Selection<'a>,
}

/// `c[b] = alpha * op(a[b]) op(b[b]) (+ c[b] if accumulate)` on full
/// row-major `n x n` matrices.
#[repr(C)]
pub struct MatmulJob<'a, B: Backend> {
    /// Left operands.
    pub a: B::View<'a>,
    /// Right operands.
    pub b: B::View<'a>,
    /// Results.
    pub c: B::ViewMut<'a>,
    /// Matrix size.
    pub n: usize,
    /// Number of products.
    pub count: usize,
    /// Transpose the left operand.
    pub trans_a: bool,
    /// Transpose the right operand.
    pub trans_b: bool,
    /// Scale.
    pub alpha: f64,
    /// Add to `c` instead of replacing it.
    pub accumulate: bool,
    /// Operand precision of the products.
    pub precision: Precision,
    /// Which products.
    pub select: Selection<'a>,
}

/// Operand precision of a matrix product: the products always accumulate
/// in the data's precision (float32 or float64); reduced precisions round
/// the operands first, as GPU matrix units do. Only float32 data is
/// rounded (TF32 leaves float64 products alone; bf16 operands are refused
/// for float64 data, see [`Precision::check`]). The CPU backend rounds the
/// operands the same way, so it measures what an option costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Full precision operands.
    #[default]
    F32,
    /// TensorFloat-32 operands (10 mantissa bits).
    Tf32,
    /// bfloat16 operands (7 mantissa bits) with float32 accumulation.
    Bf16,
}

impl Precision {
    /// The mantissa bits operands are rounded to for `dtype` data (`None`:
    /// not rounded).
    pub fn operand_mantissa(self, dtype: DType) -> Option<u32> {
        match (self, dtype) {
            (_, DType::F64) | (Precision::F32, _) => None,
            (Precision::Tf32, DType::F32) => Some(10),
            (Precision::Bf16, DType::F32) => Some(7),
        }
    }

    /// Refuses bf16 operands for statistics (a [`GramJob`]): they square
    /// the gradients, which bf16 would round to 8 significant bits.
    pub fn check_statistics(self, op: &'static str) -> Result<()> {
        if self == Precision::Bf16 {
            return Err(Error::backend(
                op,
                "bf16 operands are not offered for statistics (f32 or tf32)",
            ));
        }
        Ok(())
    }

    /// Refuses bf16 operands for float64 data.
    pub fn check(self, op: &'static str, dtype: DType) -> Result<()> {
        if self == Precision::Bf16 && dtype == DType::F64 {
            return Err(Error::backend(
                op,
                "bf16 operands are for float32 data (float64 products stay in float64)",
            ));
        }
        Ok(())
    }
}

/// Outcome of one eigendecomposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EighStatus {
    /// Not attempted (not selected).
    #[default]
    Skipped,
    /// Succeeded in the data's precision.
    Ok,
    /// Failed in the data's precision and succeeded in float64.
    RetriedF64,
    /// Failed even in float64.
    Failed,
}

/// In-place symmetric eigendecomposition: reads the lower triangle of each
/// matrix in `a`, writes its eigenvectors (column-major) back into `a` and
/// its eigenvalues (ascending) into `values`. A failure in float32 is retried
/// in float64.
#[repr(C)]
pub struct EighJob<'a, B: Backend> {
    /// `count` matrices `n x n`.
    pub a: B::ViewMut<'a>,
    /// `count` vectors of `n`.
    pub values: B::ViewMut<'a>,
    /// Matrix size.
    pub n: usize,
    /// Number of matrices.
    pub count: usize,
    /// One status per matrix (host memory).
    pub status: &'a mut [EighStatus],
    /// Which matrices.
    pub select: Selection<'a>,
}

/// `A = Q R` of square matrices: `a` (row-major) is replaced by `Q`, `r`
/// receives `R` (upper triangular, zeros below). The signs of the columns of
/// `Q` are the backend's (callers must not depend on them).
#[repr(C)]
pub struct QrJob<'a, B: Backend> {
    /// `count` matrices `n x n`, replaced by their `Q`.
    pub a: B::ViewMut<'a>,
    /// `count` matrices `n x n`: `R`.
    pub r: B::ViewMut<'a>,
    /// Matrix size.
    pub n: usize,
    /// Number of matrices.
    pub count: usize,
    /// Which matrices.
    pub select: Selection<'a>,
}

/// `out = U V^T` for the reduced SVD `M = U S V^T` of each `rows x cols`
/// matrix (row-major), and `nuclear = sum S` when asked for.
#[repr(C)]
pub struct OrthogonalizeJob<'a, B: Backend> {
    /// `count` matrices.
    pub input: B::View<'a>,
    /// `count` matrices of the same shape.
    pub out: B::ViewMut<'a>,
    /// `count` sums of singular values.
    pub nuclear: Option<B::ViewMut<'a>>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Number of matrices.
    pub count: usize,
    /// Which matrices.
    pub select: Selection<'a>,
}

/// How [`Map::EigenPower`] makes eigenvalues safe to raise to `-e`
/// (`lambda_min` is the smallest of a matrix's eigenvalues).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EigenRule {
    /// If `lambda_min < eps`: `lambda <- (lambda - lambda_min) + eps`
    /// (damping added before the decomposition).
    ShiftBelow {
        /// Damping.
        eps: f64,
    },
    /// Always `lambda <- (lambda - min(lambda_min, 0)) + eps` (damping after
    /// the decomposition).
    ShiftNonnegative {
        /// Damping.
        eps: f64,
    },
    /// Pseudo-inverse: eigenvalues at or below
    /// `c = max(rtol * max(lambda_max, 0), atol)` give 0, the others
    /// `lambda^-e`; `rtol = None` means `n` times the dtype's machine
    /// epsilon.
    PseudoInverse {
        /// Absolute cutoff.
        atol: f64,
        /// Relative cutoff.
        rtol: Option<f64>,
    },
}

/// Grafting method, with this step's scalars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GraftKernel {
    /// No grafting.
    None,
    /// `graft(g) = g`.
    Sgd,
    /// `V += g^2`; `graft(g) = g / (sqrt(V) + eps)`.
    Adagrad {
        /// Damping.
        eps: f64,
    },
    /// `V = b2 V + w g^2` (`w = 1 - b2`, or 1 when the weighting factor is
    /// dropped); `graft(g) = g / (sqrt(V / bc) + eps)`. RMSprop is this with
    /// `bc = 1`.
    Ema {
        /// EMA coefficient.
        beta2: f64,
        /// Weight `w` of the new square.
        weight: f64,
        /// Damping.
        eps: f64,
        /// Bias correction divisor (1 for RMSprop).
        bc: f64,
    },
}

/// The momentum scalars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MomentumKernel {
    /// Coefficient.
    pub mu: f64,
    /// Dampening.
    pub dampening: f64,
    /// Nesterov's variant.
    pub nesterov: bool,
}

/// How the final direction is formed from its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectionSource {
    /// `P = graft(Gf)` (before preconditioning starts).
    Graft,
    /// `P = P_sh * ||graft(Gf)|| / (||P_sh|| + 1e-16)`.
    GraftedShampoo,
    /// `P = P_sh`.
    Shampoo,
}

/// Per-matrix reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// `sum x^2`.
    SumSquares,
    /// `sqrt(sum x^2)`.
    FrobeniusNorm,
    /// `max |M - I|` of an `n x n` matrix.
    MaxAbsDevIdentity,
    /// 1 if every element is finite, else 0.
    AllFinite,
    /// `sum_i M_ii` of an `n x n` matrix.
    Trace,
    /// `max_i sum_j |M_ij|` (the infinity norm) of an `n x n` matrix.
    MaxRowAbsSum,
    /// `sqrt(||M||_F^2 - ||diag M||^2) / ||M||_F` of an `n x n` matrix (0
    /// for a zero matrix; NaN when rounding makes the difference negative,
    /// as in the published criterion): how far `M` is from diagonal.
    OffDiagonalRatio,
}

/// `out[b] = reduction(input[b])` for each of `count` chunks of `numel`.
#[repr(C)]
pub struct ReduceJob<'a, B: Backend> {
    /// Input chunks.
    pub input: B::View<'a>,
    /// Elements per chunk.
    pub numel: usize,
    /// Number of chunks.
    pub count: usize,
    /// What to compute.
    pub kind: Reduction,
    /// `count` results, in the input's dtype.
    pub out: B::ViewMut<'a>,
    /// Which chunks.
    pub select: Selection<'a>,
}

/// The fused elementwise kernels. Per-block scalars live in views of
/// `count` elements; the rest are `f64` job scalars. Every backend checks a
/// job with `Map::check` (in `checks.rs`: lengths, dtypes, selection and
/// the views a job's options need) before it runs any job of a call.
#[repr(C)]
pub enum Map<'a, B: Backend> {
    /// `out = sym(lower(F)) / divisor + eps I`.
    RootInput {
        /// Factors (lower triangle read).
        factors: B::View<'a>,
        /// Full symmetric results.
        out: B::ViewMut<'a>,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Bias correction divisor.
        divisor: f64,
        /// Damping.
        eps: f64,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// Eigenvalue map of the eigenvalue-based roots: `rule` makes the
    /// eigenvalues safe, then `out = lambda^(-exponent)` (or
    /// `lambda^(-exponent/2)` if `half`), in place.
    EigenPower {
        /// Eigenvalues, in place.
        values: B::ViewMut<'a>,
        /// Vector length.
        n: usize,
        /// Number of vectors.
        count: usize,
        /// Damping or cutoff.
        rule: EigenRule,
        /// Inverse exponent.
        exponent: f64,
        /// Produce the square root of the power.
        half: bool,
        /// Which vectors.
        select: Selection<'a>,
    },
    /// `x[b][i, :] *= d[b][i]` (rows of a row-major matrix).
    ScaleRows {
        /// Matrices, in place.
        x: B::ViewMut<'a>,
        /// Row scales.
        d: B::View<'a>,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// Copies the lower triangle onto the upper one.
    Symmetrize {
        /// Matrices, in place.
        x: B::ViewMut<'a>,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// `dst = src` per chunk (casting between dtypes if they differ).
    Copy {
        /// Source.
        src: B::View<'a>,
        /// Destination.
        dst: B::ViewMut<'a>,
        /// Elements per chunk.
        numel: usize,
        /// Number of chunks.
        count: usize,
        /// Which chunks.
        select: Selection<'a>,
    },
    /// `dst = value` per chunk.
    Fill {
        /// Destination.
        dst: B::ViewMut<'a>,
        /// Value.
        value: f64,
        /// Elements per chunk.
        numel: usize,
        /// Number of chunks.
        count: usize,
        /// Which chunks.
        select: Selection<'a>,
    },
    /// Coupled iterations' start: `z = numerator / (scale * s)` with `s` the
    /// matrix's scalar, `X = z^(1/p) I`, `M = z A`. Newton:
    /// `z = (p + 1) / (2 ||A||_F)`; higher order: `z = 1 / trace(A)`.
    NewtonInit {
        /// Damped factors (full).
        a: B::View<'a>,
        /// Per-matrix scalars `s` (Frobenius norms, traces).
        norms: B::View<'a>,
        /// Numerator of `z`.
        numerator: f64,
        /// Scale of `s` in `z`'s denominator.
        scale: f64,
        /// Root estimates.
        x: B::ViewMut<'a>,
        /// Coupled matrices.
        m: B::ViewMut<'a>,
        /// Root `p`.
        p: u32,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// `out = M * coef + diag I` (two roundings on the diagonal): Newton's
    /// `M' = M (-1/p) + (1 + 1/p) I`, `I - M`, Horner steps.
    NewtonCoefficient {
        /// Coupled matrices.
        m: B::View<'a>,
        /// Results.
        out: B::ViewMut<'a>,
        /// Scale of `M`.
        coef: f64,
        /// Added to the diagonal.
        diag: f64,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// Per element of the raw gradient `g`: update the grafting accumulator,
    /// the filtered gradient: `gf = (beta3 m1 + (1 - beta3) g) / bc1` with
    /// `m1` before its update, then `m1 = beta1 m1 + (1 - beta1) g` (for
    /// `beta3 == beta1`: `gf = m1 / bc1` with the updated `m1`); accumulate
    /// `sum graft(gf)^2` per block.
    GradientStatistics {
        /// Raw gradients.
        g: B::View<'a>,
        /// Grafting accumulators.
        v: Option<B::ViewMut<'a>>,
        /// Grafting method.
        graft: GraftKernel,
        /// Filtered-gradient state and the bias-corrected output, when
        /// `beta1 != 0` (else `gf` is `g`).
        filtered: Option<(B::ViewMut<'a>, B::ViewMut<'a>)>,
        /// `beta1`.
        beta1: f64,
        /// `beta3` (Lion's interpolation of the filtered gradient).
        beta3: f64,
        /// Divisor of the filtered gradient.
        bc1: f64,
        /// Per-block `sum graft(gf)^2`, when wanted.
        graft_sq_norms: Option<B::ViewMut<'a>>,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// The final direction, written as `out = -lr * P`:
    /// `P` from [`DirectionSource`], then `P += wd W`, then momentum.
    /// Blocks outside the selection get `-0.0` in `out` (adding `-0.0`
    /// leaves any parameter bit for bit unchanged) and keep their state.
    Direction {
        /// How `P` is formed.
        source: DirectionSource,
        /// Filtered gradient `Gf`.
        gf: B::View<'a>,
        /// Grafting accumulator (for `Graft`).
        v: Option<B::View<'a>>,
        /// Grafting method.
        graft: GraftKernel,
        /// Preconditioned gradient `P_sh` (for the Shampoo sources).
        p_sh: Option<B::View<'a>>,
        /// Per-block `(sum graft(Gf)^2, sum P_sh^2)`: `2 * count` values.
        sq_norms: Option<B::View<'a>>,
        /// Gathered parameters and the decoupled weight decay.
        weight_decay: Option<(B::View<'a>, f64)>,
        /// Momentum buffer and scalars.
        momentum: Option<(B::ViewMut<'a>, MomentumKernel)>,
        /// Learning rate.
        lr: f64,
        /// `-lr * P`.
        out: B::ViewMut<'a>,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// Eigenvalue-corrected statistics: `d = beta2 d + weight r^2` (two
    /// roundings; `d += weight r^2` when `beta2 == 1`).
    EigenvalueUpdate {
        /// Rotated raw gradient.
        r: B::View<'a>,
        /// Corrected eigenvalues, in place.
        d: B::ViewMut<'a>,
        /// EMA coefficient.
        beta2: f64,
        /// Weight of the new square (`1 - beta2`, or 1).
        weight: f64,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// `r = r / ((d / bc2)^exponent + eps)` (`sqrt` for 1/2).
    EigenvalueScale {
        /// Rotated filtered gradient, in place.
        r: B::ViewMut<'a>,
        /// Corrected eigenvalues.
        d: B::View<'a>,
        /// Bias correction divisor.
        bc2: f64,
        /// Damping.
        eps: f64,
        /// Exponent on `d / bc2`.
        exponent: f64,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// Trace scaling: `x <- x * max(t, eps)^(-exponent)` with `t` the
    /// matrix's trace.
    TraceScale {
        /// Matrices, in place.
        x: B::ViewMut<'a>,
        /// Their traces.
        traces: B::View<'a>,
        /// Clamp of the trace.
        eps: f64,
        /// Exponent.
        exponent: f64,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// The higher-order iteration's ridge: `x_ii += max(v * rel, abs)` with
    /// `v` the matrix's scalar (its infinity norm).
    AddRidge {
        /// Matrices, in place.
        x: B::ViewMut<'a>,
        /// Per-matrix scalars.
        values: B::View<'a>,
        /// Relative ridge.
        rel: f64,
        /// Smallest ridge.
        abs: f64,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// Eigenpairs from a (nearly) diagonalized `b = S A S^T`: `values =
    /// diag(b)`, sorted ascending (stable) when `sort`, and the rows of
    /// `vectors` (the eigenvectors) copied into `out_vectors` in the same
    /// order.
    Eigenpairs {
        /// Rotated matrices.
        b: B::View<'a>,
        /// Eigenvectors (rows) of the rotation.
        vectors: B::View<'a>,
        /// Eigenvectors (rows), reordered.
        out_vectors: B::ViewMut<'a>,
        /// Eigenvalues.
        values: B::ViewMut<'a>,
        /// Sort ascending.
        sort: bool,
        /// Matrix size.
        n: usize,
        /// Number of matrices.
        count: usize,
        /// Which matrices.
        select: Selection<'a>,
    },
    /// `dst = src / max(s, floor)` with `s` the block's scalar (its norm).
    ScaleByNorm {
        /// Blocks.
        src: B::View<'a>,
        /// Results.
        dst: B::ViewMut<'a>,
        /// Per-block scalars.
        norms: B::View<'a>,
        /// Smallest divisor.
        floor: f64,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// `x = a x + b y` (two products, one sum).
    Axpby {
        /// In place.
        x: B::ViewMut<'a>,
        /// Second term.
        y: B::View<'a>,
        /// Scale of `x`.
        a: f64,
        /// Scale of `y`.
        b: f64,
        /// Elements per chunk.
        numel: usize,
        /// Number of chunks.
        count: usize,
        /// Which chunks.
        select: Selection<'a>,
    },
    /// `x *= s` with `s` the block's scalar.
    ScaleBlocks {
        /// Blocks, in place.
        x: B::ViewMut<'a>,
        /// Per-block scalars.
        scales: B::View<'a>,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// `dst = sign(src)` (`sign(0) = 0`).
    Sign {
        /// Blocks.
        src: B::View<'a>,
        /// Results.
        dst: B::ViewMut<'a>,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// Iterate averaging's step, with `u = -lr P` in `u`:
    /// `z <- z * shrink` (weight decay, when given), `d = z - w`,
    /// `z <- z + u`, `u <- u c1 + c2 d` (the increment of `w`).
    IterateAverage {
        /// `-lr P`, replaced by the parameter increment.
        u: B::ViewMut<'a>,
        /// The averaging state `Z`.
        z: B::ViewMut<'a>,
        /// The parameters `W` (gathered).
        w: B::View<'a>,
        /// `1 - mu_y mu_x`.
        c1: f64,
        /// `1 - mu_x`.
        c2: f64,
        /// Weight decay's shrink factor of `Z`.
        shrink: Option<f64>,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
    /// `out = (z - w) * coef`: the increment that moves the parameters
    /// between the train and the evaluation sequence.
    Interpolate {
        /// The averaging state `Z`.
        z: B::View<'a>,
        /// The parameters `W` (gathered).
        w: B::View<'a>,
        /// Increments.
        out: B::ViewMut<'a>,
        /// Coefficient.
        coef: f64,
        /// Elements per block.
        numel: usize,
        /// Number of blocks.
        count: usize,
        /// Which blocks.
        select: Selection<'a>,
    },
}

#[cfg(test)]
mod table_tests {
    use super::*;
    use crate::blocking::block_parameter;

    fn entries(shape: &[usize], max: usize) -> Vec<TableEntry> {
        let mut off = 0;
        block_parameter(0, shape, max)
            .into_iter()
            .map(|block| {
                let e = TableEntry {
                    packed_offset: off,
                    block,
                };
                off += e.block.numel();
                e
            })
            .collect()
    }

    #[test]
    fn a_table_gives_each_parameter_its_extent_and_refuses_overlaps() {
        let table = entries(&[5, 6], 4);
        assert_eq!(check_table(&table).unwrap(), vec![30]);
        // A block listed twice overlaps in its parameter.
        let mut twice = table.clone();
        twice.push(TableEntry {
            packed_offset: 30,
            block: table[0].block.clone(),
        });
        assert_eq!(
            check_table(&twice).unwrap_err().to_string(),
            "backend error in block_table: blocks overlap in parameter 0"
        );
        // Two blocks packed into the same place.
        let mut packed = table.clone();
        packed[1].packed_offset = 0;
        assert_eq!(
            check_table(&packed).unwrap_err().to_string(),
            "backend error in block_table: packed blocks overlap"
        );
    }
}
