//! Averaging gradients across ranks for loops that step another optimizer
//! (baselines such as tch's AdamW under several ranks): the same
//! `shampoo_dist::GradientAverager` the Shampoo engine uses, on each
//! device's own memory through the collective of its backend (CPU memory
//! through the host communicator; CUDA memory through NCCL, or staged
//! through the host).

use std::sync::Arc;

use shampoo_core::DType;
use shampoo_dist::{Collective, Collectives, GradientAverager};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::engine::{EngineOptions, TensorBackend};
use crate::{Error, Result, vars};

/// A gradient present on some ranks only, as an error naming its variable.
pub(crate) fn name_presence(e: shampoo_dist::Error, names: &[String]) -> Error {
    match e {
        shampoo_dist::Error::Presence {
            param,
            step,
            count,
            world,
        } if param < names.len() => Error::variable(
            &names[param],
            format!(
                "had a gradient on {count} of {world} ranks at step {step}; every rank needs a gradient for it, or none"
            ),
        ),
        e => e.into(),
    }
}

/// One backend's averager.
trait Average: Send {
    fn average(&mut self, grads: &[Option<&Tensor>], dtype: DType, step: u64) -> Result<()>;
    fn check(&mut self) -> Result<()>;
}

struct On<B: TensorBackend> {
    backend: B,
    comm: Arc<dyn Collective<B>>,
    avg: GradientAverager<B>,
}

impl<B: TensorBackend> Average for On<B> {
    fn average(&mut self, grads: &[Option<&Tensor>], dtype: DType, step: u64) -> Result<()> {
        let mut g: Vec<Option<B::ViewMut<'_>>> = grads
            .iter()
            .map(|t| {
                // SAFETY: checked (device, dtype, dense layout), disjoint
                // gradients that the caller keeps alive; each is viewed once,
                // and libtorch does not run on them meanwhile.
                t.map(|t| unsafe { B::tensor_view_mut(t, dtype) })
            })
            .collect();
        self.avg
            .average(self.comm.as_ref(), &self.backend, &mut g, step)?;
        Ok(())
    }
    fn check(&mut self) -> Result<()> {
        Ok(self.avg.check()?)
    }
}

fn on<B: TensorBackend>(
    device: Device,
    collectives: &Collectives,
    dtype: DType,
    lens: &[usize],
) -> Result<Box<dyn Average>> {
    let backend = B::for_device(device, &EngineOptions::default())?;
    let comm = B::collective(collectives);
    let avg = GradientAverager::new(comm.as_ref(), &backend, dtype, lens)?;
    Ok(Box::new(On { backend, comm, avg }))
}

/// The variables of one dtype on one device, averaged together.
struct Set {
    dtype: DType,
    device: Device,
    names: Vec<String>,
    lens: Vec<usize>,
    avg: Box<dyn Average>,
}

/// Averages the gradients of every trainable variable of a `VarStore` over
/// the ranks, in place, step after step: one all-reduce per dtype and
/// device, on the device (NCCL when the collectives have it), with buffers
/// kept from step to step.
///
/// A variable must have a gradient on every rank or on none; anything else
/// is the same [`Error::Variable`] on every rank, naming it and the step
/// (with NCCL the counts are read back without waiting for the GPU and
/// checked at the next call, or by [`GradientAveraging::finish`]).
pub struct GradientAveraging {
    collectives: Collectives,
    sets: Vec<Set>,
    step: u64,
}

impl GradientAveraging {
    /// Over the ranks of `collectives`.
    pub fn new(collectives: Collectives) -> Self {
        GradientAveraging {
            collectives,
            sets: Vec::new(),
            step: 0,
        }
    }

    /// Averages every gradient of `vs` (collective). Variables are taken
    /// group by group, each sorted by name; the same checks as
    /// [`crate::Shampoo::step`] apply (`f32`/`f64`, dense, disjoint).
    pub fn all_reduce(&mut self, vs: &VarStore) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        if self.collectives.world_size() == 1 {
            return Ok(());
        }
        let groups = vars::read_groups(&vs.variables_)?;
        let mut grads: Vec<(&vars::Var, Option<Tensor>)> = Vec::new();
        for v in groups.values().flatten() {
            grads.push((v, vars::gradient(v)?));
        }
        let list: Vec<(&str, &Tensor, DType)> = grads
            .iter()
            .filter_map(|(v, g)| g.as_ref().map(|g| (v.name.as_str(), g, v.dtype)))
            .collect();
        vars::check_disjoint(&list)?;
        // (dtype, device) in order of first appearance.
        let mut keys: Vec<(DType, Device)> = Vec::new();
        for (v, _) in &grads {
            if !keys.contains(&(v.dtype, v.device)) {
                keys.push((v.dtype, v.device));
            }
        }
        for (i, &(dtype, device)) in keys.iter().enumerate() {
            let of: Vec<&(&vars::Var, Option<Tensor>)> = grads
                .iter()
                .filter(|(v, _)| (v.dtype, v.device) == (dtype, device))
                .collect();
            let names: Vec<String> = of.iter().map(|(v, _)| v.name.clone()).collect();
            let lens: Vec<usize> = of.iter().map(|(v, _)| v.tensor.numel()).collect();
            let fresh = self.sets.get(i).is_none_or(|s| {
                (s.dtype, s.device) != (dtype, device) || s.names != names || s.lens != lens
            });
            if fresh {
                let avg = match device {
                    Device::Cpu => {
                        on::<shampoo_core::CpuBackend>(device, &self.collectives, dtype, &lens)?
                    }
                    #[cfg(feature = "cuda")]
                    Device::Cuda(_) => on::<shampoo_core::backend::cuda::CudaBackend>(
                        device,
                        &self.collectives,
                        dtype,
                        &lens,
                    )?,
                    d => {
                        return Err(Error::Torch(format!(
                            "internal: no backend for device {d:?}"
                        )));
                    }
                };
                let set = Set {
                    dtype,
                    device,
                    names,
                    lens,
                    avg,
                };
                if i < self.sets.len() {
                    self.sets[i] = set;
                } else {
                    self.sets.push(set);
                }
            }
            let set = &mut self.sets[i];
            let gs: Vec<Option<&Tensor>> = of.iter().map(|(_, g)| g.as_ref()).collect();
            set.avg
                .average(&gs, dtype, self.step)
                .map_err(|e| match e {
                    Error::Dist(d) => name_presence(d, &set.names),
                    e => e,
                })?;
        }
        self.sets.truncate(keys.len());
        Ok(())
    }

    /// Checks the presence counts still outstanding (NCCL checks a step
    /// late), waiting for them.
    pub fn finish(&mut self) -> Result<()> {
        for s in &mut self.sets {
            s.avg.check().map_err(|e| match e {
                Error::Dist(d) => name_presence(d, &s.names),
                e => e,
            })?;
        }
        Ok(())
    }
}

/// Averages the gradient of every trainable variable of `vs` across the
/// ranks of `collectives`, in place, once ([`GradientAveraging`] for one
/// step, checked before returning). Gradients on a CUDA device are averaged
/// on the device (NCCL, or staged through the host).
pub fn all_reduce_gradients(vs: &VarStore, collectives: &Collectives) -> Result<()> {
    let mut avg = GradientAveraging::new(collectives.clone());
    avg.all_reduce(vs)?;
    avg.finish()
}
