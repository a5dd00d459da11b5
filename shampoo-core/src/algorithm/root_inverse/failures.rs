//! The accept and failure rules of a root-inverse step.
//!
//! - NaN/Inf in a factor `A` (after bias correction and damping) is an
//!   error;
//! - a solver failure (an eigensolver's, after the float64 retry, or the
//!   higher-order iteration's accuracy check) keeps the previous root and
//!   counts one consecutive failure of that factor; more than
//!   [`MAX_CONSECUTIVE_FAILURES`] in a row is an error;
//! - NaN/Inf in a computed result is an error, except for the batched
//!   Newton iteration (a `residual` tolerance is given), where a non-finite
//!   result, or a final residual `max |M - I|` above the tolerance (or NaN),
//!   is a solver failure as above;
//! - anything else is accepted: the result replaces the root and the
//!   factor's failure count is reset.

use crate::algorithm::Shampoo;
use crate::algorithm::state::download_flags;
use crate::backend::{Backend, EighStatus};
use crate::error::MatrixKind;
use crate::schedule::StepScalars;
use crate::{Error, Result};

/// Consecutive solver failures tolerated per factor.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Reads all flags with one synchronisation and applies the failure rules:
/// leaves in each factor's `accept` the blocks whose result replaces the
/// current one (the caller commits them). With `residual = Some(tol)`, the
/// third section of the flags holds each block's final `max |M - I|`
/// (the batched Newton iteration).
pub(super) fn check<B: Backend>(
    opt: &mut Shampoo<B>,
    sc: &StepScalars,
    residual: Option<f64>,
) -> Result<()> {
    let fdtype = opt.config.factor_dtype_for(opt.dtype);
    download_flags(&opt.backend, &mut opt.groups, fdtype)?;
    for (g, spec) in opt.groups.iter_mut().zip(&opt.layout.groups) {
        if !g.any_active {
            continue;
        }
        let count = spec.count();
        for f in g.factors.iter_mut() {
            f.accept.clear();
            let slots: Box<dyn Iterator<Item = u32>> = match g.active.as_deref() {
                Some(s) => Box::new(s.iter().copied()),
                None => Box::new(0..count as u32),
            };
            for slot in slots {
                let s = slot as usize;
                let block = spec.blocks[s];
                let info = &opt.layout.blocks[block];
                let nonfinite = |kind| Error::NonFinite {
                    kind,
                    block,
                    param: info.param,
                    shape: info.dims.clone(),
                    dim: f.spec.dim,
                    step: sc.t,
                };
                if f.host_flags[s] == 0.0 {
                    return Err(nonfinite(MatrixKind::Factor));
                }
                let unconverged = residual.map(|tol| {
                    let finite = f.host_flags[count + s] != 0.0;
                    let r = f.host_flags[2 * count + s];
                    // A NaN residual fails too.
                    (!finite || r.is_nan() || r > tol).then_some(r)
                });
                if let Some(Some(r)) = unconverged {
                    f.status[s] = EighStatus::Failed;
                    tracing::warn!(
                        block,
                        dim = f.spec.dim,
                        residual = r,
                        tolerance = residual,
                        "batched Newton did not converge (max |M - I| above the tolerance, or a non-finite root)"
                    );
                }
                if f.status[s] == EighStatus::Failed {
                    f.failures[s] += 1;
                    f.counters[s].failures += 1;
                    tracing::warn!(
                        block,
                        dim = f.spec.dim,
                        failures = f.failures[s],
                        "root inverse failed; keeping the previous root"
                    );
                    if f.failures[s] > MAX_CONSECUTIVE_FAILURES {
                        return Err(Error::RootInverseFailed {
                            block,
                            param: info.param,
                            shape: info.dims.clone(),
                            dim: f.spec.dim,
                            failures: f.failures[s],
                            step: sc.t,
                        });
                    }
                    f.counters[s].kept_previous += 1;
                    continue;
                }
                if f.host_flags[count + s] == 0.0 {
                    return Err(nonfinite(MatrixKind::Root));
                }
                if f.status[s] == EighStatus::RetriedF64 {
                    f.counters[s].f64_retries += 1;
                    tracing::warn!(
                        block,
                        dim = f.spec.dim,
                        "eigendecomposition needed the float64 retry"
                    );
                }
                f.failures[s] = 0;
                f.accept.push(slot);
            }
        }
    }
    Ok(())
}
