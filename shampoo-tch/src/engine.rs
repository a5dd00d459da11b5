//! The single-process engine: `shampoo_core::Shampoo` over whichever
//! backend owns the variables' memory, stepped on libtorch tensors viewed in
//! place.
//!
//! The adapter is written once over [`LocalEngine`]; a backend takes part by
//! saying how a checked libtorch tensor is viewed as its memory
//! ([`TensorBackend`]): host slices for [`CpuBackend`], device pointers for
//! `CudaBackend` (feature `cuda`).

use std::path::Path;

use shampoo_core::backend::Backend;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, ShampooConfig};
use tch::{Device, Tensor};

use crate::{Error, Result};

/// A backend whose memory a libtorch tensor of one device can be viewed as.
pub(crate) trait TensorBackend: Backend {
    /// A backend for tensors on `device`.
    fn for_device(device: Device, options: &EngineOptions) -> Result<Self>;

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

    unsafe fn tensor_view_mut<'a>(t: &'a Tensor, dtype: DType) -> HostViewMut<'a> {
        let n = t.numel();
        let p = t.data_ptr();
        // SAFETY: the caller guarantees a contiguous CPU tensor of `n`
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
    use shampoo_core::DType;
    use shampoo_core::backend::cuda::{CudaBackend, CudaView, CudaViewMut};
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

        unsafe fn tensor_view_mut<'a>(t: &'a Tensor, dtype: DType) -> CudaViewMut<'a> {
            // SAFETY: the caller guarantees a contiguous tensor of `dtype` on
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

/// One process's optimizer for one segment, whatever its backend.
pub(crate) trait LocalEngine: Send {
    /// One step: `params[i]` updated in place with `grads[i]` (`None`: no
    /// gradient this step).
    ///
    /// Every tensor must have passed `vars::check_tensor` with `dtype` on
    /// the engine's device, be alive, and share no memory with another.
    fn step(&mut self, params: &[&Tensor], grads: &[Option<&Tensor>], dtype: DType) -> Result<()>;
    fn set_lr(&mut self, lr: f64) -> Result<()>;
    fn step_count(&self) -> u64;
    /// Iterate averaging's evaluation view (`to_eval`) or back to the
    /// train-mode sequence, in place; the same contract on `params` as
    /// [`LocalEngine::step`].
    fn switch_mode(&mut self, params: &[&Tensor], dtype: DType, to_eval: bool) -> Result<()>;
    fn is_train_mode(&self) -> bool;
    fn save(&self, path: &Path) -> Result<()>;
    /// Loads the engine's blocks from whichever of the `shampoo-core`
    /// checkpoint files holds them (one file, or a distributed
    /// checkpoint's rank files).
    fn load_files(&mut self, paths: &[std::path::PathBuf]) -> Result<()>;
    /// Root-inverse telemetry of the engine's blocks.
    fn root_inverse_stats(&self) -> Vec<shampoo_core::BlockRootInverseStats>;
}

impl<B: TensorBackend> LocalEngine for shampoo_core::Shampoo<B> {
    fn step(&mut self, params: &[&Tensor], grads: &[Option<&Tensor>], dtype: DType) -> Result<()> {
        // SAFETY: the trait's contract: checked tensors of `dtype` on this
        // backend's device, pairwise disjoint, kept alive by the caller;
        // libtorch does not run on them during the step (gradient tracking
        // is off and the caller holds them), and later libtorch work on them
        // is queued after ours (same stream) or on the host after we return.
        let mut p: Vec<B::ViewMut<'_>> = params
            .iter()
            .map(|t| unsafe { B::tensor_view_mut(t, dtype) })
            .collect();
        let g: Vec<Option<B::View<'_>>> = grads
            .iter()
            .map(|g| {
                // SAFETY: as above; gradients are only read.
                g.map(|t| unsafe { B::tensor_view(t, dtype) })
            })
            .collect();
        shampoo_core::Shampoo::step(self, &mut p, &g)?;
        Ok(())
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(shampoo_core::Shampoo::set_lr(self, lr)?)
    }
    fn step_count(&self) -> u64 {
        shampoo_core::Shampoo::step_count(self)
    }
    fn switch_mode(&mut self, params: &[&Tensor], dtype: DType, to_eval: bool) -> Result<()> {
        // SAFETY: as in `step`: checked, disjoint tensors of `dtype` on this
        // backend's device, kept alive by the caller, untouched by libtorch
        // meanwhile.
        let mut p: Vec<B::ViewMut<'_>> = params
            .iter()
            .map(|t| unsafe { B::tensor_view_mut(t, dtype) })
            .collect();
        if to_eval {
            shampoo_core::Shampoo::eval(self, &mut p)?;
        } else {
            shampoo_core::Shampoo::train(self, &mut p)?;
        }
        Ok(())
    }
    fn is_train_mode(&self) -> bool {
        shampoo_core::Shampoo::is_train_mode(self)
    }
    fn save(&self, path: &Path) -> Result<()> {
        Ok(shampoo_core::Shampoo::save(self, path)?)
    }
    fn load_files(&mut self, paths: &[std::path::PathBuf]) -> Result<()> {
        let files = paths
            .iter()
            .map(shampoo_core::checkpoint::CheckpointFile::open)
            .collect::<shampoo_core::Result<Vec<_>>>()?;
        Ok(shampoo_core::Shampoo::load_from(self, &files)?)
    }
    fn root_inverse_stats(&self) -> Vec<shampoo_core::BlockRootInverseStats> {
        shampoo_core::Shampoo::root_inverse_stats(self)
    }
}

/// A single-process engine for tensors on `device`.
pub(crate) fn local_engine(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    dtype: DType,
    device: Device,
    options: &EngineOptions,
) -> Result<Box<dyn LocalEngine>> {
    fn build<B: TensorBackend>(
        config: &ShampooConfig,
        shapes: &[Vec<usize>],
        dtype: DType,
        device: Device,
        options: &EngineOptions,
    ) -> Result<Box<dyn LocalEngine>> {
        let backend = B::for_device(device, options)?;
        Ok(Box::new(shampoo_core::Shampoo::new(
            config.clone(),
            shapes,
            dtype,
            backend,
        )?))
    }
    match device {
        Device::Cpu => build::<CpuBackend>(config, shapes, dtype, device, options),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => build::<shampoo_core::backend::cuda::CudaBackend>(
            config, shapes, dtype, device, options,
        ),
        d => Err(Error::Torch(format!(
            "internal: no backend for device {d:?} (vars::check_tensor refuses it)"
        ))),
    }
}
