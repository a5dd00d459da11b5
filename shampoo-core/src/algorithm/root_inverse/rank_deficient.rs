//! Rank-deficient stability: how eigenvalue-based roots
//! `X = Q diag(h(lambda)) Q^T` treat small or zero eigenvalues, from the
//! configured `rank_deficient_stability` and `epsilon`.
//!
//! - perturbation before the decomposition (the default): the input was
//!   `A + eps I`; if `lambda_min < eps`, `lambda <- lambda - lambda_min +
//!   eps`; `h = lambda^-e`;
//! - perturbation after it: the input was `A`; always `lambda <- lambda -
//!   min(lambda_min, 0) + eps`; `h = lambda^-e`;
//! - pseudo-inverse (`epsilon = 0`): with the cutoff
//!   `c = max(rank_rtol * max(lambda_max, 0), rank_atol)` (`rank_rtol =
//!   null`: `n` times the machine epsilon), `h = 0` where `lambda <= c` and
//!   `lambda^-e` elsewhere. This is well defined only when no eigenvalue
//!   lies near `c` (rounding noise of a zero eigenvalue is about 1e-16 of
//!   `lambda_max`, so a cutoff of 0 is not).
//!
//! The arithmetic is the backend's [`Map::EigenPower`](crate::backend::Map).

use crate::backend::EigenRule;
use crate::config::{RankDeficientStability, ShampooConfig};

/// The eigenvalue rule of `config`'s eigenvalue-based roots.
pub(crate) fn rule(config: &ShampooConfig) -> EigenRule {
    let eps = config.epsilon;
    match config.rank_deficient_stability() {
        RankDeficientStability::Perturbation {
            perturb_before_computation: true,
        } => EigenRule::ShiftBelow { eps },
        RankDeficientStability::Perturbation {
            perturb_before_computation: false,
        } => EigenRule::ShiftNonnegative { eps },
        RankDeficientStability::PseudoInverse {
            rank_atol,
            rank_rtol,
        } => EigenRule::PseudoInverse {
            atol: rank_atol,
            rtol: rank_rtol,
        },
    }
}
