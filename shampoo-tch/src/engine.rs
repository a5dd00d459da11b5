//! The one engine of a segment: `shampoo_dist::DistributedShampoo` over
//! whichever backend owns the variables' memory, stepped on libtorch
//! tensors viewed in place. One process is a world of one (replicated: no
//! all-gather, the local optimizer's step).
//!
//! A backend takes part by saying how a checked libtorch tensor is viewed as
//! its memory and which collective moves its memory ([`TensorBackend`]):
//! host slices and the host collective for [`CpuBackend`]; device pointers
//! and NCCL (or the host-staged collective) for `CudaBackend` (feature
//! `cuda`). The distribution policy (sharded or replicated, the
//! communication dtype) is `shampoo_dist`'s [`DistOptions`].

use std::path::Path;
use std::sync::Arc;

use shampoo_core::backend::Backend;
use shampoo_core::strided::StridedShape;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, ShampooConfig};
use shampoo_dist::{Collective, Collectives, DistOptions, DistTimes, DistributedShampoo};
use tch::{Device, Tensor};

use crate::{Error, Result};

/// A backend whose memory a libtorch tensor of one device can be viewed as.
pub(crate) trait TensorBackend: Backend {
    /// A backend for tensors on `device`.
    fn for_device(device: Device, options: &EngineOptions) -> Result<Self>;

    /// The collective that moves this backend's memory among `c`'s ranks.
    fn collective(c: &Collectives) -> Arc<dyn Collective<Self>>;

    /// An exclusive view of a checked tensor.
    ///
    /// # Safety
    ///
    /// `t` must have passed `vars::check_tensor` with `dtype` and live on
    /// this backend's device, must stay alive and unmoved for `'a` (and, on
    /// a device, until the work queued with the view has run), and no other
    /// reference to its memory may be used meanwhile.
    unsafe fn tensor_view_mut<'a>(t: &'a Tensor, dtype: DType) -> Self::ViewMut<'a>;

    /// A shared view of a checked tensor.
    ///
    /// # Safety
    ///
    /// As [`TensorBackend::tensor_view_mut`], except that other shared
    /// views may coexist.
    unsafe fn tensor_view<'a>(t: &'a Tensor, dtype: DType) -> Self::View<'a>;
}

/// How engines and their backends are built (from the builder's options).
#[derive(Debug, Clone, Default)]
pub(crate) struct EngineOptions {
    /// Data-parallel segments compute every block on every rank
    /// (`ShampooBuilder::replicated`).
    pub replicated: bool,
    /// Worker threads of the CPU backend (0: one per core).
    pub threads: usize,
    /// The CUDA stream to queue on (`None`: the legacy default stream,
    /// libtorch's default current stream), as an address.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub cuda_stream: Option<usize>,
}

impl TensorBackend for CpuBackend {
    fn for_device(device: Device, options: &EngineOptions) -> Result<Self> {
        debug_assert_eq!(device, Device::Cpu);
        Ok(CpuBackend::new(options.threads)?)
    }

    fn collective(c: &Collectives) -> Arc<dyn Collective<Self>> {
        c.cpu()
    }

    unsafe fn tensor_view_mut<'a>(t: &'a Tensor, dtype: DType) -> HostViewMut<'a> {
        let n = t.numel();
        let p = t.data_ptr();
        // SAFETY: the caller guarantees a dense CPU tensor of `n`
        // elements of `dtype` that nothing else touches during 'a; libtorch
        // allocations are aligned for their element type and non-null for
        // n > 0 (empty tensors are never viewed: `read_groups` skips them).
        unsafe {
            match dtype {
                DType::F32 => HostViewMut::F32(std::slice::from_raw_parts_mut(p.cast::<f32>(), n)),
                DType::F64 => HostViewMut::F64(std::slice::from_raw_parts_mut(p.cast::<f64>(), n)),
            }
        }
    }

    unsafe fn tensor_view<'a>(t: &'a Tensor, dtype: DType) -> HostView<'a> {
        let n = t.numel();
        let p = t.data_ptr();
        // SAFETY: as in `tensor_view_mut`; the memory is only read during 'a.
        unsafe {
            match dtype {
                DType::F32 => HostView::F32(std::slice::from_raw_parts(p.cast::<f32>(), n)),
                DType::F64 => HostView::F64(std::slice::from_raw_parts(p.cast::<f64>(), n)),
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use shampoo_core::DType;
    use shampoo_core::backend::cuda::{CudaBackend, CudaView, CudaViewMut};
    use shampoo_dist::{Collective, Collectives};
    use tch::{Device, Tensor};

    use super::{EngineOptions, TensorBackend};
    use crate::{Error, Result};

    impl TensorBackend for CudaBackend {
        fn for_device(device: Device, options: &EngineOptions) -> Result<Self> {
            let Device::Cuda(ordinal) = device else {
                return Err(Error::Torch(format!(
                    "internal: a CUDA backend for device {device:?}"
                )));
            };
            let backend = match options.cuda_stream {
                None => CudaBackend::new(ordinal)?,
                // SAFETY: `ShampooBuilder::cuda_stream`'s contract: a valid
                // stream of the device's primary context that outlives the
                // optimizer.
                Some(s) => unsafe { CudaBackend::with_stream(ordinal, s as *mut _)? },
            };
            Ok(backend)
        }

        fn collective(c: &Collectives) -> Arc<dyn Collective<Self>> {
            c.cuda()
        }

        unsafe fn tensor_view_mut<'a>(t: &'a Tensor, dtype: DType) -> CudaViewMut<'a> {
            // SAFETY: the caller guarantees a dense tensor of `dtype` on
            // this backend's device (libtorch uses the device's primary
            // context, as the backend does), alive and untouched by others
            // while the view and its queued work are in use.
            unsafe { CudaViewMut::from_raw(t.data_ptr() as u64, t.numel(), dtype) }
        }

        unsafe fn tensor_view<'a>(t: &'a Tensor, dtype: DType) -> CudaView<'a> {
            // SAFETY: as in `tensor_view_mut`; the memory is only read.
            unsafe { CudaView::from_raw(t.data_ptr() as u64, t.numel(), dtype) }
        }
    }
}

/// A segment's optimizer, whatever its backend.
///
/// Every tensor handed in must have passed `vars::check_tensor` with the
/// segment's dtype on the engine's device, be alive, and share no memory
/// with another.
pub(crate) trait Engine: Send {
    /// Averages `grads` in place over the ranks.
    fn reduce(&mut self, grads: &[Option<&Tensor>], dtype: DType) -> Result<()>;
    /// One step: `params[i]` updated in place with `grads[i]` (`None`: no
    /// gradient this step), averaging the gradients first unless `reduced`.
    fn step(
        &mut self,
        params: &[&Tensor],
        grads: &[Option<&Tensor>],
        dtype: DType,
        reduced: bool,
    ) -> Result<()>;
    /// Checks what the last step left outstanding.
    fn flush(&mut self) -> Result<()>;
    fn set_lr(&mut self, lr: f64) -> Result<()>;
    fn step_count(&self) -> u64;
    fn times(&self) -> DistTimes;
    /// Bytes the last step's all-gather produced (0 when replicated).
    fn gather_bytes(&self) -> usize;
    /// Bytes of optimizer state this rank holds.
    fn state_bytes(&self) -> usize;
    /// Whether every rank computes every block.
    fn replicated(&self) -> bool;
    /// Iterate averaging's evaluation view (`to_eval`) or back to the
    /// train-mode sequence, in place (collective); the same contract on
    /// `params` as [`Engine::step`].
    fn switch_mode(&mut self, params: &[&Tensor], dtype: DType, to_eval: bool) -> Result<()>;
    fn is_train_mode(&self) -> bool;
    /// Root-inverse telemetry of the blocks this rank checkpoints.
    fn root_inverse_stats(&self) -> Vec<shampoo_core::BlockRootInverseStats>;
    fn save(&mut self, dir: &Path) -> Result<()>;
    fn load(&mut self, path: &Path) -> Result<()>;
}

/// Views of checked tensors as backend memory.
///
/// # Safety
///
/// As [`TensorBackend::tensor_view_mut`] for every tensor.
unsafe fn views_mut<'a, B: TensorBackend>(
    ts: &[Option<&'a Tensor>],
    dtype: DType,
) -> Vec<Option<B::ViewMut<'a>>> {
    ts.iter()
        .map(|t| {
            // SAFETY: forwarded contract.
            t.map(|t| unsafe { B::tensor_view_mut(t, dtype) })
        })
        .collect()
}

impl<B: TensorBackend> Engine for DistributedShampoo<B> {
    fn reduce(&mut self, grads: &[Option<&Tensor>], dtype: DType) -> Result<()> {
        // SAFETY: the trait's contract: checked, disjoint tensors kept
        // alive by the caller; libtorch does not run on them meanwhile
        // (gradient tracking is off and the caller holds them), and later
        // libtorch work on them is queued after ours (same stream) or runs
        // on the host after we return.
        let mut g = unsafe { views_mut::<B>(grads, dtype) };
        self.reduce_gradients(&mut g)?;
        Ok(())
    }

    fn step(
        &mut self,
        params: &[&Tensor],
        grads: &[Option<&Tensor>],
        dtype: DType,
        reduced: bool,
    ) -> Result<()> {
        let ps: Vec<Option<&Tensor>> = params.iter().map(|t| Some(*t)).collect();
        // SAFETY: as in `reduce`; parameters and gradients are disjoint.
        let mut p: Vec<B::ViewMut<'_>> = unsafe { views_mut::<B>(&ps, dtype) }
            .into_iter()
            .map(|v| v.expect("every parameter"))
            .collect();
        if reduced {
            let g: Vec<Option<B::View<'_>>> = grads
                .iter()
                .map(|g| {
                    // SAFETY: as above; gradients are only read.
                    g.map(|t| unsafe { B::tensor_view(t, dtype) })
                })
                .collect();
            self.step_reduced(&mut p, &g)?;
        } else {
            // SAFETY: as above.
            let mut g = unsafe { views_mut::<B>(grads, dtype) };
            DistributedShampoo::step(self, &mut p, &mut g)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(DistributedShampoo::flush(self)?)
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(DistributedShampoo::set_lr(self, lr)?)
    }
    fn step_count(&self) -> u64 {
        self.local().step_count()
    }
    fn times(&self) -> DistTimes {
        DistributedShampoo::times(self)
    }
    fn gather_bytes(&self) -> usize {
        DistributedShampoo::gather_bytes(self)
    }
    fn state_bytes(&self) -> usize {
        DistributedShampoo::state_bytes(self)
    }
    fn replicated(&self) -> bool {
        self.options().is_replicated()
    }
    fn switch_mode(&mut self, params: &[&Tensor], dtype: DType, to_eval: bool) -> Result<()> {
        let ps: Vec<Option<&Tensor>> = params.iter().map(|t| Some(*t)).collect();
        // SAFETY: as in `step`.
        let mut p: Vec<B::ViewMut<'_>> = unsafe { views_mut::<B>(&ps, dtype) }
            .into_iter()
            .map(|v| v.expect("every parameter"))
            .collect();
        if to_eval {
            DistributedShampoo::eval(self, &mut p)?;
        } else {
            DistributedShampoo::train(self, &mut p)?;
        }
        Ok(())
    }
    fn is_train_mode(&self) -> bool {
        DistributedShampoo::is_train_mode(self)
    }
    fn root_inverse_stats(&self) -> Vec<shampoo_core::BlockRootInverseStats> {
        DistributedShampoo::root_inverse_stats(self)
    }
    fn save(&mut self, dir: &Path) -> Result<()> {
        Ok(DistributedShampoo::save(self, dir)?)
    }
    fn load(&mut self, path: &Path) -> Result<()> {
        Ok(DistributedShampoo::load(self, path)?)
    }
}

/// The engine of a segment of variables of `shapes` and `dtype` on `device`
/// (collective over `collectives`' ranks).
pub(crate) fn build(
    config: &ShampooConfig,
    shapes: &[StridedShape],
    (dtype, device): (DType, Device),
    options: &EngineOptions,
    collectives: &Collectives,
    dist: &DistOptions,
) -> Result<Box<dyn Engine>> {
    fn build<B: TensorBackend>(
        config: &ShampooConfig,
        shapes: &[StridedShape],
        (dtype, device): (DType, Device),
        options: &EngineOptions,
        collectives: &Collectives,
        dist: &DistOptions,
    ) -> Result<Box<dyn Engine>> {
        let backend = B::for_device(device, options)?;
        Ok(Box::new(DistributedShampoo::new(
            config.clone(),
            shapes,
            dtype,
            backend,
            B::collective(collectives),
            dist.clone(),
        )?))
    }
    let args = (config, shapes, (dtype, device), options, collectives, dist);
    match device {
        Device::Cpu => build::<CpuBackend>(args.0, args.1, args.2, args.3, args.4, args.5),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => build::<shampoo_core::backend::cuda::CudaBackend>(
            args.0, args.1, args.2, args.3, args.4, args.5,
        ),
        d => Err(Error::Torch(format!(
            "internal: no backend for device {d:?} (vars::check_tensor refuses it)"
        ))),
    }
}
