//! Gathers, scatters, the fused maps and the reductions: argument checks on
//! the host, one kernel launch per run of selected blocks.

use super::kernels::{Args, Kernel, grid_for, grid_matrices, kernel_defines as defs};
use super::{CudaBackend, CudaView, at, complement, runs};
use crate::backend::checks::same_dtype;
use crate::backend::checks::{check_len, check_select};
use crate::backend::{
    DirectionSource, EigenRule, GatherJob, GraftKernel, Map, ReduceJob, Reduction, ScatterJob,
    TableEntry, ViewMutOps, ViewOps, check_table,
};
use crate::strided::nested_stride;
use crate::{DType, Error, Result};

/// Largest block order the kernels' `Geometry` holds (and largest number
/// of dimensions of a strided parameter, size-1 ones left out).
const MAX_ORDER: usize = 8;

/// Words of the kernels' `Geometry`: order, base offset, then dims,
/// strides, starts, sub-dimension counts, sub-dimension sizes and strides
/// (`MAX_ORDER` each).
pub const GEOMETRY_WORDS: usize = 2 + 6 * MAX_ORDER;

/// One block: where it lives in its parameter (the kernels' `Geometry`)
/// and where its packed copy lives.
#[derive(Debug, Clone)]
struct Entry {
    param: usize,
    numel: usize,
    packed_offset: usize,
    geometry: [u64; GEOMETRY_WORDS],
}

/// The kernels' `Geometry` of block `b`.
fn geometry(b: &crate::blocking::BlockSpec) -> Result<[u64; GEOMETRY_WORDS]> {
    let k = b.dims.len();
    let mut g = [0u64; GEOMETRY_WORDS];
    let (dims, strides, start, nsub, sub_sizes, sub_strides) = (
        2,
        2 + MAX_ORDER,
        2 + 2 * MAX_ORDER,
        2 + 3 * MAX_ORDER,
        2 + 4 * MAX_ORDER,
        2 + 5 * MAX_ORDER,
    );
    g[0] = k as u64;
    let mut base = 0usize;
    let mut row_major = vec![1usize; k];
    for i in (0..k - 1).rev() {
        row_major[i] = row_major[i + 1] * b.merged[i + 1];
    }
    let groups = b.memory.as_ref().map(|m| m.merged_groups(&b.merged));
    let mut subs = 0;
    for i in 0..k {
        g[dims + i] = b.dims[i] as u64;
        // Row-major, or strided and nested: one stride. Strided and not
        // nested: split into the original dimensions.
        let group = groups.as_ref().map(|gs| gs[i].as_slice());
        match group {
            Some(group) if nested_stride(group).is_none() => {
                if subs + group.len() > MAX_ORDER {
                    return Err(Error::backend(
                        "block_table",
                        format!(
                            "a strided parameter with more than {MAX_ORDER} dimensions (the CUDA kernels take up to {MAX_ORDER})"
                        ),
                    ));
                }
                g[start + i] = b.start[i] as u64;
                g[nsub + i] = group.len() as u64;
                for &(size, stride) in group {
                    g[sub_sizes + subs] = size as u64;
                    g[sub_strides + subs] = stride as u64;
                    subs += 1;
                }
            }
            _ => {
                let st = group.and_then(nested_stride).unwrap_or(row_major[i]);
                g[strides + i] = st as u64;
                base += b.start[i] * st;
            }
        }
    }
    g[1] = base as u64;
    Ok(g)
}

/// Block geometry, checked once (no two blocks overlap, neither in their
/// packed ranges nor in any parameter) and kept on the host: each gather or
/// scatter passes a block's geometry to its kernel by value.
#[derive(Debug, Clone)]
pub struct CudaBlockTable {
    entries: Vec<Entry>,
    /// One past the largest element touched, per parameter index.
    extent: Vec<usize>,
}

impl CudaBlockTable {
    /// Checks and prepares block geometry (what [`Backend::block_table`]
    /// returns).
    ///
    /// [`Backend::block_table`]: crate::backend::Backend::block_table
    pub fn new(table: Vec<TableEntry>) -> Result<Self> {
        const OP: &str = "block_table";
        let mut entries = Vec::with_capacity(table.len());
        for e in &table {
            let b = &e.block;
            let k = b.dims.len();
            if k == 0 || k > MAX_ORDER || b.merged.len() != k || b.start.len() != k {
                return Err(Error::backend(
                    OP,
                    format!("block of order {k} (the CUDA kernels take 1 to {MAX_ORDER})"),
                ));
            }
            entries.push(Entry {
                param: b.param,
                numel: b.numel(),
                packed_offset: e.packed_offset,
                geometry: geometry(b)?,
            });
        }
        let extent = check_table(&table)?;
        Ok(CudaBlockTable { entries, extent })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Block `i` as the kernels see it: its `Geometry` words (order, base
    /// offset, dims, strides), element count and packed offset. For tests
    /// that run the kernels on the host.
    #[doc(hidden)]
    pub fn kernel_geometry(&self, i: usize) -> ([u64; GEOMETRY_WORDS], usize, usize) {
        let e = &self.entries[i];
        (e.geometry, e.numel, e.packed_offset)
    }
}

fn param_view<'s>(sources: &[Option<CudaView<'s>>], p: usize, what: &str) -> Result<CudaView<'s>> {
    sources
        .get(p)
        .copied()
        .flatten()
        .ok_or_else(|| Error::backend("gather", format!("{what} of parameter {p} is missing")))
}

/// Words of one block's record in a gather or scatter launch (the
/// kernels' `Move`): packed address, parameter address, added tensor's
/// address (0: none), coefficient, element count, accumulate flag, then the
/// block's `Geometry`.
pub const MOVE_WORDS: usize = 6 + GEOMETRY_WORDS;

/// The kernels' `Move` record of one block.
#[doc(hidden)]
pub fn move_words(
    packed: u64,
    param: u64,
    add: Option<(u64, f64)>,
    numel: usize,
    accumulate: bool,
    geometry: &[u64; GEOMETRY_WORDS],
) -> [u64; MOVE_WORDS] {
    let mut w = [0u64; MOVE_WORDS];
    let (add, coef) = add.unwrap_or((0, 0.0));
    w[..6].copy_from_slice(&[
        packed,
        param,
        add,
        coef.to_bits(),
        numel as u64,
        u64::from(accumulate),
    ]);
    w[6..].copy_from_slice(geometry);
    w
}

/// One launch of `kernel` over every record of `records` (of one dtype),
/// its table uploaded once ([`CudaBackend::device_table`]).
fn launch_moves(
    be: &CudaBackend,
    kernel: Kernel,
    dt: DType,
    records: Vec<u64>,
    largest: usize,
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let count = records.len() / MOVE_WORDS;
    let table = be.device_table(records)?;
    be.launch(
        kernel,
        dt,
        grid_for(largest),
        Args::new().u(table).u(count as u64),
    )
}

/// Every job's selected blocks in one launch (per dtype).
pub(super) fn gather(be: &CudaBackend, jobs: &mut [GatherJob<'_, '_, CudaBackend>]) -> Result<()> {
    const OP: &str = "gather";
    let mut records: [(Vec<u64>, usize); 2] = Default::default();
    for job in jobs.iter_mut() {
        let table = job.table;
        check_select(OP, job.select, table.entries.len())?;
        let dt = job.out.dtype();
        let (words, largest) = &mut records[usize::from(dt == DType::F64)];
        for (first, len) in runs(job.select, table.entries.len()) {
            for e in &table.entries[first..first + len] {
                if e.packed_offset + e.numel > job.out.len() {
                    return Err(Error::backend(OP, "packed buffer too small for its table"));
                }
                let src = param_view(job.sources, e.param, "source")?;
                same_dtype(OP, dt, &[("source", src.dtype())])?;
                if src.len() < table.extent[e.param] {
                    return Err(Error::backend(
                        OP,
                        format!("parameter {} is too short", e.param),
                    ));
                }
                let add = match job.add {
                    Some((tensors, coef)) => {
                        let a = param_view(tensors, e.param, "added tensor")?;
                        same_dtype(OP, dt, &[("added tensor", a.dtype())])?;
                        if a.len() < table.extent[e.param] {
                            return Err(Error::backend(OP, "added tensor is too short"));
                        }
                        Some((a.ptr, coef))
                    }
                    None => None,
                };
                words.extend(move_words(
                    at(job.out.ptr, dt, e.packed_offset),
                    src.ptr,
                    add,
                    e.numel,
                    false,
                    &e.geometry,
                ));
                *largest = (*largest).max(e.numel);
            }
        }
    }
    for (dt, (words, largest)) in [DType::F32, DType::F64].into_iter().zip(records) {
        launch_moves(be, Kernel::Gather, dt, words, largest)?;
    }
    Ok(())
}

/// Every job's blocks in one launch (per dtype).
pub(super) fn scatter(be: &CudaBackend, jobs: &mut [ScatterJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "scatter";
    let mut records: [(Vec<u64>, usize); 2] = Default::default();
    for job in jobs.iter_mut() {
        let table = job.table;
        let dt = job.source.dtype();
        same_dtype(OP, dt, &[("parameter", job.dst.dtype())])?;
        if table.extent.iter().any(|&e| e > job.dst.len()) {
            return Err(Error::backend(OP, "parameter shorter than its blocks"));
        }
        if table
            .entries
            .iter()
            .any(|e| e.packed_offset + e.numel > job.source.len())
        {
            return Err(Error::backend(
                OP,
                "packed directions shorter than the table",
            ));
        }
        let (words, largest) = &mut records[usize::from(dt == DType::F64)];
        for e in &table.entries {
            words.extend(move_words(
                at(job.source.ptr, dt, e.packed_offset),
                job.dst.ptr,
                None,
                e.numel,
                job.add,
                &e.geometry,
            ));
            *largest = (*largest).max(e.numel);
        }
    }
    for (dt, (words, largest)) in [DType::F32, DType::F64].into_iter().zip(records) {
        launch_moves(be, Kernel::Scatter, dt, words, largest)?;
    }
    Ok(())
}

const MAP: &str = "map";

/// Kernel numbering of the grafting methods (kernels/map.cu, reduce.cu).
fn graft_code(g: GraftKernel) -> (u64, f64, f64, f64, f64) {
    // (kind, beta2, weight of g^2, eps, bias-correction divisor)
    match g {
        GraftKernel::None => (defs::GRAFT_NONE, 0.0, 0.0, 0.0, 1.0),
        GraftKernel::Sgd => (defs::GRAFT_SGD, 0.0, 0.0, 0.0, 1.0),
        GraftKernel::Adagrad { eps } => (defs::GRAFT_ADAGRAD, 0.0, 0.0, eps, 1.0),
        GraftKernel::Ema {
            beta2,
            weight,
            eps,
            bc,
        } => (defs::GRAFT_EMA, beta2, weight, eps, bc),
    }
}

/// The error of an operation this backend does not implement yet (the
/// optimizer refuses such configurations at construction, see
/// [`crate::backend::Backend::supports`]).
fn not_yet(op: &'static str, what: &str) -> Error {
    Error::backend(
        op,
        format!("{what} is not implemented on the CUDA backend yet"),
    )
}

/// A launch a map or reduction job asks for, issued by [`Batch::flush`].
struct Pending {
    kernel: Kernel,
    dt: DType,
    grid: u32,
    args: Args,
}

/// The launches of one `map` or `reduce` call, one chain per job (its
/// launches in order). The jobs of a call are independent (they touch
/// disjoint memory: the CPU backend runs them in parallel), so the chains
/// are issued round by round (every job's first launch, then every job's
/// second, ...), and within a round the launches of a kernel that has a
/// `_jobs` variant and the same settings become one launch of that
/// variant: each job's own words (addresses, sizes) are a row of a device
/// table, uploaded once and reused while they stay the same, and the
/// settings are its arguments. A step's elementwise work is then one
/// launch per kernel, not one per group.
#[derive(Default)]
pub(super) struct Batch {
    chains: Vec<Vec<Pending>>,
}

/// The `_jobs` variant of a kernel, if it has one (kernels/copy.cu,
/// map.cu, reduce.cu).
fn jobs_variant(k: Kernel) -> Option<Kernel> {
    match k {
        Kernel::GradientStatistics => Some(Kernel::GradientStatisticsJobs),
        Kernel::Direction => Some(Kernel::DirectionJobs),
        Kernel::SumSquares => Some(Kernel::SumSquaresJobs),
        Kernel::Copy => Some(Kernel::CopyJobs),
        Kernel::NewtonCoefficient => Some(Kernel::NewtonCoefficientJobs),
        Kernel::EigenvalueUpdate => Some(Kernel::EigenvalueUpdateJobs),
        Kernel::EigenvalueScale => Some(Kernel::EigenvalueScaleJobs),
        _ => None,
    }
}

impl Batch {
    fn start_job(&mut self) {
        self.chains.push(Vec::new());
    }

    fn launch(&mut self, kernel: Kernel, dt: DType, grid: u32, args: &mut Args) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        if self.chains.is_empty() {
            self.start_job();
        }
        let chain = self.chains.last_mut().expect("a chain was started");
        chain.push(Pending {
            kernel,
            dt,
            grid,
            args: *args,
        });
        Ok(())
    }

    fn flush(self, be: &CudaBackend) -> Result<()> {
        let depth = self.chains.iter().map(Vec::len).max().unwrap_or(0);
        for r in 0..depth {
            let round: Vec<&Pending> = self.chains.iter().filter_map(|c| c.get(r)).collect();
            let mut done = vec![false; round.len()];
            for i in 0..round.len() {
                if done[i] {
                    continue;
                }
                let p = round[i];
                let alike = |q: &Pending| {
                    q.kernel == p.kernel
                        && q.dt == p.dt
                        && q.args.own().count() == p.args.own().count()
                        && q.args.settings().eq(p.args.settings())
                };
                let group: Vec<usize> = match jobs_variant(p.kernel) {
                    Some(_) => (i..round.len())
                        .filter(|&k| !done[k] && alike(round[k]))
                        .collect(),
                    None => vec![i],
                };
                group.iter().for_each(|&k| done[k] = true);
                match (jobs_variant(p.kernel), group.len()) {
                    (Some(variant), n) if n > 1 => {
                        let rows: Vec<u64> =
                            group.iter().flat_map(|&k| round[k].args.own()).collect();
                        // One block per matrix of every job for the per-matrix
                        // reduction; the largest job's grid for the others
                        // (their grid strides over each job in turn).
                        let grids = group.iter().map(|&k| round[k].grid);
                        let grid = if variant == Kernel::SumSquaresJobs {
                            grids.sum::<u32>().min(65_535)
                        } else {
                            grids.max().unwrap_or(0)
                        };
                        let table = be.device_table(rows)?;
                        let mut args = Args::new();
                        args.u(table).u(n as u64);
                        for w in p.args.settings() {
                            args.c(w);
                        }
                        be.launch(variant, p.dt, grid, &mut args)?;
                    }
                    _ => {
                        let mut args = p.args;
                        be.launch(p.kernel, p.dt, p.grid, &mut args)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Launches an elementwise kernel over runs of `per`-element chunks; `args`
/// builds the arguments of one run from `(first, len)`.
#[allow(clippy::too_many_arguments)]
fn per_run(
    b: &mut Batch,
    kernel: Kernel,
    dt: DType,
    select: crate::backend::Selection<'_>,
    count: usize,
    per: usize,
    matrices: bool,
    mut args: impl FnMut(usize, usize, &mut Args),
) -> Result<()> {
    for (first, len) in runs(select, count) {
        let mut a = Args::new();
        args(first, len, &mut a);
        let grid = if matrices {
            grid_matrices(len)
        } else {
            grid_for(len * per)
        };
        if per > 0 {
            b.launch(kernel, dt, grid, &mut a)?;
        }
    }
    Ok(())
}

/// Launches a checked job.
#[allow(clippy::too_many_lines)]
fn map_job(batch: &mut Batch, job: &mut Map<'_, CudaBackend>) -> Result<()> {
    match job {
        Map::RootInput {
            factors,
            out,
            n,
            count,
            divisor,
            eps,
            select,
        } => {
            let (n, count, dt) = (*n, *count, out.dtype());
            let (f, o, d, e) = (factors.ptr, out.ptr, *divisor, *eps);
            per_run(
                batch,
                Kernel::RootInput,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, a| {
                    a.u(at(f, dt, s * n * n))
                        .u(at(o, dt, s * n * n))
                        .u(n as u64)
                        .u(l as u64)
                        .f(d)
                        .f(e);
                },
            )
        }
        Map::EigenPower {
            values,
            n,
            count,
            rule,
            exponent,
            half,
            select,
        } => {
            let (n, count, dt) = (*n, *count, values.dtype());
            let e = if *half { *exponent / 2.0 } else { *exponent };
            // (rule code, eps, atol, rtol; rtol < 0: n machine epsilons)
            let (code, eps, atol, rtol) = match *rule {
                EigenRule::ShiftBelow { eps } => (defs::RULE_SHIFT_BELOW, eps, 0.0, 0.0),
                EigenRule::ShiftNonnegative { eps } => {
                    (defs::RULE_SHIFT_NONNEGATIVE, eps, 0.0, 0.0)
                }
                EigenRule::PseudoInverse { atol, rtol } => {
                    (defs::RULE_PSEUDO_INVERSE, 0.0, atol, rtol.unwrap_or(-1.0))
                }
            };
            let v = values.ptr;
            per_run(
                batch,
                Kernel::EigenPower,
                dt,
                *select,
                count,
                n,
                true,
                |s, l, a| {
                    a.u(at(v, dt, s * n))
                        .u(n as u64)
                        .u(l as u64)
                        .u(code)
                        .f(eps)
                        .f(atol)
                        .f(rtol)
                        .f(e);
                },
            )
        }
        Map::ScaleRows {
            x,
            d,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, x.dtype());
            let (xp, dp) = (x.ptr, d.ptr);
            per_run(
                batch,
                Kernel::ScaleRows,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, a| {
                    a.u(at(xp, dt, s * n * n))
                        .u(at(dp, dt, s * n))
                        .u(n as u64)
                        .u(l as u64);
                },
            )
        }
        Map::Symmetrize {
            x,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, x.dtype());
            let xp = x.ptr;
            per_run(
                batch,
                Kernel::Symmetrize,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, a| {
                    a.u(at(xp, dt, s * n * n)).u(n as u64).u(l as u64);
                },
            )
        }
        Map::Copy {
            src,
            dst,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let (sd, dd) = (src.dtype(), dst.dtype());
            let (kernel, kdt) = match (sd, dd) {
                (DType::F32, DType::F64) => (Kernel::CastF32F64, dd),
                (DType::F64, DType::F32) => (Kernel::CastF64F32, dd),
                _ => (Kernel::Copy, dd),
            };
            for (s, l) in runs(*select, count) {
                batch.launch(
                    kernel,
                    kdt,
                    grid_for(l * numel),
                    Args::new()
                        .u(at(dst.ptr, dd, s * numel))
                        .u(at(src.ptr, sd, s * numel))
                        .u((l * numel) as u64),
                )?;
            }
            Ok(())
        }
        Map::Fill {
            dst,
            value,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, dst.dtype());
            let (dp, v) = (dst.ptr, *value);
            per_run(
                batch,
                Kernel::Fill,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(dp, dt, s * numel)).f(v).u((l * numel) as u64);
                },
            )
        }
        Map::NewtonInit {
            a,
            norms,
            numerator,
            scale,
            x,
            m,
            p,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, x.dtype());
            let (ap, np, xp, mp) = (a.ptr, norms.ptr, x.ptr, m.ptr);
            let (num, sc, inv) = (*numerator, *scale, 1.0 / *p as f64);
            per_run(
                batch,
                Kernel::NewtonInit,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, args| {
                    let o = s * n * n;
                    args.u(at(ap, dt, o))
                        .u(at(np, dt, s))
                        .u(at(xp, dt, o))
                        .u(at(mp, dt, o))
                        .f(num)
                        .f(sc)
                        .f(inv)
                        .u(n as u64)
                        .u(l as u64);
                },
            )
        }
        Map::NewtonCoefficient {
            m,
            out,
            coef,
            diag,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, out.dtype());
            let (alpha, diag) = (*coef, *diag);
            let (mp, op) = (m.ptr, out.ptr);
            per_run(
                batch,
                Kernel::NewtonCoefficient,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, a| {
                    a.u(at(mp, dt, s * n * n))
                        .u(at(op, dt, s * n * n))
                        .f(alpha)
                        .f(diag)
                        .u(n as u64)
                        .u(l as u64);
                },
            )
        }
        Map::GradientStatistics {
            g,
            v,
            graft,
            filtered,
            beta1,
            beta3,
            bc1,
            graft_sq_norms,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, g.dtype());
            let (b3, lion) = (*beta3, u64::from(*beta3 != *beta1));
            let (kind, beta2, weight, eps, bc) = graft_code(*graft);
            let vp = v.as_ref().map_or(0, |v| v.ptr);
            let (m1p, gfp) = filtered.as_ref().map_or((0, 0), |(m, f)| (m.ptr, f.ptr));
            let (gp, b1, d1) = (g.ptr, *beta1, *bc1);
            let off = |p: u64, s: usize| if p == 0 { 0 } else { at(p, dt, s * numel) };
            per_run(
                batch,
                Kernel::GradientStatistics,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(gp, dt, s * numel))
                        .u(off(vp, s))
                        .c(kind)
                        .f(beta2)
                        .f(weight)
                        .u(off(m1p, s))
                        .u(off(gfp, s))
                        .f(b1)
                        .f(1.0 - b1)
                        .f(b3)
                        .f(1.0 - b3)
                        .c(lion)
                        .f(d1)
                        .u((l * numel) as u64);
                },
            )?;
            if let Some(norms) = graft_sq_norms.as_ref() {
                let src = if gfp != 0 { gfp } else { gp };
                // graft() reads the accumulator only for Adagrad and EMA.
                let reads_v = matches!(kind, defs::GRAFT_ADAGRAD | defs::GRAFT_EMA);
                let vk = if vp != 0 && reads_v { vp } else { 0 };
                let np = norms.ptr;
                per_run(
                    batch,
                    Kernel::SumSquares,
                    dt,
                    *select,
                    count,
                    numel,
                    true,
                    |s, l, a| {
                        a.u(at(src, dt, s * numel))
                            .u(off(vk, s))
                            .c(if vk != 0 { kind } else { defs::GRAFT_NONE })
                            .f(bc)
                            .f(eps)
                            .u(at(np, dt, s))
                            .u(numel as u64)
                            .u(l as u64)
                            .c(0); // the sum, not its square root
                    },
                )?;
            }
            Ok(())
        }
        Map::Direction {
            source,
            gf,
            v,
            graft,
            p_sh,
            sq_norms,
            weight_decay,
            momentum,
            lr,
            out,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, out.dtype());
            let src_code = match source {
                DirectionSource::Graft => defs::SOURCE_GRAFT,
                DirectionSource::GraftedShampoo => defs::SOURCE_GRAFTED_SHAMPOO,
                DirectionSource::Shampoo => defs::SOURCE_SHAMPOO,
            };
            let (kind, _, _, eps, bc) = graft_code(*graft);
            let kind = if v.is_some() { kind } else { defs::GRAFT_NONE };
            let vp = v.map_or(0, |v| v.ptr);
            let pp = p_sh.map_or(0, |p| p.ptr);
            let sp = sq_norms.map_or(0, |s| s.ptr);
            let (wp, wd) = weight_decay.map_or((0, 0.0), |(w, c)| (w.ptr, c));
            let (bp, mu, keep, nesterov) =
                momentum.as_ref().map_or((0, 0.0, 0.0, false), |(b, k)| {
                    (b.ptr, k.mu, 1.0 - k.dampening, k.nesterov)
                });
            let (gp, op, neg_lr) = (gf.ptr, out.ptr, -*lr);
            let off = |p: u64, s: usize| if p == 0 { 0 } else { at(p, dt, s * numel) };
            let sel = runs(*select, count);
            for &(s, l) in &sel {
                if numel == 0 {
                    break;
                }
                batch.launch(
                    Kernel::Direction,
                    dt,
                    grid_for(l * numel),
                    Args::new()
                        .c(src_code)
                        .u(off(gp, s))
                        .u(off(vp, s))
                        .c(kind)
                        .f(bc)
                        .f(eps)
                        .u(off(pp, s))
                        .u(sp)
                        .u(s as u64)
                        .u(count as u64)
                        .u(off(wp, s))
                        .f(wd)
                        .u(off(bp, s))
                        .f(mu)
                        .f(keep)
                        .c(nesterov as u64)
                        .f(neg_lr)
                        .u(off(op, s))
                        .u(numel as u64)
                        .u(l as u64),
                )?;
            }
            // Blocks outside the selection get -0.0 and keep their state.
            for (s, l) in complement(&sel, count) {
                batch.launch(
                    Kernel::Fill,
                    dt,
                    grid_for(l * numel),
                    Args::new().u(off(op, s)).f(-0.0).u((l * numel) as u64),
                )?;
            }
            Ok(())
        }
        Map::EigenvalueUpdate {
            r,
            d,
            beta2,
            weight,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, d.dtype());
            let (rp, dp, b2, w) = (r.ptr, d.ptr, *beta2, *weight);
            per_run(
                batch,
                Kernel::EigenvalueUpdate,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(rp, dt, s * numel))
                        .u(at(dp, dt, s * numel))
                        .f(b2)
                        .f(w)
                        .u((l * numel) as u64);
                },
            )
        }
        Map::EigenvalueScale {
            r,
            d,
            bc2,
            eps,
            exponent,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, r.dtype());
            let (rp, dp, b, e, x) = (r.ptr, d.ptr, *bc2, *eps, *exponent);
            per_run(
                batch,
                Kernel::EigenvalueScale,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(rp, dt, s * numel))
                        .u(at(dp, dt, s * numel))
                        .f(b)
                        .f(e)
                        .f(x)
                        .u((l * numel) as u64);
                },
            )
        }
        Map::TraceScale {
            x,
            traces,
            eps,
            exponent,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, x.dtype());
            let (xp, tp, e, p) = (x.ptr, traces.ptr, *eps, *exponent);
            per_run(
                batch,
                Kernel::TraceScale,
                dt,
                *select,
                count,
                n * n,
                false,
                |s, l, a| {
                    a.u(at(xp, dt, s * n * n))
                        .u(at(tp, dt, s))
                        .f(e)
                        .f(p)
                        .u(n as u64)
                        .u(l as u64);
                },
            )
        }
        Map::AddRidge {
            x,
            values,
            rel,
            abs,
            n,
            count,
            select,
        } => {
            let (n, count, dt) = (*n, *count, x.dtype());
            let (xp, vp, r, ab) = (x.ptr, values.ptr, *rel, *abs);
            per_run(
                batch,
                Kernel::AddRidge,
                dt,
                *select,
                count,
                n,
                false,
                |s, l, a| {
                    a.u(at(xp, dt, s * n * n))
                        .u(at(vp, dt, s))
                        .f(r)
                        .f(ab)
                        .u(n as u64)
                        .u(l as u64);
                },
            )
        }
        Map::Eigenpairs { .. } => Err(not_yet(
            MAP,
            "eigenpairs of a rotated factor (adaptive and QR eigendecompositions)",
        )),
        Map::ScaleByNorm {
            src,
            dst,
            norms,
            floor,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, dst.dtype());
            let (sp, dp, np, f) = (src.ptr, dst.ptr, norms.ptr, *floor);
            per_run(
                batch,
                Kernel::ScaleBlocks,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(sp, dt, s * numel))
                        .u(at(dp, dt, s * numel))
                        .u(at(np, dt, s))
                        .f(f)
                        .u(1)
                        .u(numel as u64)
                        .u(l as u64);
                },
            )
        }
        Map::ScaleBlocks {
            x,
            scales,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, x.dtype());
            let (xp, sp) = (x.ptr, scales.ptr);
            per_run(
                batch,
                Kernel::ScaleBlocks,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(xp, dt, s * numel))
                        .u(at(xp, dt, s * numel))
                        .u(at(sp, dt, s))
                        .f(0.0)
                        .u(0)
                        .u(numel as u64)
                        .u(l as u64);
                },
            )
        }
        Map::Axpby {
            x,
            y,
            a,
            b,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, x.dtype());
            let (xp, yp, ca, cb) = (x.ptr, y.ptr, *a, *b);
            per_run(
                batch,
                Kernel::Axpby,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, args| {
                    args.u(at(xp, dt, s * numel))
                        .u(at(yp, dt, s * numel))
                        .f(ca)
                        .f(cb)
                        .u((l * numel) as u64);
                },
            )
        }
        Map::Sign {
            src,
            dst,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, dst.dtype());
            let (sp, dp) = (src.ptr, dst.ptr);
            per_run(
                batch,
                Kernel::SignMap,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(sp, dt, s * numel))
                        .u(at(dp, dt, s * numel))
                        .u((l * numel) as u64);
                },
            )
        }
        Map::IterateAverage {
            u,
            z,
            w,
            c1,
            c2,
            shrink,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, u.dtype());
            let (up, zp, wp, k1, k2) = (u.ptr, z.ptr, w.ptr, *c1, *c2);
            let (sh, has) = (shrink.unwrap_or(1.0), u64::from(shrink.is_some()));
            per_run(
                batch,
                Kernel::IterateAverage,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(up, dt, s * numel))
                        .u(at(zp, dt, s * numel))
                        .u(at(wp, dt, s * numel))
                        .f(k1)
                        .f(k2)
                        .f(sh)
                        .u(has)
                        .u((l * numel) as u64);
                },
            )
        }
        Map::Interpolate {
            z,
            w,
            out,
            coef,
            numel,
            count,
            select,
        } => {
            let (numel, count, dt) = (*numel, *count, out.dtype());
            let (zp, wp, op, c) = (z.ptr, w.ptr, out.ptr, *coef);
            per_run(
                batch,
                Kernel::Interpolate,
                dt,
                *select,
                count,
                numel,
                false,
                |s, l, a| {
                    a.u(at(zp, dt, s * numel))
                        .u(at(wp, dt, s * numel))
                        .u(at(op, dt, s * numel))
                        .f(c)
                        .u((l * numel) as u64);
                },
            )
        }
    }
}

pub(super) fn map(be: &CudaBackend, jobs: &mut [Map<'_, CudaBackend>]) -> Result<()> {
    // Every job is checked before any is launched.
    for job in jobs.iter() {
        job.check()?;
    }
    let mut batch = Batch::default();
    for job in jobs.iter_mut() {
        batch.start_job();
        map_job(&mut batch, job)?;
    }
    batch.flush(be)
}

pub(super) fn reduce(be: &CudaBackend, jobs: &mut [ReduceJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "reduce";
    let mut batch = Batch::default();
    for job in jobs.iter_mut() {
        batch.start_job();
        let (numel, count, dt) = (job.numel, job.count, job.input.dtype());
        check_select(OP, job.select, count)?;
        same_dtype(OP, dt, &[("output", job.out.dtype())])?;
        check_len(OP, "input", job.input.len(), count, numel)?;
        check_len(OP, "output", job.out.len(), count, 1)?;
        let (ip, op) = (job.input.ptr, job.out.ptr);
        match job.kind {
            Reduction::SumSquares | Reduction::FrobeniusNorm => {
                let root = (job.kind == Reduction::FrobeniusNorm) as u64;
                per_run(
                    &mut batch,
                    Kernel::SumSquares,
                    dt,
                    job.select,
                    count,
                    numel.max(1),
                    true,
                    |s, l, a| {
                        a.u(at(ip, dt, s * numel))
                            .u(0)
                            .c(defs::GRAFT_NONE)
                            .f(1.0)
                            .f(0.0)
                            .u(at(op, dt, s))
                            .u(numel as u64)
                            .u(l as u64)
                            .c(root);
                    },
                )?;
            }
            Reduction::MaxAbsDevIdentity => {
                let n = (numel as f64).sqrt().round() as usize;
                if n * n != numel {
                    return Err(Error::backend(
                        OP,
                        format!("{numel} elements are not a square matrix"),
                    ));
                }
                per_run(
                    &mut batch,
                    Kernel::MaxAbsDevIdentity,
                    dt,
                    job.select,
                    count,
                    numel.max(1),
                    true,
                    |s, l, a| {
                        a.u(at(ip, dt, s * numel))
                            .u(at(op, dt, s))
                            .u(n as u64)
                            .u(l as u64);
                    },
                )?;
            }
            Reduction::Trace | Reduction::MaxRowAbsSum => {
                let n = (numel as f64).sqrt().round() as usize;
                if n * n != numel {
                    return Err(Error::backend(
                        OP,
                        format!("{numel} elements are not a square matrix"),
                    ));
                }
                let kind = if job.kind == Reduction::MaxRowAbsSum {
                    defs::STAT_MAX_ROW_ABS_SUM
                } else {
                    defs::STAT_TRACE
                };
                // One thread per matrix: sums in the CPU backend's order.
                per_run(
                    &mut batch,
                    Kernel::MatrixStat,
                    dt,
                    job.select,
                    count,
                    1,
                    false,
                    |s, l, a| {
                        a.u(at(ip, dt, s * numel))
                            .u(at(op, dt, s))
                            .u(kind)
                            .u(n as u64)
                            .u(l as u64);
                    },
                )?;
            }
            Reduction::OffDiagonalRatio => {
                return Err(not_yet(
                    OP,
                    "the off-diagonal ratio (adaptive and QR eigendecompositions)",
                ));
            }
            Reduction::AllFinite => {
                per_run(
                    &mut batch,
                    Kernel::AllFinite,
                    dt,
                    job.select,
                    count,
                    numel.max(1),
                    true,
                    |s, l, a| {
                        a.u(at(ip, dt, s * numel))
                            .u(at(op, dt, s))
                            .u(numel as u64)
                            .u(1)
                            .u(0)
                            .u(l as u64);
                    },
                )?;
            }
        }
    }
    batch.flush(be)
}
