//! Averaging gradients across ranks: for loops that do not use
//! [`crate::Shampoo`] ([`all_reduce_gradients`]), and for replicated
//! segments of [`crate::Shampoo`].
//!
//! The communicators of `shampoo_dist` move host memory, so gradients on a
//! device are staged through a host copy (and copied back once averaged);
//! CPU gradients are averaged in place.

use shampoo_core::{DType, HostViewMut};
use shampoo_dist::Communicator;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::{Result, vars};

/// A gradient as the host reads it: the tensor itself on the CPU, a host
/// copy on a device.
struct Staged {
    tensor: Tensor,
    host: Option<Tensor>,
}

impl Staged {
    fn new(g: &Tensor) -> Result<Staged> {
        let host = if g.device() == Device::Cpu {
            None
        } else {
            // A checked (contiguous) device tensor copies to a contiguous
            // host tensor.
            Some(g.f_to(Device::Cpu)?)
        };
        Ok(Staged {
            tensor: g.shallow_clone(),
            host,
        })
    }

    fn host(&self) -> &Tensor {
        self.host.as_ref().unwrap_or(&self.tensor)
    }

    /// Copies the averaged host copy back to the device.
    fn finish(self) -> Result<()> {
        if let Some(h) = self.host {
            self.tensor.shallow_clone().f_copy_(&h)?;
        }
        Ok(())
    }
}

/// Averages `grads` (all of `dtype`; `lens[i]` elements each, `None`: no
/// gradient) across the ranks of `comm` in rank order, in place, with
/// `shampoo_dist::average_gradients` (one all-reduce; a gradient must be
/// present on every rank or on none).
///
/// Every gradient must have passed `vars::check_tensor` with `dtype`, and no
/// two may share memory.
pub(crate) fn average(
    comm: &dyn Communicator,
    dtype: DType,
    lens: &[usize],
    grads: &[Option<&Tensor>],
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let staged: Vec<Option<Staged>> = grads
        .iter()
        .map(|g| g.map(Staged::new).transpose())
        .collect::<Result<_>>()?;
    {
        let mut views: Vec<Option<HostViewMut<'_>>> = staged
            .iter()
            .map(|s| {
                s.as_ref().map(|s| {
                    // SAFETY: a checked CPU tensor or a fresh contiguous
                    // host copy of a checked device tensor, of `dtype`,
                    // disjoint from the others, kept alive by `staged`;
                    // each is viewed once.
                    unsafe { vars::view_mut(s.host(), dtype) }
                })
            })
            .collect();
        shampoo_dist::average_gradients(comm, dtype, lens, &mut views)?;
    }
    for s in staged.into_iter().flatten() {
        s.finish()?;
    }
    Ok(())
}

/// Averages the gradient of every trainable variable of `vs` across the
/// ranks of `comm`, in place: one all-reduce of all `f32` gradients packed
/// together and one of all `f64` ones (for baselines such as tch's AdamW
/// under several ranks).
///
/// Variables are taken group by group, each sorted by name; a variable
/// must have a gradient on every rank or on none (otherwise every rank gets
/// the same error). The same checks as [`crate::Shampoo::step`] apply
/// (`f32`/`f64`, contiguous). Gradients on a CUDA device are averaged
/// through a host copy.
pub fn all_reduce_gradients(vs: &VarStore, comm: &dyn Communicator) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let groups = vars::read_groups(&vs.variables_)?;
    let mut grads: Vec<(&str, Option<Tensor>, DType, usize)> = Vec::new();
    for v in groups.values().flatten() {
        grads.push((&v.name, vars::gradient(v)?, v.dtype, v.tensor.numel()));
    }
    let list: Vec<(&str, &Tensor, DType)> = grads
        .iter()
        .filter_map(|(n, g, d, _)| g.as_ref().map(|g| (*n, g, *d)))
        .collect();
    vars::check_disjoint(&list)?;
    for dtype in [DType::F32, DType::F64] {
        let of: Vec<&(&str, Option<Tensor>, DType, usize)> =
            grads.iter().filter(|g| g.2 == dtype).collect();
        if of.is_empty() {
            continue;
        }
        let lens: Vec<usize> = of.iter().map(|g| g.3).collect();
        let gs: Vec<Option<&Tensor>> = of.iter().map(|g| g.1.as_ref()).collect();
        average(comm, dtype, &lens, &gs)?;
    }
    Ok(())
}
