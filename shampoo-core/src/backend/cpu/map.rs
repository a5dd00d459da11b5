//! The fused elementwise kernels of [`Map`], one task per block or matrix.
//!
//! Arithmetic follows the published implementation's order of operations
//! (e.g. `v *= b2; v += (1 - b2) g g` in two roundings), so that float64
//! runs match the reference trajectories to rounding.

use super::kernels;
use super::linalg::CpuFloat;
use super::{CpuBackend, take_mut};
use crate::backend::{DirectionSource, EigenRule, GraftKernel, Map, MomentumKernel};
use crate::{DType, Float, HostView, HostViewMut, Result};

/// One block's (or matrix's) share of a map.
enum Task<'a, T> {
    RootInput {
        f: &'a [T],
        out: &'a mut [T],
        n: usize,
        divisor: T,
        eps: T,
    },
    EigenPower {
        values: &'a mut [T],
        rule: EigenRule,
        exponent: T,
    },
    ScaleRows {
        x: &'a mut [T],
        d: &'a [T],
        n: usize,
    },
    Symmetrize {
        x: &'a mut [T],
        n: usize,
    },
    Copy {
        src: HostView<'a>,
        dst: &'a mut [T],
    },
    Fill {
        dst: &'a mut [T],
        value: T,
    },
    NewtonInit {
        a: &'a [T],
        norm: T,
        numerator: T,
        scale: T,
        x: &'a mut [T],
        m: &'a mut [T],
        p: u32,
        n: usize,
    },
    NewtonCoefficient {
        m: &'a [T],
        out: &'a mut [T],
        coef: T,
        diag: T,
        n: usize,
    },
    GradientStatistics {
        g: &'a [T],
        v: Option<&'a mut [T]>,
        graft: GraftKernel,
        filtered: Option<(&'a mut [T], &'a mut [T])>,
        beta1: f64,
        beta3: f64,
        bc1: T,
        sq_norm: Option<&'a mut T>,
    },
    Direction {
        source: DirectionSource,
        gf: &'a [T],
        v: Option<&'a [T]>,
        graft: GraftKernel,
        p_sh: Option<&'a [T]>,
        ratio: T,
        wd: Option<(&'a [T], T)>,
        momentum: Option<(&'a mut [T], MomentumKernel)>,
        neg_lr: T,
        out: &'a mut [T],
    },
    EigenvalueUpdate {
        r: &'a [T],
        d: &'a mut [T],
        beta2: f64,
        weight: f64,
    },
    EigenvalueScale {
        r: &'a mut [T],
        d: &'a [T],
        bc2: T,
        eps: T,
        exponent: f64,
    },
    TraceScale {
        x: &'a mut [T],
        scale: T,
    },
    AddRidge {
        x: &'a mut [T],
        ridge: T,
        n: usize,
    },
    Eigenpairs {
        b: &'a [T],
        vectors: &'a [T],
        out_vectors: &'a mut [T],
        values: &'a mut [T],
        sort: bool,
        n: usize,
    },
    Scaled {
        src: Option<&'a [T]>,
        dst: &'a mut [T],
        scale: Scale<T>,
    },
    Axpby {
        x: &'a mut [T],
        y: &'a [T],
        a: T,
        b: T,
    },
    Sign {
        src: &'a [T],
        dst: &'a mut [T],
    },
    IterateAverage {
        u: &'a mut [T],
        z: &'a mut [T],
        w: &'a [T],
        c1: T,
        c2: T,
        shrink: Option<T>,
    },
    Interpolate {
        z: &'a [T],
        w: &'a [T],
        out: &'a mut [T],
        coef: T,
    },
}

/// How [`Task::Scaled`] scales a block.
#[derive(Clone, Copy)]
enum Scale<T> {
    /// `x / max(s, floor)`.
    DivideClamped(T, T),
    /// `x * s`.
    Multiply(T),
}

/// `out = graft(g)`.
fn graft_into<T: CpuFloat>(kind: GraftKernel, out: &mut [T], g: &[T], v: Option<&[T]>) {
    match (kind, v) {
        (GraftKernel::Adagrad { eps }, Some(v)) => {
            kernels::adaptive_sqrt(out, g, v, T::from_f64(eps))
        }
        (GraftKernel::Ema { eps, bc, .. }, Some(v)) => {
            kernels::adaptive(out, g, v, T::from_f64(bc), T::from_f64(eps))
        }
        _ => out.copy_from_slice(g),
    }
}

/// `sum graft(g)^2`.
fn graft_sum_squares<T: CpuFloat>(kind: GraftKernel, g: &[T], v: Option<&[T]>) -> f64 {
    match (kind, v) {
        (GraftKernel::Adagrad { eps }, Some(v)) => {
            kernels::adaptive_sqrt_sum_squares(g, v, T::from_f64(eps))
        }
        (GraftKernel::Ema { eps, bc, .. }, Some(v)) => {
            kernels::adaptive_sum_squares(g, v, T::from_f64(bc), T::from_f64(eps))
        }
        _ => kernels::sum_squares(g),
    }
}

fn run_task<T: CpuFloat>(task: Task<'_, T>) {
    match task {
        Task::RootInput {
            f,
            out,
            n,
            divisor,
            eps,
        } => {
            // Lower triangle scaled row by row, then mirrored.
            for i in 0..n {
                let (src, dst) = (&f[i * n..i * n + i + 1], &mut out[i * n..i * n + i + 1]);
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = x / divisor;
                }
                out[i * n + i] += eps;
            }
            crate::matrix::mirror_lower(out, n);
        }
        Task::EigenPower {
            values,
            rule,
            exponent,
        } => eigen_power(values, rule, exponent),
        Task::ScaleRows { x, d, n } => {
            for (row, &s) in x.chunks_mut(n).zip(d) {
                for v in row {
                    *v *= s;
                }
            }
        }
        Task::Symmetrize { x, n } => crate::matrix::mirror_lower(x, n),
        Task::Copy { src, dst } => match src {
            HostView::F32(s) => dst
                .iter_mut()
                .zip(s)
                .for_each(|(d, &s)| *d = T::from_f64(s as f64)),
            HostView::F64(s) => dst
                .iter_mut()
                .zip(s)
                .for_each(|(d, &s)| *d = T::from_f64(s)),
        },
        Task::Fill { dst, value } => dst.fill(value),
        Task::NewtonInit {
            a,
            norm,
            numerator,
            scale,
            x,
            m,
            p,
            n,
        } => {
            let z = numerator / (scale * norm);
            let zp = z.powf(T::from_f64(1.0 / p as f64));
            x.fill(T::ZERO);
            for i in 0..n {
                x[i * n + i] = zp;
            }
            for (m, &a) in m.iter_mut().zip(a) {
                *m = z * a;
            }
        }
        Task::NewtonCoefficient {
            m,
            out,
            coef,
            diag,
            n,
        } => {
            for (o, &x) in out.iter_mut().zip(m) {
                *o = x * coef;
            }
            for i in 0..n {
                out[i * n + i] += diag;
            }
        }
        Task::GradientStatistics {
            g,
            v,
            graft,
            filtered,
            beta1,
            beta3,
            bc1,
            sq_norm,
        } => {
            let mut v = v;
            if let Some(acc) = v.as_deref_mut() {
                match graft {
                    GraftKernel::Adagrad { .. } => kernels::add_square(acc, g),
                    GraftKernel::Ema { beta2, weight, .. } => {
                        kernels::ema_square(acc, g, T::from_f64(beta2), T::from_f64(weight))
                    }
                    _ => {}
                }
            }
            let gf: &[T] = match filtered {
                Some((m1, gf)) if beta3 == beta1 => {
                    kernels::ema_divided(
                        m1,
                        gf,
                        g,
                        T::from_f64(beta1),
                        T::from_f64(1.0 - beta1),
                        bc1,
                    );
                    gf
                }
                Some((m1, gf)) => {
                    kernels::interpolate_then_ema(
                        m1,
                        gf,
                        g,
                        [T::from_f64(beta3), T::from_f64(1.0 - beta3)],
                        [T::from_f64(beta1), T::from_f64(1.0 - beta1)],
                        bc1,
                    );
                    gf
                }
                None => g,
            };
            if let Some(s) = sq_norm {
                *s = T::from_f64(graft_sum_squares(graft, gf, v.as_deref()));
            }
        }
        Task::Direction {
            source,
            gf,
            v,
            graft,
            p_sh,
            ratio,
            wd,
            momentum,
            neg_lr,
            out,
        } => {
            match source {
                DirectionSource::Graft => graft_into(graft, out, gf, v),
                DirectionSource::GraftedShampoo => kernels::scaled(out, p_sh.expect("p_sh"), ratio),
                DirectionSource::Shampoo => out.copy_from_slice(p_sh.expect("p_sh")),
            }
            if let Some((w, wd)) = wd {
                kernels::add_scaled(out, w, wd);
            }
            if let Some((b, m)) = momentum {
                kernels::momentum(
                    out,
                    b,
                    T::from_f64(m.mu),
                    T::from_f64(1.0 - m.dampening),
                    m.nesterov,
                );
            }
            kernels::scale(out, neg_lr);
        }
        Task::EigenvalueUpdate {
            r,
            d,
            beta2,
            weight,
        } => {
            let c = T::from_f64(weight);
            if beta2 == 1.0 {
                for (d, &x) in d.iter_mut().zip(r) {
                    *d += c * x * x;
                }
            } else {
                let b = T::from_f64(beta2);
                for (d, &x) in d.iter_mut().zip(r) {
                    let mut t = *d * b;
                    t += c * x * x;
                    *d = t;
                }
            }
        }
        Task::EigenvalueScale {
            r,
            d,
            bc2,
            eps,
            exponent,
        } => {
            if exponent == 0.5 {
                for (r, &d) in r.iter_mut().zip(d) {
                    *r /= (d / bc2).sqrt() + eps;
                }
            } else {
                let e = T::from_f64(exponent);
                for (r, &d) in r.iter_mut().zip(d) {
                    *r /= (d / bc2).powf(e) + eps;
                }
            }
        }
        Task::TraceScale { x, scale } => kernels::scale(x, scale),
        Task::AddRidge { x, ridge, n } => {
            for i in 0..n {
                x[i * n + i] += ridge;
            }
        }
        Task::Eigenpairs {
            b,
            vectors,
            out_vectors,
            values,
            sort,
            n,
        } => {
            let mut order: Vec<usize> = (0..n).collect();
            if sort {
                // Stable, ascending; NaN last.
                let key = |i: usize| b[i * n + i].to_f64();
                order.sort_by(|&i, &j| {
                    let (x, y) = (key(i), key(j));
                    x.partial_cmp(&y)
                        .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
                });
            }
            for (k, &i) in order.iter().enumerate() {
                values[k] = b[i * n + i];
                out_vectors[k * n..(k + 1) * n].copy_from_slice(&vectors[i * n..(i + 1) * n]);
            }
        }
        Task::Scaled { src, dst, scale } => match (scale, src) {
            (Scale::DivideClamped(s, floor), Some(src)) => {
                let d = if s > floor { s } else { floor };
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = x / d;
                }
            }
            (Scale::Multiply(s), None) => kernels::scale(dst, s),
            (Scale::Multiply(s), Some(src)) => kernels::scaled(dst, src, s),
            (Scale::DivideClamped(s, floor), None) => {
                let d = if s > floor { s } else { floor };
                for o in dst.iter_mut() {
                    *o /= d;
                }
            }
        },
        Task::Axpby { x, y, a, b } => {
            for (x, &y) in x.iter_mut().zip(y) {
                *x = a * *x + b * y;
            }
        }
        Task::Sign { src, dst } => {
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = if x > T::ZERO {
                    T::ONE
                } else if x < T::ZERO {
                    -T::ONE
                } else {
                    x * T::ZERO
                };
            }
        }
        Task::IterateAverage {
            u,
            z,
            w,
            c1,
            c2,
            shrink,
        } => {
            for ((u, z), &w) in u.iter_mut().zip(z.iter_mut()).zip(w) {
                let zs = match shrink {
                    Some(s) => *z * s,
                    None => *z,
                };
                let d = zs - w;
                *z = zs + *u;
                *u = *u * c1 + c2 * d;
            }
        }
        Task::Interpolate { z, w, out, coef } => {
            for ((o, &z), &w) in out.iter_mut().zip(z).zip(w) {
                *o = (z - w) * coef;
            }
        }
    }
}

/// [`Map::EigenPower`] on one vector of eigenvalues.
fn eigen_power<T: CpuFloat>(values: &mut [T], rule: EigenRule, exponent: T) {
    let e = -exponent;
    let min = values
        .iter()
        .copied()
        .fold(T::from_f64(f64::INFINITY), |m, x| if x < m { x } else { m });
    match rule {
        EigenRule::ShiftBelow { eps } => {
            let eps = T::from_f64(eps);
            if min < eps {
                for x in values.iter_mut() {
                    *x = (*x + (-min)) + eps;
                }
            }
        }
        EigenRule::ShiftNonnegative { eps } => {
            let eps = T::from_f64(eps);
            for x in values.iter_mut() {
                if min < T::ZERO {
                    *x += -min;
                }
                *x += eps;
            }
        }
        EigenRule::PseudoInverse { atol, rtol } => {
            let max = values
                .iter()
                .copied()
                .fold(T::ZERO, |m, x| if x > m { x } else { m });
            let rtol = match rtol {
                Some(r) => T::from_f64(r),
                None => T::from_f64(values.len() as f64) * T::EPSILON,
            };
            let atol = T::from_f64(atol);
            let c = rtol * max;
            let cutoff = if c > atol { c } else { atol };
            for x in values.iter_mut() {
                *x = if *x <= cutoff { T::ZERO } else { x.powf(e) };
            }
            return;
        }
    }
    for x in values.iter_mut() {
        *x = x.powf(e);
    }
}

/// Which chunks a selection keeps.
fn mask(select: Option<&[u32]>, count: usize) -> Vec<bool> {
    match select {
        None => vec![true; count],
        Some(s) => {
            let mut k = vec![false; count];
            s.iter().for_each(|&i| k[i as usize] = true);
            k
        }
    }
}

/// Chunks of a slice (`count` of them), `None` where not kept (empty ones
/// when `per` is 0).
fn split<'a, T>(data: &'a mut [T], per: usize, keep: &[bool]) -> Vec<Option<&'a mut [T]>> {
    if per == 0 {
        return keep.iter().map(|&k| k.then(<&mut [T]>::default)).collect();
    }
    data.chunks_mut(per)
        .zip(keep)
        .map(|(c, &k)| k.then_some(c))
        .collect()
}

/// Pushes one task per selected chunk of `data` (`count` chunks of `per`
/// elements): `make(i, chunk)` builds chunk `i`'s task, which costs `per`.
fn per_chunk<'a, T>(
    tasks: &mut Vec<(u64, Task<'a, T>)>,
    data: &'a mut [T],
    per: usize,
    select: Option<&[u32]>,
    count: usize,
    mut make: impl FnMut(usize, &'a mut [T]) -> Task<'a, T>,
) {
    let keep = mask(select, count);
    for (i, c) in split(data, per, &keep).into_iter().enumerate() {
        if let Some(c) = c {
            tasks.push((per as u64, make(i, c)));
        }
    }
}

/// Chunk `i` of `per` elements.
fn chunk<T>(data: &[T], i: usize, per: usize) -> &[T] {
    &data[i * per..(i + 1) * per]
}

fn opt_split<'a, T>(
    data: Option<&'a mut [T]>,
    per: usize,
    keep: &[bool],
) -> Vec<Option<&'a mut [T]>> {
    match data {
        Some(d) => split(d, per, keep),
        None => keep.iter().map(|_| None).collect(),
    }
}

/// The typed slice of a view the job's check has seen (its dtype is the
/// job's, its length right).
fn tm<T: Float>(v: HostViewMut<'_>) -> &mut [T] {
    v.typed::<T>().expect("Map::check: the job's dtype")
}

/// The typed slice of a view the job's check has seen.
fn tr<T: Float>(v: HostView<'_>) -> &[T] {
    v.typed::<T>().expect("Map::check: the job's dtype")
}

/// A checked job's tasks.
fn map_job<'a, T: CpuFloat>(job: &mut Map<'a, CpuBackend>, tasks: &mut Vec<(u64, Task<'a, T>)>) {
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
            let (n, count) = (*n, *count);
            let f = tr::<T>(*factors);
            let out = tm::<T>(take_mut(out));
            let (divisor, eps) = (T::from_f64(*divisor), T::from_f64(*eps));
            per_chunk(tasks, out, n * n, *select, count, |i, out| {
                Task::RootInput {
                    f: chunk(f, i, n * n),
                    out,
                    n,
                    divisor,
                    eps,
                }
            });
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
            let (n, count) = (*n, *count);
            let values = tm::<T>(take_mut(values));
            let e = if *half { *exponent / 2.0 } else { *exponent };
            let (rule, exponent) = (*rule, T::from_f64(e));
            per_chunk(tasks, values, n, *select, count, |_, values| {
                Task::EigenPower {
                    values,
                    rule,
                    exponent,
                }
            });
        }
        Map::ScaleRows {
            x,
            d,
            n,
            count,
            select,
        } => {
            let (n, count) = (*n, *count);
            let x = tm::<T>(take_mut(x));
            let d = tr::<T>(*d);
            per_chunk(tasks, x, n * n, *select, count, |i, x| Task::ScaleRows {
                x,
                d: chunk(d, i, n),
                n,
            });
        }
        Map::Symmetrize {
            x,
            n,
            count,
            select,
        } => {
            let (n, count) = (*n, *count);
            let x = tm::<T>(take_mut(x));
            per_chunk(tasks, x, n * n, *select, count, |_, x| Task::Symmetrize {
                x,
                n,
            });
        }
        Map::Copy {
            src,
            dst,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let dst = tm::<T>(take_mut(dst));
            let src = *src;
            per_chunk(tasks, dst, numel, *select, count, |i, dst| Task::Copy {
                src: src.slice(i * numel, numel),
                dst,
            });
        }
        Map::Fill {
            dst,
            value,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let dst = tm::<T>(take_mut(dst));
            let value = T::from_f64(*value);
            per_chunk(tasks, dst, numel, *select, count, |_, dst| Task::Fill {
                dst,
                value,
            });
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
            let (numerator, scale) = (T::from_f64(*numerator), T::from_f64(*scale));
            let (n, count) = (*n, *count);
            let a = tr::<T>(*a);
            let norms = tr::<T>(*norms);
            let x = tm::<T>(take_mut(x));
            let m = tm::<T>(take_mut(m));
            let keep = mask(*select, count);
            let xs = split(x, n * n, &keep);
            let ms = split(m, n * n, &keep);
            for (i, (x, m)) in xs.into_iter().zip(ms).enumerate() {
                if let (Some(x), Some(m)) = (x, m) {
                    tasks.push((
                        (n * n) as u64,
                        Task::NewtonInit {
                            a: chunk(a, i, n * n),
                            norm: norms[i],
                            numerator,
                            scale,
                            x,
                            m,
                            p: *p,
                            n,
                        },
                    ));
                }
            }
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
            let (n, count) = (*n, *count);
            let m = tr::<T>(*m);
            let out = tm::<T>(take_mut(out));
            let (coef, diag) = (T::from_f64(*coef), T::from_f64(*diag));
            per_chunk(tasks, out, n * n, *select, count, |i, out| {
                Task::NewtonCoefficient {
                    m: chunk(m, i, n * n),
                    out,
                    coef,
                    diag,
                    n,
                }
            });
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
            let (numel, count) = (*numel, *count);
            let g = tr::<T>(*g);
            let keep = mask(*select, count);
            let vs = opt_split(v.as_mut().map(|v| tm::<T>(take_mut(v))), numel, &keep);
            let (m1s, gfs) = match filtered.as_mut() {
                Some((m1, gf)) => (
                    split(tm::<T>(take_mut(m1)), numel, &keep),
                    split(tm::<T>(take_mut(gf)), numel, &keep),
                ),
                None => (vec![], vec![]),
            };
            let norms = graft_sq_norms.as_mut().map(|s| tm::<T>(take_mut(s)));
            let mut norms: Vec<Option<&mut T>> = match norms {
                Some(n) => n
                    .iter_mut()
                    .zip(&keep)
                    .map(|(x, &k)| k.then_some(x))
                    .collect(),
                None => keep.iter().map(|_| None).collect(),
            };
            let mut m1s = m1s.into_iter();
            let mut gfs = gfs.into_iter();
            for (i, v) in vs.into_iter().enumerate() {
                let filt = match (m1s.next(), gfs.next()) {
                    (Some(Some(m)), Some(Some(f))) => Some((m, f)),
                    _ => None,
                };
                if !keep[i] {
                    continue;
                }
                tasks.push((
                    numel as u64,
                    Task::GradientStatistics {
                        g: chunk(g, i, numel),
                        v,
                        graft: *graft,
                        filtered: filt,
                        beta1: *beta1,
                        beta3: *beta3,
                        bc1: T::from_f64(*bc1),
                        sq_norm: norms[i].take(),
                    },
                ));
            }
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
            let (numel, count) = (*numel, *count);
            let gf = tr::<T>(*gf);
            let v = v.map(tr::<T>);
            let p_sh = p_sh.map(tr::<T>);
            let norms = sq_norms.map(tr::<T>);
            let wd = weight_decay.map(|(w, c)| (tr::<T>(w), T::from_f64(c)));
            let all = vec![true; count];
            let keep = mask(*select, count);
            let mut moms = match momentum.as_mut() {
                Some((b, k)) => split(tm::<T>(take_mut(b)), numel, &keep)
                    .into_iter()
                    .map(|b| b.map(|b| (b, *k)))
                    .collect(),
                None => Vec::new(),
            }
            .into_iter();
            let outs = split(tm::<T>(take_mut(out)), numel, &all);
            for (i, o) in outs.into_iter().enumerate() {
                let o = o.expect("every chunk");
                let mom = if momentum.is_some() {
                    moms.next().flatten()
                } else {
                    None
                };
                if !keep[i] {
                    tasks.push((
                        numel as u64,
                        Task::Fill {
                            dst: o,
                            value: T::from_f64(-0.0),
                        },
                    ));
                    continue;
                }
                let ratio = match norms {
                    Some(ns) => {
                        let (g2, s2) = (ns[i], ns[count + i]);
                        g2.sqrt() / (s2.sqrt() + T::from_f64(1e-16))
                    }
                    None => T::ONE,
                };
                let r = i * numel..(i + 1) * numel;
                tasks.push((
                    numel as u64,
                    Task::Direction {
                        source: *source,
                        gf: &gf[r.clone()],
                        v: v.map(|v| &v[r.clone()]),
                        graft: *graft,
                        p_sh: p_sh.map(|p| &p[r.clone()]),
                        ratio,
                        wd: wd.map(|(w, c)| (&w[r.clone()], c)),
                        momentum: mom,
                        neg_lr: T::from_f64(-*lr),
                        out: o,
                    },
                ));
            }
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
            let (numel, count) = (*numel, *count);
            let r = tr::<T>(*r);
            let d = tm::<T>(take_mut(d));
            let (beta2, weight) = (*beta2, *weight);
            per_chunk(tasks, d, numel, *select, count, |i, d| {
                Task::EigenvalueUpdate {
                    r: chunk(r, i, numel),
                    d,
                    beta2,
                    weight,
                }
            });
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
            let (numel, count) = (*numel, *count);
            let d = tr::<T>(*d);
            let r = tm::<T>(take_mut(r));
            let (bc2, eps, exponent) = (T::from_f64(*bc2), T::from_f64(*eps), *exponent);
            per_chunk(tasks, r, numel, *select, count, |i, r| {
                Task::EigenvalueScale {
                    r,
                    d: chunk(d, i, numel),
                    bc2,
                    eps,
                    exponent,
                }
            });
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
            let (n, count) = (*n, *count);
            let x = tm::<T>(take_mut(x));
            let traces = tr::<T>(*traces);
            let (eps, e) = (T::from_f64(*eps), T::from_f64(-*exponent));
            per_chunk(tasks, x, n * n, *select, count, |i, x| {
                let t = traces[i];
                let t = if t > eps { t } else { eps };
                Task::TraceScale {
                    x,
                    scale: t.powf(e),
                }
            });
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
            let (n, count) = (*n, *count);
            let x = tm::<T>(take_mut(x));
            let values = tr::<T>(*values);
            let (rel, abs) = (T::from_f64(*rel), T::from_f64(*abs));
            per_chunk(tasks, x, n * n, *select, count, |i, x| {
                let r = values[i] * rel;
                let ridge = if r > abs { r } else { abs };
                Task::AddRidge { x, ridge, n }
            });
        }
        Map::Eigenpairs {
            b,
            vectors,
            out_vectors,
            values,
            sort,
            n,
            count,
            select,
        } => {
            let (n, count) = (*n, *count);
            let b = tr::<T>(*b);
            let vectors = tr::<T>(*vectors);
            let outs = tm::<T>(take_mut(out_vectors));
            let vals = tm::<T>(take_mut(values));
            let keep = mask(*select, count);
            let outs = split(outs, n * n, &keep);
            let vals = split(vals, n, &keep);
            for (i, (o, v)) in outs.into_iter().zip(vals).enumerate() {
                if let (Some(out_vectors), Some(values)) = (o, v) {
                    tasks.push((
                        (n * n) as u64,
                        Task::Eigenpairs {
                            b: chunk(b, i, n * n),
                            vectors: chunk(vectors, i, n * n),
                            out_vectors,
                            values,
                            sort: *sort,
                            n,
                        },
                    ));
                }
            }
        }
        Map::ScaleByNorm {
            src,
            dst,
            norms,
            floor,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let src = tr::<T>(*src);
            let dst = tm::<T>(take_mut(dst));
            let norms = tr::<T>(*norms);
            let floor = T::from_f64(*floor);
            per_chunk(tasks, dst, numel, *select, count, |i, dst| Task::Scaled {
                src: Some(chunk(src, i, numel)),
                dst,
                scale: Scale::DivideClamped(norms[i], floor),
            });
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
            let (numel, count) = (*numel, *count);
            let x = tm::<T>(take_mut(x));
            let y = tr::<T>(*y);
            let (a, b) = (T::from_f64(*a), T::from_f64(*b));
            per_chunk(tasks, x, numel, *select, count, |i, x| Task::Axpby {
                x,
                y: chunk(y, i, numel),
                a,
                b,
            });
        }
        Map::ScaleBlocks {
            x,
            scales,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let x = tm::<T>(take_mut(x));
            let scales = tr::<T>(*scales);
            per_chunk(tasks, x, numel, *select, count, |i, dst| Task::Scaled {
                src: None,
                dst,
                scale: Scale::Multiply(scales[i]),
            });
        }
        Map::Sign {
            src,
            dst,
            numel,
            count,
            select,
        } => {
            let (numel, count) = (*numel, *count);
            let src = tr::<T>(*src);
            let dst = tm::<T>(take_mut(dst));
            per_chunk(tasks, dst, numel, *select, count, |i, dst| Task::Sign {
                src: chunk(src, i, numel),
                dst,
            });
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
            let (numel, count) = (*numel, *count);
            let us = tm::<T>(take_mut(u));
            let zs = tm::<T>(take_mut(z));
            let w = tr::<T>(*w);
            let keep = mask(*select, count);
            let (c1, c2) = (T::from_f64(*c1), T::from_f64(*c2));
            let shrink = shrink.map(T::from_f64);
            let us = split(us, numel, &keep);
            let zs = split(zs, numel, &keep);
            for (i, (u, z)) in us.into_iter().zip(zs).enumerate() {
                if let (Some(u), Some(z)) = (u, z) {
                    tasks.push((
                        numel as u64,
                        Task::IterateAverage {
                            u,
                            z,
                            w: chunk(w, i, numel),
                            c1,
                            c2,
                            shrink,
                        },
                    ));
                }
            }
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
            let (numel, count) = (*numel, *count);
            let z = tr::<T>(*z);
            let w = tr::<T>(*w);
            let out = tm::<T>(take_mut(out));
            let coef = T::from_f64(*coef);
            per_chunk(tasks, out, numel, *select, count, |i, out| {
                Task::Interpolate {
                    z: chunk(z, i, numel),
                    w: chunk(w, i, numel),
                    out,
                    coef,
                }
            });
        }
    }
}

pub(super) fn map(be: &CpuBackend, jobs: &mut [Map<'_, CpuBackend>]) -> Result<()> {
    // Every job is checked before any runs.
    for job in jobs.iter() {
        job.check()?;
    }
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.dtype() {
            DType::F32 => map_job::<f32>(job, &mut t32),
            DType::F64 => map_job::<f64>(job, &mut t64),
        }
    }
    be.run(t32, run_task, t64, run_task);
    Ok(())
}
