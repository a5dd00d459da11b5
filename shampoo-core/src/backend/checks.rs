//! Checks of jobs that are the same for every backend: a selection's
//! indices, a view's length, a view's dtype, and [`Map::check`], the whole
//! validation of an elementwise job, written once next to the jobs'
//! definition. Both backends call [`Map::check`] on every job of a call
//! before they run (or launch) any of them.

use super::{Backend, DirectionSource, GraftKernel, Map, Selection, ViewMutOps, ViewOps};
use crate::{DType, Error, Result};

/// Checks that a view holds `count * per` elements.
pub(crate) fn check_len(
    op: &'static str,
    what: &str,
    len: usize,
    count: usize,
    per: usize,
) -> Result<()> {
    if len != count * per {
        return Err(Error::backend(
            op,
            format!("{what} has {len} elements, expected {count} x {per}"),
        ));
    }
    Ok(())
}

/// Checks a selection's indices.
pub(crate) fn check_select(op: &'static str, select: Option<&[u32]>, count: usize) -> Result<()> {
    match select.and_then(|s| s.iter().find(|&&i| i as usize >= count)) {
        Some(&bad) => Err(Error::backend(
            op,
            format!("selected index {bad} out of {count}"),
        )),
        None => Ok(()),
    }
}

/// Checks that every dtype equals the job's.
pub(crate) fn same_dtype(op: &'static str, dt: DType, others: &[(&str, DType)]) -> Result<()> {
    match others.iter().find(|(_, d)| *d != dt) {
        Some((what, d)) => Err(Error::backend(
            op,
            format!("{what} is {d}, expected {dt} data"),
        )),
        None => Ok(()),
    }
}

const MAP: &str = "map";

/// One view of a map job as its check sees it.
struct Operand {
    /// Its name in errors.
    what: &'static str,
    /// Its dtype, `None` where any dtype will do (a copy's source).
    dtype: Option<DType>,
    /// Its number of elements.
    len: usize,
    /// The number it must have.
    want: Want,
}

/// How many elements an [`Operand`] must have.
enum Want {
    /// Exactly `count x per`.
    Exact(usize, usize),
    /// At least this many, else the error `short`.
    AtLeast(usize, &'static str),
}

impl Operand {
    fn check_len(&self) -> Result<()> {
        match self.want {
            Want::Exact(count, per) => check_len(MAP, self.what, self.len, count, per),
            Want::AtLeast(count, _) if self.len >= count => Ok(()),
            Want::AtLeast(_, short) => Err(Error::backend(MAP, short)),
        }
    }
}

/// A shared view of `count x per` elements.
fn read<V: ViewOps>(what: &'static str, v: &V, count: usize, per: usize) -> Operand {
    Operand {
        what,
        dtype: Some(v.dtype()),
        len: v.len(),
        want: Want::Exact(count, per),
    }
}

/// An exclusive view of `count x per` elements.
fn write<V: ViewMutOps>(what: &'static str, v: &V, count: usize, per: usize) -> Operand {
    Operand {
        what,
        dtype: Some(v.dtype()),
        len: v.len(),
        want: Want::Exact(count, per),
    }
}

impl<B: Backend> Map<'_, B> {
    /// The dtype the job computes in: its output's (every other view but a
    /// copy's source must have it).
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Map::RootInput { out, .. } => out.dtype(),
            Map::EigenPower { values, .. } => values.dtype(),
            Map::ScaleRows { x, .. } | Map::Symmetrize { x, .. } => x.dtype(),
            Map::Copy { dst, .. } | Map::Fill { dst, .. } => dst.dtype(),
            Map::NewtonInit { x, .. } => x.dtype(),
            Map::NewtonCoefficient { out, .. } => out.dtype(),
            Map::GradientStatistics { g, .. } => g.dtype(),
            Map::Direction { out, .. } => out.dtype(),
            Map::EigenvalueUpdate { d, .. } => d.dtype(),
            Map::EigenvalueScale { r, .. } => r.dtype(),
            Map::TraceScale { x, .. } | Map::AddRidge { x, .. } => x.dtype(),
            Map::Eigenpairs { values, .. } => values.dtype(),
            Map::ScaleByNorm { dst, .. } | Map::Sign { dst, .. } => dst.dtype(),
            Map::Axpby { x, .. } | Map::ScaleBlocks { x, .. } => x.dtype(),
            Map::IterateAverage { u, .. } => u.dtype(),
            Map::Interpolate { out, .. } => out.dtype(),
        }
    }

    /// Checks a job, the same for every backend: the selection, then each
    /// view's length, then each view's dtype against [`Map::dtype`], then
    /// the views a job's options need. A job that passes cannot fail on
    /// its views' shapes in any backend.
    pub(crate) fn check(&self) -> Result<()> {
        let (count, select, operands) = self.operands();
        check_select(MAP, select, count)?;
        for o in &operands {
            o.check_len()?;
        }
        let dtypes: Vec<(&str, DType)> = operands
            .iter()
            .filter_map(|o| Some((o.what, o.dtype?)))
            .collect();
        same_dtype(MAP, self.dtype(), &dtypes)?;
        if let Map::Direction {
            source,
            v,
            graft,
            p_sh,
            sq_norms,
            ..
        } = self
        {
            if *source == DirectionSource::Graft
                && *graft != GraftKernel::Sgd
                && *graft != GraftKernel::None
                && v.is_none()
            {
                return Err(Error::backend(MAP, "grafting accumulator missing"));
            }
            if *source != DirectionSource::Graft && p_sh.is_none() {
                return Err(Error::backend(MAP, "preconditioned gradient missing"));
            }
            if *source == DirectionSource::GraftedShampoo && sq_norms.is_none() {
                return Err(Error::backend(MAP, "grafting norms missing"));
            }
        }
        Ok(())
    }

    /// The job's number of blocks, its selection and its views.
    #[allow(clippy::too_many_lines)]
    fn operands(&self) -> (usize, Selection<'_>, Vec<Operand>) {
        match self {
            Map::RootInput {
                factors,
                out,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("factors", factors, *count, n * n),
                    write("out", out, *count, n * n),
                ],
            ),
            Map::EigenPower {
                values,
                n,
                count,
                select,
                ..
            } => (*count, *select, vec![write("values", values, *count, *n)]),
            Map::ScaleRows {
                x,
                d,
                n,
                count,
                select,
            } => (
                *count,
                *select,
                vec![write("x", x, *count, n * n), read("d", d, *count, *n)],
            ),
            Map::Symmetrize {
                x,
                n,
                count,
                select,
            } => (*count, *select, vec![write("x", x, *count, n * n)]),
            Map::Copy {
                src,
                dst,
                numel,
                count,
                select,
            } => (
                *count,
                *select,
                vec![
                    write("dst", dst, *count, *numel),
                    // A copy casts between dtypes.
                    Operand {
                        dtype: None,
                        ..read("src", src, *count, *numel)
                    },
                ],
            ),
            Map::Fill {
                dst,
                numel,
                count,
                select,
                ..
            } => (*count, *select, vec![write("dst", dst, *count, *numel)]),
            Map::NewtonInit {
                a,
                norms,
                x,
                m,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("a", a, *count, n * n),
                    Operand {
                        want: Want::AtLeast(*count, "too few norms"),
                        ..read("norms", norms, *count, 1)
                    },
                    write("x", x, *count, n * n),
                    write("m", m, *count, n * n),
                ],
            ),
            Map::NewtonCoefficient {
                m,
                out,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("m", m, *count, n * n),
                    write("out", out, *count, n * n),
                ],
            ),
            Map::GradientStatistics {
                g,
                v,
                filtered,
                graft_sq_norms,
                numel,
                count,
                select,
                ..
            } => {
                let mut ops = vec![read("g", g, *count, *numel)];
                ops.extend(v.as_ref().map(|v| write("v", v, *count, *numel)));
                if let Some((m1, gf)) = filtered {
                    ops.push(write("m1", m1, *count, *numel));
                    ops.push(write("gf", gf, *count, *numel));
                }
                ops.extend(
                    graft_sq_norms
                        .as_ref()
                        .map(|s| write("graft_sq_norms", s, *count, 1)),
                );
                (*count, *select, ops)
            }
            Map::Direction {
                gf,
                v,
                p_sh,
                sq_norms,
                weight_decay,
                momentum,
                out,
                numel,
                count,
                select,
                ..
            } => {
                let mut ops = vec![
                    read("gf", gf, *count, *numel),
                    write("out", out, *count, *numel),
                ];
                ops.extend(v.as_ref().map(|v| read("v", v, *count, *numel)));
                ops.extend(p_sh.as_ref().map(|p| read("p_sh", p, *count, *numel)));
                ops.extend(sq_norms.as_ref().map(|s| read("sq_norms", s, 2, *count)));
                ops.extend(
                    weight_decay
                        .as_ref()
                        .map(|(w, _)| read("weights", w, *count, *numel)),
                );
                ops.extend(
                    momentum
                        .as_ref()
                        .map(|(b, _)| write("momentum", b, *count, *numel)),
                );
                (*count, *select, ops)
            }
            Map::EigenvalueUpdate {
                r,
                d,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![read("r", r, *count, *numel), write("d", d, *count, *numel)],
            ),
            Map::EigenvalueScale {
                r,
                d,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![read("d", d, *count, *numel), write("r", r, *count, *numel)],
            ),
            Map::TraceScale {
                x,
                traces,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    write("x", x, *count, n * n),
                    read("traces", traces, *count, 1),
                ],
            ),
            Map::AddRidge {
                x,
                values,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    write("x", x, *count, n * n),
                    read("values", values, *count, 1),
                ],
            ),
            Map::Eigenpairs {
                b,
                vectors,
                out_vectors,
                values,
                n,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("b", b, *count, n * n),
                    read("vectors", vectors, *count, n * n),
                    write("out_vectors", out_vectors, *count, n * n),
                    write("values", values, *count, *n),
                ],
            ),
            Map::ScaleByNorm {
                src,
                dst,
                norms,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("src", src, *count, *numel),
                    write("dst", dst, *count, *numel),
                    read("norms", norms, *count, 1),
                ],
            ),
            Map::Axpby {
                x,
                y,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![write("x", x, *count, *numel), read("y", y, *count, *numel)],
            ),
            Map::ScaleBlocks {
                x,
                scales,
                numel,
                count,
                select,
            } => (
                *count,
                *select,
                vec![
                    write("x", x, *count, *numel),
                    read("scales", scales, *count, 1),
                ],
            ),
            Map::Sign {
                src,
                dst,
                numel,
                count,
                select,
            } => (
                *count,
                *select,
                vec![
                    read("src", src, *count, *numel),
                    write("dst", dst, *count, *numel),
                ],
            ),
            Map::IterateAverage {
                u,
                z,
                w,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    write("u", u, *count, *numel),
                    write("z", z, *count, *numel),
                    read("w", w, *count, *numel),
                ],
            ),
            Map::Interpolate {
                z,
                w,
                out,
                numel,
                count,
                select,
                ..
            } => (
                *count,
                *select,
                vec![
                    read("z", z, *count, *numel),
                    read("w", w, *count, *numel),
                    write("out", out, *count, *numel),
                ],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MomentumKernel;
    use crate::backend::cpu::{CpuBackend, CpuBuffer};

    /// The shared check's error for `job`, asserted to be the backend's
    /// `map` error for it too.
    fn refused<B: Backend>(be: &B, mut job: Map<'_, B>) -> String {
        let check = job.check().unwrap_err().to_string();
        let map = be.map(std::slice::from_mut(&mut job)).unwrap_err();
        assert_eq!(map.to_string(), check, "{}", be.name());
        check
    }

    /// Bad jobs of each kind (wrong length, wrong dtype, bad selection,
    /// missing view), built the same way for any backend: the errors, each
    /// the same from [`Map::check`] and from the backend's `map`.
    #[allow(clippy::too_many_lines)]
    fn bad_jobs<B: Backend>(be: &B) -> Vec<String> {
        let f64s = |len| be.alloc(DType::F64, len).unwrap();
        let f32s = |len| be.alloc(DType::F32, len).unwrap();
        let mut got = Vec::new();
        {
            // 2 matrices of 2 x 2, an output one element short.
            let (f, mut o) = (f64s(8), f64s(7));
            got.push(refused(
                be,
                Map::RootInput {
                    factors: be.view(&f),
                    out: be.view_mut(&mut o),
                    n: 2,
                    count: 2,
                    divisor: 1.0,
                    eps: 0.0,
                    select: None,
                },
            ));
        }
        {
            let (mut x, d) = (f64s(8), f32s(4));
            got.push(refused(
                be,
                Map::ScaleRows {
                    x: be.view_mut(&mut x),
                    d: be.view(&d),
                    n: 2,
                    count: 2,
                    select: None,
                },
            ));
        }
        {
            let mut d = f64s(4);
            got.push(refused(
                be,
                Map::Fill {
                    dst: be.view_mut(&mut d),
                    value: 1.0,
                    numel: 2,
                    count: 2,
                    select: Some(&[0, 3]),
                },
            ));
        }
        {
            let (src, mut dst) = (f32s(3), f64s(4));
            got.push(refused(
                be,
                Map::Copy {
                    src: be.view(&src),
                    dst: be.view_mut(&mut dst),
                    numel: 2,
                    count: 2,
                    select: None,
                },
            ));
        }
        {
            let (a, norms, mut x, mut m) = (f64s(8), f64s(1), f64s(8), f64s(8));
            got.push(refused(
                be,
                Map::NewtonInit {
                    a: be.view(&a),
                    norms: be.view(&norms),
                    numerator: 1.0,
                    scale: 2.0,
                    x: be.view_mut(&mut x),
                    m: be.view_mut(&mut m),
                    p: 2,
                    n: 2,
                    count: 2,
                    select: None,
                },
            ));
        }
        {
            let (g, mut m1, mut gf) = (f64s(6), f32s(6), f64s(6));
            got.push(refused(
                be,
                Map::GradientStatistics {
                    g: be.view(&g),
                    v: None,
                    graft: GraftKernel::Sgd,
                    filtered: Some((be.view_mut(&mut m1), be.view_mut(&mut gf))),
                    beta1: 0.9,
                    beta3: 0.9,
                    bc1: 1.0,
                    graft_sq_norms: None,
                    numel: 3,
                    count: 2,
                    select: None,
                },
            ));
        }
        // Direction: a missing accumulator, preconditioned gradient or
        // grafting norms, and norms of the wrong length.
        let sources = [
            (DirectionSource::Graft, false, None),
            (DirectionSource::Shampoo, false, None),
            (DirectionSource::GraftedShampoo, true, None),
            (DirectionSource::GraftedShampoo, true, Some(3)),
        ];
        for (source, with_p, norms_len) in sources {
            let (gf, p, mut out, mut mom) = (f64s(6), f64s(6), f64s(6), f64s(6));
            let norms = f64s(norms_len.unwrap_or(4));
            got.push(refused(
                be,
                Map::Direction {
                    source,
                    gf: be.view(&gf),
                    v: None,
                    graft: GraftKernel::Adagrad { eps: 1e-8 },
                    p_sh: with_p.then(|| be.view(&p)),
                    sq_norms: norms_len.map(|_| be.view(&norms)),
                    weight_decay: None,
                    momentum: Some((
                        be.view_mut(&mut mom),
                        MomentumKernel {
                            mu: 0.9,
                            dampening: 0.0,
                            nesterov: false,
                        },
                    )),
                    lr: 0.1,
                    out: be.view_mut(&mut out),
                    numel: 3,
                    count: 2,
                    select: None,
                },
            ));
        }
        {
            let (mut u, mut z, w) = (f64s(6), f32s(6), f64s(6));
            got.push(refused(
                be,
                Map::IterateAverage {
                    u: be.view_mut(&mut u),
                    z: be.view_mut(&mut z),
                    w: be.view(&w),
                    c1: 0.5,
                    c2: 0.5,
                    shrink: None,
                    numel: 3,
                    count: 2,
                    select: Some(&[1]),
                },
            ));
        }
        {
            // The CUDA backend does not run this job yet; its check is the
            // same.
            let (b, v, mut ov, mut vals) = (f64s(8), f64s(8), f64s(8), f64s(3));
            got.push(refused(
                be,
                Map::Eigenpairs {
                    b: be.view(&b),
                    vectors: be.view(&v),
                    out_vectors: be.view_mut(&mut ov),
                    values: be.view_mut(&mut vals),
                    sort: true,
                    n: 2,
                    count: 2,
                    select: None,
                },
            ));
        }
        got
    }

    const BAD_JOBS: [&str; 12] = [
        "backend error in map: out has 7 elements, expected 2 x 4",
        "backend error in map: d is f32, expected f64 data",
        "backend error in map: selected index 3 out of 2",
        "backend error in map: src has 3 elements, expected 2 x 2",
        "backend error in map: too few norms",
        "backend error in map: m1 is f32, expected f64 data",
        "backend error in map: grafting accumulator missing",
        "backend error in map: preconditioned gradient missing",
        "backend error in map: grafting norms missing",
        "backend error in map: sq_norms has 3 elements, expected 2 x 2",
        "backend error in map: z is f32, expected f64 data",
        "backend error in map: values has 3 elements, expected 2 x 2",
    ];

    #[test]
    fn the_cpu_backend_refuses_a_bad_map_job_with_the_shared_checks_error() {
        let be = CpuBackend::new(1).unwrap();
        assert_eq!(bad_jobs(&be), BAD_JOBS);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn the_cuda_backend_refuses_a_bad_map_job_with_the_shared_checks_error() {
        let be = crate::backend::cuda::CudaBackend::planner();
        assert_eq!(bad_jobs(&be), BAD_JOBS);
        assert!(be.take_plan().is_empty(), "a refused job launches nothing");
    }

    /// `dst = 1` for 2 chunks of 2.
    fn fill<B: Backend>(dst: B::ViewMut<'_>) -> Map<'_, B> {
        Map::Fill {
            dst,
            value: 1.0,
            numel: 2,
            count: 2,
            select: None,
        }
    }

    /// A good fill of `dst` and one of a view too short, in one call: the
    /// error.
    fn good_then_bad<B: Backend>(be: &B, dst: &mut B::Buffer) -> String {
        let mut short = be.alloc(DType::F64, 3).unwrap();
        let mut jobs = [fill(be.view_mut(dst)), fill(be.view_mut(&mut short))];
        be.map(&mut jobs).unwrap_err().to_string()
    }

    const SHORT_FILL: &str = "backend error in map: dst has 3 elements, expected 2 x 2";

    #[test]
    fn a_bad_job_in_a_list_fails_before_any_job_of_the_list_runs() {
        let cpu = CpuBackend::new(1).unwrap();
        let mut dst = cpu.alloc(DType::F64, 4).unwrap();
        assert_eq!(good_then_bad(&cpu, &mut dst), SHORT_FILL);
        assert!(matches!(&dst, CpuBuffer::F64(v) if v == &[0.0; 4]));
        cpu.map(&mut [fill(cpu.view_mut(&mut dst))]).unwrap();
        assert!(matches!(&dst, CpuBuffer::F64(v) if v == &[1.0; 4]));
        #[cfg(feature = "cuda")]
        {
            let planner = crate::backend::cuda::CudaBackend::planner();
            let mut dst = planner.alloc(DType::F64, 4).unwrap();
            planner.take_plan();
            assert_eq!(good_then_bad(&planner, &mut dst), SHORT_FILL);
            assert!(planner.take_plan().is_empty(), "nothing launched");
            planner
                .map(&mut [fill(planner.view_mut(&mut dst))])
                .unwrap();
            assert_eq!(planner.take_plan().len(), 1);
        }
    }

    /// Blocks of no elements: the statistics (with a filtered gradient) and
    /// the direction are no-ops on every backend, not errors.
    fn empty_blocks<B: Backend>(be: &B) -> Result<()> {
        let none = || be.alloc(DType::F64, 0);
        let (g, mut m1, mut gf, mut out) = (none()?, none()?, none()?, none()?);
        be.map(&mut [Map::GradientStatistics {
            g: be.view(&g),
            v: None,
            graft: GraftKernel::Sgd,
            filtered: Some((be.view_mut(&mut m1), be.view_mut(&mut gf))),
            beta1: 0.9,
            beta3: 0.9,
            bc1: 1.0,
            graft_sq_norms: None,
            numel: 0,
            count: 2,
            select: Some(&[1]),
        }])?;
        be.map(&mut [Map::Direction {
            source: DirectionSource::Graft,
            gf: be.view(&gf),
            v: None,
            graft: GraftKernel::Sgd,
            p_sh: None,
            sq_norms: None,
            weight_decay: None,
            momentum: None,
            lr: 0.1,
            out: be.view_mut(&mut out),
            numel: 0,
            count: 2,
            select: Some(&[0]),
        }])
    }

    #[test]
    fn blocks_of_no_elements_are_no_op_maps() {
        empty_blocks(&CpuBackend::new(1).unwrap()).unwrap();
        #[cfg(feature = "cuda")]
        empty_blocks(&crate::backend::cuda::CudaBackend::planner()).unwrap();
    }
}
