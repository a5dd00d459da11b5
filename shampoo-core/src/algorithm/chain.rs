//! Mode products of every active group's blocks with its factors' matrices
//! (`T x_1 M_1 x_2 M_2 ...`), alternating between the groups' two work
//! buffers: preconditioning with inverse roots, rotations into and out of
//! eigenbases, and KL-Shampoo's one-sided preconditioning.

use super::Shampoo;
use super::state::{GroupState, Loc};
use crate::Result;
use crate::backend::{Backend, ModeProductJob};

/// Runs, for every active group, its factors' mode products in sequence,
/// starting from `locs[group]`; leaves each group's result location in
/// `locs`. With `skip = Some(k)`, only groups that have a factor `k` take
/// part, and that factor is left out. `transpose` multiplies by the
/// matrices' transposes (rotating back out of an eigenbasis).
pub(super) fn chain<B: Backend>(
    opt: &mut Shampoo<B>,
    transpose: bool,
    locs: &mut [Loc],
    skip: Option<usize>,
) -> Result<()> {
    let backend = &opt.backend;
    let precision = opt.config.preconditioning_precision();
    let rounds = opt
        .groups
        .iter()
        .map(|g| g.factors.len())
        .max()
        .unwrap_or(0);
    for r in 0..rounds {
        if skip == Some(r) {
            continue;
        }
        let mut jobs: Vec<ModeProductJob<'_, B>> = Vec::new();
        for (gi, (g, spec)) in opt.groups.iter_mut().zip(&opt.layout.groups).enumerate() {
            if !g.any_active || g.factors.len() <= r || skip.is_some_and(|k| g.factors.len() <= k) {
                continue;
            }
            let input = locs[gi];
            let target = match input {
                Loc::Work(i) => 1 - i,
                _ => 0,
            };
            let GroupState {
                grad,
                filtered,
                work,
                factors,
                active,
                ..
            } = g;
            // The output is the work buffer the input is not in.
            let [w0, w1] = work;
            let (src, dst) = match input {
                Loc::Work(0) => (&*w0, w1),
                Loc::Work(_) => (&*w1, w0),
                Loc::Grad => (&*grad, w0),
                Loc::Gf => (filtered.as_ref().map_or(&*grad, |(_, gf)| gf), w0),
            };
            let f = &factors[r];
            jobs.push(ModeProductJob {
                input: backend.view(src),
                dims: &spec.dims,
                count: spec.count(),
                mode: f.spec.dim,
                matrices: backend.view(&f.root),
                transpose,
                out: backend.view_mut(dst),
                precision,
                select: active.as_deref(),
            });
            locs[gi] = Loc::Work(target);
        }
        backend.mode_product(&mut jobs)?;
    }
    Ok(())
}
