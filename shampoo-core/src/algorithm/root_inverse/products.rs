//! Batched matrix products over a factor's scratch roles, shared by the
//! coupled iterations.

use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors, pick3};
use crate::backend::{Backend, Map, MatmulJob};

/// One matrix operation per factor, on its still-iterating blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Product {
    /// `c <- a b` (through `T`, then the roles of `c` and `T` swap).
    Mul(Role, Role, Role),
    /// `c <- a^T b` (through `T`, likewise).
    MulTransposed(Role, Role, Role),
    /// `c <- a * coef + diag I` (through `T`, likewise).
    Affine(Role, Role, f64, f64),
    /// `b <- a`.
    Copy(Role, Role),
}

/// `torch.linalg.matrix_power`'s binary exponentiation over `Z` (holding
/// `M'`) into `R`.
pub(super) fn power_plan(p: u32) -> Vec<Product> {
    let mut plan = Vec::new();
    let mut n = p;
    let mut first_z = true;
    let mut have_result = false;
    while n > 0 {
        if !first_z {
            plan.push(Product::Mul(Role::Z, Role::Z, Role::Z));
        }
        first_z = false;
        if n % 2 == 1 {
            plan.push(if have_result {
                Product::Mul(Role::R, Role::Z, Role::R)
            } else {
                Product::Copy(Role::Z, Role::R)
            });
            have_result = true;
        }
        n /= 2;
    }
    plan
}

/// Runs `op(factor)` for every still-iterating factor (the closure is called
/// once per active factor, in order, including those with nothing to do).
pub(super) fn products<B: Backend>(
    opt: &mut Shampoo<B>,
    mut op: impl FnMut(&FactorState<B>) -> Option<Product>,
) -> Result<()> {
    let backend = &opt.backend;
    let precision = opt.root_products;
    let mut muls: Vec<MatmulJob<'_, B>> = Vec::new();
    let mut copies: Vec<Map<'_, B>> = Vec::new();
    let mut swaps: Vec<(usize, Role)> = Vec::new();
    for (i, (f, count, _)) in active_factors(&mut opt.groups, &opt.layout).enumerate() {
        let Some(product) = op(f) else { continue };
        if f.accept.is_empty() {
            continue;
        }
        let n = f.spec.size;
        let roles = f.roles;
        let FactorState {
            scratch, accept, ..
        } = f;
        let select = Some(&accept[..]);
        match product {
            Product::Mul(a, b, c) | Product::MulTransposed(a, b, c) => {
                let (a_, b_, t) = pick3(
                    scratch,
                    roles[a as usize],
                    roles[b as usize],
                    roles[Role::T as usize],
                );
                muls.push(MatmulJob {
                    a: backend.view(a_),
                    b: backend.view(b_),
                    c: backend.view_mut(t),
                    n,
                    count,
                    trans_a: matches!(product, Product::MulTransposed(..)),
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: false,
                    precision,
                    select,
                });
                swaps.push((i, c));
            }
            Product::Affine(a, c, coef, diag) => {
                let (src, _, t) = pick3(
                    scratch,
                    roles[a as usize],
                    roles[a as usize],
                    roles[Role::T as usize],
                );
                copies.push(Map::NewtonCoefficient {
                    m: backend.view(src),
                    out: backend.view_mut(t),
                    coef,
                    diag,
                    n,
                    count,
                    select,
                });
                swaps.push((i, c));
            }
            Product::Copy(a, b) => {
                let (src, _, dst) = pick3(
                    scratch,
                    roles[a as usize],
                    roles[a as usize],
                    roles[b as usize],
                );
                copies.push(Map::Copy {
                    src: backend.view(src),
                    dst: backend.view_mut(dst),
                    numel: n * n,
                    count,
                    select,
                });
            }
        }
    }
    // A factor has one operation per call, so the two lists never touch
    // the same matrices.
    backend.matmul(&mut muls)?;
    backend.map(&mut copies)?;
    drop(muls);
    drop(copies);
    // The product landed in T: it now plays the target's role.
    for (i, (f, _, _)) in active_factors(&mut opt.groups, &opt.layout).enumerate() {
        for &(j, role) in &swaps {
            if i == j {
                f.swap(role, Role::T);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn power_by_plan(p: u32, base: f64) -> f64 {
        // Simulate the plan on scalars.
        let mut z = base;
        let mut r = f64::NAN;
        for step in power_plan(p) {
            match step {
                Product::Mul(Role::Z, Role::Z, Role::Z) => z *= z,
                Product::Mul(Role::R, Role::Z, Role::R) => r *= z,
                Product::Copy(Role::Z, Role::R) => r = z,
                other => panic!("unexpected {other:?}"),
            }
        }
        r
    }

    #[test]
    fn binary_exponentiation_plan_computes_powers() {
        for p in 1..=9 {
            assert_eq!(power_by_plan(p, 1.5), 1.5f64.powi(p as i32), "p = {p}");
        }
        assert_eq!(power_plan(4).len(), 3, "square, square, take");
    }
}
