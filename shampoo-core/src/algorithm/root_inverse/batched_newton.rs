//! The batched coupled inverse Newton iteration (`p = 1/e`, an integer):
//! the [`coupled_newton`](super::coupled_newton) step, a fixed number of
//! times, with no read-back to the host inside the computation. As in DASH
//! (matmul-only, same-size blocks batched), every block of a group goes
//! through the same sequence of batched backend calls, so a step's whole
//! root-inverse work is queued without one synchronisation; the results are
//! read back once, with the finiteness flags, by [`super::failures::check`].
//!
//! ```text
//! f = ||A||_F;  B = A / f                              (eigenvalues in (0, 1])
//! g = ||B^4||_F = trace(B^8)^(1/2)                     (two batched squarings)
//! s = f g^(1/4) = trace(B^8)^(1/8) ||A||_F >= lambda_max(A)
//! z = (p + 1) / (2 s);  X = z^(1/p) I;  M = z A
//! repeat `iterations` times (every block):
//!     M' = (1 + 1/p) I - M / p;  X <- X M';  M <- M'^p M
//! residual = max |M - I|
//! ```
//!
//! **The scale.** The published start divides by `||A||_F`, an upper bound
//! on `lambda_max(A)` that can be `sqrt(n)` times too large (a flat
//! spectrum), which puts all of `M`'s eigenvalues far below 1 and costs
//! iterations. `s` is the Schatten-8 norm of `A`,
//! `(sum_i lambda_i^8)^(1/8)`: still an upper bound on `lambda_max`
//! (exactly, not an estimate, since `A` is symmetric positive semidefinite),
//! and at most `n^(1/8)` times too large (1.7 at `n = 64`, 3.1 at
//! `n = 8192`). A power iteration would be tighter but is a lower bound that
//! would have to be inflated by a guessed factor; the Schatten bound needs
//! no guess and the start keeps the published factor-2 margin
//! (`z lambda_max <= (p + 1) / 2 < p + 1`, where the scalar map
//! `m (1 + (1 - m)/p)^p` sends `(0, p + 1)` into `(0, 1]`). Normalising by
//! `f` first keeps every power in `[0, 1]`, so nothing overflows in
//! float32; `trace(B^8) >= n^-4` so nothing that matters underflows for any
//! block size this library forms. The per-block scalars are only fed to
//! [`Map::NewtonInit`] (which takes `z^(1/p)`), so `g^(-1/4)` and
//! `g^(-1/(4p))` become diagonal matrices that two batched products apply:
//! `X = z_f^(1/p) g^(-1/(4p)) I`, `M = (z_f A) g^(-1/4)` with
//! `z_f = (p + 1) / (2 f)`.
//!
//! **Precision.** With `precision.root_iteration` at `tf32` or `bf16`,
//! every product but those of the last [`REFINEMENT`] iterations reads
//! rounded operands (float32 accumulation); the last ones run in full
//! precision, so the residual test keeps its meaning.
//!
//! **Failures.** The final residual goes to the third section of the flags;
//! [`super::failures::check`] reads all flags of a factor in one download
//! and applies: NaN/Inf in the input `A` is an error, as for every method;
//! a residual above `tolerance` (or NaN) or a non-finite `X` is a failure of
//! the method: the block keeps its previous root and counts a consecutive
//! failure (an error after [`super::failures::MAX_CONSECUTIVE_FAILURES`]).
//!
//! **Accuracy** (`cargo test -p shampoo-core --test batched_newton --
//! --nocapture batched_newton_matches_eigh` prints every root's figures):
//! on SPD factors of condition number 20 to 700 (sizes 8 to 64, several
//! blocks per group, roots `p = 2, 4, 6`) with the default 30 iterations,
//! the root's relative error `max |X - X_eigh| / max |X_eigh|` against
//! float64 eigh is at most `6e-14` in float64 (bound tested: `2e-13`) and
//! `7.6e-6` in float32 (bound tested: `2e-5`; float32 eigh's own error
//! there is `4.3e-5`).

use super::coupled_newton::{newton_root, newton_step, reduce_role_into, set_status, start};
use super::products::{Product, products};
use super::{Section, reduce_into_values};
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors};
use crate::backend::{Backend, Map, Precision, Reduction, ViewOps};

/// Final iterations run with full-precision operands whatever
/// `precision.root_iteration` says.
pub(crate) const REFINEMENT: u32 = 2;

/// Runs the method for every active block (the damped `A` in `work`);
/// leaves `X` in `Role::X`, the residual in the third section of the flags
/// (on the device) and every block's status `Ok` (the residual decides,
/// in [`super::failures::check`]).
pub(super) fn compute<B: Backend>(opt: &mut Shampoo<B>, iterations: u32) -> Result<()> {
    // f = ||A||_F into `values`; M = A / f (X unused); every active block
    // goes into `accept`.
    reduce_into_values(opt, Reduction::FrobeniusNorm)?;
    start(opt, |_| 2.0, 2.0, &|_| 1)?;
    // Z = B^4, g = ||B^4||_F into the residual section.
    products(opt, |_| Some(Product::Mul(Role::M, Role::M, Role::Z)))?;
    products(opt, |_| Some(Product::Mul(Role::Z, Role::Z, Role::Z)))?;
    reduce_role_into(opt, Role::Z, Reduction::FrobeniusNorm, Section::Residual)?;
    scaled_start(opt)?;
    // Reduced-precision operands for all but the last REFINEMENT steps,
    // which run in full precision: Newton's quadratic convergence takes a
    // bf16-accurate iterate (about 1e-2) to float32 accuracy in two steps.
    let configured = opt.config.root_precision();
    for i in 0..iterations {
        opt.root_products = if i + REFINEMENT >= iterations {
            Precision::F32
        } else {
            configured
        };
        newton_step(opt, &newton_root)?;
    }
    opt.root_products = configured;
    reduce_role_into(
        opt,
        Role::M,
        Reduction::MaxAbsDevIdentity,
        Section::Residual,
    )?;
    set_status(opt);
    Ok(())
}

/// `X = z_f^(1/p) g^(-1/(4p)) I`, `M = z_f A g^(-1/4)` with
/// `z_f = (p + 1) / (2 f)`, `f` in `values` and `g` in the residual
/// section of the flags.
fn scaled_start<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = Vec::new();
        for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
            let p = newton_root(&f.spec);
            let n = f.spec.size;
            let roles = f.roles;
            let FactorState {
                work,
                values,
                flags,
                scratch,
                accept,
                ..
            } = f;
            let select = Some(&accept[..]);
            let g = backend
                .view(flags)
                .slice(Section::Residual as usize * count, count);
            let mut slots: Vec<Option<&mut B::Buffer>> = scratch.iter_mut().map(Some).collect();
            let mut take = |r: Role| {
                let buf = slots[roles[r as usize]].take().expect("distinct roles");
                backend.view_mut(buf)
            };
            // (norms, numerator, root, x, m): X z_f^(1/p) I and M = z_f A;
            // g^(-1/(4p)) I (its M unused); g^(-1/4) I (its M unused).
            let plan = [
                (backend.view(values), p as f64 + 1.0, p, Role::X, Role::M),
                (g, 2.0, 4 * p, Role::R, Role::Mp),
                (g, 2.0, 4, Role::Z, Role::E),
            ];
            for (norms, numerator, root, x, m) in plan {
                jobs.push(Map::NewtonInit {
                    a: backend.view(work),
                    norms,
                    numerator,
                    scale: 2.0,
                    x: take(x),
                    m: take(m),
                    p: root,
                    n,
                    count,
                    select,
                });
            }
        }
        backend.map(&mut jobs)?;
    }
    products(opt, |_| Some(Product::Mul(Role::X, Role::R, Role::X)))?;
    products(opt, |_| Some(Product::Mul(Role::M, Role::Z, Role::M)))
}
