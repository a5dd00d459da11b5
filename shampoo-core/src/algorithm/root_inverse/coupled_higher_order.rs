//! The coupled higher-order root inverse (the published
//! `CoupledHigherOrderConfig`): for `1/e = p/q` (the exact fraction of its
//! float64 value), with `b_0 = 1`, `b_i = b_{i-1} (1 + (i-1) p) / (i p)`:
//!
//! ```text
//! lam = ||A||_inf;  A_r = A + max(lam rel_epsilon, abs_epsilon) I
//! z = 1 / trace(A_r);  X = z^(1/p) I;  M = z A_r
//! one Newton step (M' = (1 + 1/p) I - M/p; X <- X M'; M <- M'^p M); err = max|M - I|
//! while err > tolerance and iterations < max_iterations:
//!     E = I - M;  M' = b_{o-1} E + b_{o-2} I;  M' <- b_i I + M' E  (i = o-3 .. 0)
//!     X <- X M';  M <- M'^p M;  new = max|M - I|
//!     stop (keeping this update) if new > 1.2 err or (new == err and err < 1e-3)
//!     err = new
//! fail if max|A_r X^p - I| > 0.1;  X <- X^q
//! ```
//!
//! Per-block decisions are read back once per iteration. A failure (the
//! accuracy check, or a non-finite `X^q`) keeps the previous root and counts
//! (see [`super::failures`]). The group epsilon is not used.

use super::coupled_newton::{max_dev_identity, newton_step, power, reduce_role, set_status, start};
use super::products::{Product, products};
use super::reduce_into_values;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors};
use crate::backend::{Backend, EighStatus, Map, Reduction, ViewOps};
use crate::config::{RootInverse, root_fraction};
use crate::layout::FactorSpec;
use crate::{Error, Result};

/// `(p, q)` of a factor's root `1/e = p/q`.
fn terms(spec: &FactorSpec) -> (u32, u32) {
    // Validated at construction ([`check_roots`]).
    root_fraction(spec.exponent).map_or((1, 1), |(p, q)| (p as u32, q as u32))
}

/// Checks that every factor's root is a short binary fraction.
pub(crate) fn check_roots(layout: &crate::layout::Layout) -> Result<()> {
    for g in &layout.groups {
        for f in &g.factors {
            if root_fraction(f.exponent).is_none() {
                return Err(Error::config(format!(
                    "coupled_higher_order: the root 1/{} of dimension {} of blocks {:?} is not a short binary fraction p/q (p, q <= {})",
                    f.exponent,
                    f.dim,
                    g.dims,
                    crate::config::MAX_ROOT_TERM
                )));
            }
        }
    }
    Ok(())
}

/// The coefficients `b_0 .. b_{order-1}` of the Horner polynomial.
fn coefficients(p: u32, order: u32) -> Vec<f64> {
    let p = p as f64;
    let mut b = vec![1.0];
    let (mut num, mut den) = (1.0f64, 1.0f64);
    for i in 1..order {
        num *= 1.0 + (i as f64 - 1.0) * p;
        den *= i as f64 * p;
        b.push(num / den);
    }
    b
}

/// Runs the method for every active block (`A` in `work`); leaves `X` in
/// `Role::X` and each block's status (`Ok` or `Failed`).
pub(super) fn compute<B: Backend>(opt: &mut Shampoo<B>, method: RootInverse) -> Result<()> {
    let RootInverse::CoupledHigherOrder {
        rel_epsilon,
        abs_epsilon,
        max_iterations,
        tolerance,
        order,
    } = method
    else {
        return Ok(());
    };
    let p_of = |s: &FactorSpec| terms(s).0;
    // A_r = A + max(lam rel, abs) I, kept in Role::A for the final check.
    reduce_into_values(opt, Reduction::MaxRowAbsSum)?;
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
            .map(|(f, count, select)| {
                let FactorState {
                    work, values, spec, ..
                } = f;
                Map::AddRidge {
                    x: backend.view_mut(work),
                    values: backend.view(values).slice(0, count),
                    rel: rel_epsilon,
                    abs: abs_epsilon,
                    n: spec.size,
                    count,
                    select,
                }
            })
            .collect();
        backend.map(&mut jobs)?;
    }
    reduce_into_values(opt, Reduction::Trace)?;
    start(opt, |_| 1.0, 1.0, &p_of)?;
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
            .map(|(f, count, select)| {
                let n = f.spec.size;
                let a = f.roles[Role::A as usize];
                Map::Copy {
                    src: backend.view(&f.work),
                    dst: backend.view_mut(&mut f.scratch[a]),
                    numel: n * n,
                    count,
                    select,
                }
            })
            .collect();
        backend.map(&mut jobs)?;
    }
    // One Newton step for every block, then Horner steps.
    newton_step(opt, &p_of)?;
    max_dev_identity(opt, Role::M)?;
    for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
        for &s in &f.accept {
            f.iteration[s as usize] = (f.host_flags[count + s as usize], 1);
        }
        let iteration = &f.iteration;
        f.accept.retain(|&s| {
            let (err, it) = iteration[s as usize];
            err > tolerance && it < max_iterations
        });
    }
    while active_factors(&mut opt.groups, &opt.layout).any(|(f, _, _)| !f.accept.is_empty()) {
        horner_step(opt, order)?;
        max_dev_identity(opt, Role::M)?;
        for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
            let FactorState {
                accept,
                iteration,
                host_flags,
                ..
            } = f;
            accept.retain(|&s| {
                let s = s as usize;
                let new = host_flags[count + s];
                let (err, it) = &mut iteration[s];
                *it += 1;
                // Diverging or stagnating: stop, keeping this update.
                if new > *err * 1.2 || (new == *err && *err < 1e-3) {
                    return false;
                }
                *err = new;
                *err > tolerance && *it < max_iterations
            });
        }
    }
    check_and_power(opt, &|s: &FactorSpec| terms(s).1, &p_of)
}

/// `M' = I + b_1 E + ... ` by Horner's rule with `E = I - M`, then
/// `X <- X M'`, `M <- M'^p M`, for the blocks in each `accept` list.
fn horner_step<B: Backend>(opt: &mut Shampoo<B>, order: u32) -> Result<()> {
    let order = order as usize;
    let coeffs: Vec<Vec<f64>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, _, _)| coefficients(terms(&f.spec).0, order as u32))
        .collect();
    products(opt, |_| Some(Product::Affine(Role::M, Role::E, -1.0, 1.0)))?;
    let mut i = 0;
    products(opt, |_| {
        let b = &coeffs[i];
        i += 1;
        Some(Product::Affine(
            Role::E,
            Role::Mp,
            b[order - 1],
            b[order - 2],
        ))
    })?;
    for k in (0..order.saturating_sub(2)).rev() {
        products(opt, |_| Some(Product::Mul(Role::Mp, Role::E, Role::Mp)))?;
        let mut i = 0;
        products(opt, |_| {
            let b = &coeffs[i];
            i += 1;
            Some(Product::Affine(Role::Mp, Role::Mp, 1.0, b[k]))
        })?;
    }
    let p_of = |s: &FactorSpec| terms(s).0;
    products(opt, |_| Some(Product::Mul(Role::X, Role::Mp, Role::X)))?;
    power(opt, Role::Mp, &p_of)?;
    products(opt, |_| Some(Product::Mul(Role::R, Role::M, Role::M)))
}

/// The accuracy check `max |A_r X^p - I| <= 0.1` and `X <- X^q`, for every
/// active block; blocks that fail it (or whose `X^q` is not finite) are
/// marked `Failed`, the others `Ok`.
fn check_and_power<B: Backend>(
    opt: &mut Shampoo<B>,
    q_of: &dyn Fn(&FactorSpec) -> u32,
    p_of: &dyn Fn(&FactorSpec) -> u32,
) -> Result<()> {
    set_status(opt);
    for (f, count, select) in active_factors(&mut opt.groups, &opt.layout) {
        f.accept.clear();
        match select {
            Some(s) => f.accept.extend_from_slice(s),
            None => f.accept.extend(0..count as u32),
        }
    }
    power(opt, Role::X, p_of)?;
    products(opt, |_| Some(Product::Mul(Role::A, Role::R, Role::R)))?;
    max_dev_identity(opt, Role::R)?;
    for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
        let FactorState {
            accept,
            status,
            host_flags,
            spec,
            ..
        } = f;
        accept.retain(|&s| {
            let err = host_flags[count + s as usize];
            if err <= 0.1 {
                true
            } else {
                tracing::warn!(
                    dim = spec.dim,
                    error = err,
                    "coupled higher-order root inverse is inaccurate (max |A X^p - I| > 0.1)"
                );
                status[s as usize] = EighStatus::Failed;
                false
            }
        });
        if q_of(spec) <= 1 {
            accept.clear();
        }
    }
    if active_factors(&mut opt.groups, &opt.layout).all(|(f, _, _)| f.accept.is_empty()) {
        return Ok(());
    }
    power(opt, Role::X, q_of)?;
    products(opt, |_| Some(Product::Copy(Role::R, Role::X)))?;
    // A non-finite X^q is a failure of the method, not an error.
    reduce_role(opt, Role::X, Reduction::AllFinite)?;
    for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
        for &s in &f.accept {
            if f.host_flags[count + s as usize] == 0.0 {
                f.status[s as usize] = EighStatus::Failed;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::coefficients;

    #[test]
    fn horner_coefficients_follow_the_binomial_series() {
        // (1 - x)^(-1/p): 1, 1/p, (1 + p)/(2 p^2), ...
        let b = coefficients(2, 3);
        assert_eq!(b, vec![1.0, 0.5, 3.0 / 8.0]);
        let b = coefficients(4, 4);
        assert_eq!(b[1], 0.25);
        assert_eq!(b[2], 5.0 / 32.0);
        assert_eq!(b[3], 5.0 * 9.0 / (32.0 * 12.0));
    }
}
