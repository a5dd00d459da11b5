//! Data-parallel helpers for loops that do not use [`crate::Shampoo`].

use shampoo_core::{DType, HostViewMut};
use shampoo_dist::Communicator;
use tch::Tensor;
use tch::nn::VarStore;

use crate::{Result, vars};

/// Averages the gradient of every trainable variable of `vs` across the
/// ranks of `comm`, in place: one all-reduce of all `f32` gradients packed
/// together and one of all `f64` ones (for baselines such as tch's AdamW
/// under several ranks).
///
/// Variables are taken group by group, each sorted by name; a variable
/// must have a gradient on every rank or on none. The same checks as
/// [`crate::Shampoo::step`] apply (CPU, `f32`/`f64`, contiguous).
pub fn all_reduce_gradients(vs: &VarStore, comm: &dyn Communicator) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let groups = vars::read_groups(&vs.variables_)?;
    let mut grads: Vec<(&str, Tensor, DType)> = Vec::new();
    for v in groups.values().flatten() {
        if let Some(g) = vars::gradient(v)? {
            grads.push((&v.name, g, v.dtype));
        }
    }
    let list: Vec<(&str, &Tensor, DType)> = grads.iter().map(|(n, g, d)| (*n, g, *d)).collect();
    vars::check_disjoint(&list)?;
    if comm.world_size() == 1 {
        return Ok(());
    }
    // SAFETY: checked CPU contiguous gradients of their dtype, pairwise
    // disjoint, kept alive by `grads` for the whole function.
    let mut views: Vec<HostViewMut<'_>> = grads
        .iter()
        .map(|(_, g, d)| unsafe { vars::view_mut(g, *d) })
        .collect();
    let mut b32: Vec<f32> = Vec::new();
    let mut b64: Vec<f64> = Vec::new();
    for v in &views {
        match v {
            HostViewMut::F32(s) => b32.extend_from_slice(s),
            HostViewMut::F64(s) => b64.extend_from_slice(s),
        }
    }
    if !b32.is_empty() {
        comm.all_reduce_mean(&mut b32)?;
    }
    if !b64.is_empty() {
        comm.all_reduce_mean_f64(&mut b64)?;
    }
    let (mut o32, mut o64) = (0, 0);
    for v in &mut views {
        match v {
            HostViewMut::F32(s) => {
                s.copy_from_slice(&b32[o32..o32 + s.len()]);
                o32 += s.len();
            }
            HostViewMut::F64(s) => {
                s.copy_from_slice(&b64[o64..o64 + s.len()]);
                o64 += s.len();
            }
        }
    }
    Ok(())
}
