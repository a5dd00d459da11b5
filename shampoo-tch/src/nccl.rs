//! Averaging CUDA gradients in place on their device with NCCL (feature
//! `nccl`), instead of through host memory.
//!
//! The gradients and one presence flag per variable are packed into one
//! device buffer (libtorch's `cat`), averaged by one `ncclAllReduce`
//! (`ncclAvg`), and copied back; everything is queued on the legacy default
//! stream, libtorch's default current stream. Only the flags are read back
//! to the host, to refuse a variable whose gradient exists on some ranks
//! only.

use std::sync::{Arc, Mutex};

use shampoo_core::DType;
use shampoo_dist::comm::nccl::{NcclCommunicator, NcclDType};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result, vars};

/// An NCCL communicator shared by the optimizer and the training loop.
pub type SharedNccl = Arc<Mutex<NcclCommunicator>>;

pub(crate) fn lock(nccl: &SharedNccl) -> Result<std::sync::MutexGuard<'_, NcclCommunicator>> {
    nccl.lock().map_err(|_| {
        Error::Options(
            "the NCCL communicator's lock is poisoned (a thread panicked while holding it)".into(),
        )
    })
}

/// Averages `grads` (of `dtype`, `lens[i]` elements each, all on `device`;
/// `None`: no gradient) of the variables `names` across the ranks of
/// `nccl`, in place on the device.
///
/// Every gradient must have passed `vars::check_tensor` with `dtype`.
pub(crate) fn average(
    nccl: &SharedNccl,
    (dtype, device): (DType, Device),
    names: &[&str],
    lens: &[usize],
    grads: &[Option<&Tensor>],
) -> Result<()> {
    // A world of one runs the whole path too (NCCL's average of one rank
    // is exact), which is how a one-GPU machine tests it.
    let mut comm = lock(nccl)?;
    let world = comm.world_size();
    let (kind, ndtype) = match dtype {
        DType::F32 => (Kind::Float, NcclDType::F32),
        DType::F64 => (Kind::Double, NcclDType::F64),
    };
    let mut parts = Vec::with_capacity(grads.len() + 1);
    let mut flags = vec![0f64; grads.len()];
    for ((g, &n), flag) in grads.iter().zip(lens).zip(&mut flags) {
        match g {
            Some(g) => {
                parts.push(g.f_reshape([-1])?);
                *flag = 1.0;
            }
            None => parts.push(Tensor::f_zeros([n as i64], (kind, device))?),
        }
    }
    parts.push(
        Tensor::f_from_slice(&flags)?
            .f_to_kind(kind)?
            .f_to(device)?,
    );
    let bucket = Tensor::f_cat(&parts, 0)?;
    // SAFETY: `bucket` is a fresh contiguous device tensor of `numel`
    // elements of `dtype` on the communicator's device; it lives until the
    // end of this function, and libtorch frees it for reuse only after the
    // work queued on the same stream before that (the all-reduce and the
    // copies below).
    unsafe {
        comm.all_reduce_mean(
            bucket.data_ptr() as u64,
            bucket.numel(),
            ndtype,
            std::ptr::null_mut(),
        )?;
    }
    drop(comm);
    let numel: usize = lens.iter().sum();
    let shares: Vec<f64> = Vec::<f64>::try_from(
        &bucket
            .f_narrow(0, numel as i64, lens.len() as i64)?
            .f_to_kind(Kind::Double)?
            .f_to(Device::Cpu)?,
    )?;
    // The flags are the same on every rank, so every rank returns the same
    // error.
    for (name, &share) in names.iter().zip(&shares) {
        if share != 0.0 && share != 1.0 {
            let k = (share * world as f64).round() as usize;
            return Err(Error::variable(
                name,
                format!(
                    "has a gradient on {k} of {world} ranks; every rank needs a gradient for it, or none"
                ),
            ));
        }
    }
    let mut off = 0i64;
    for (g, &n) in grads.iter().zip(lens) {
        if let Some(g) = g {
            let avg = bucket.f_narrow(0, off, n as i64)?.f_view_as(g)?;
            g.shallow_clone().f_copy_(&avg)?;
        }
        off += n as i64;
    }
    Ok(())
}

/// Averages the gradient of every trainable variable of `vs` across the
/// ranks of `nccl`, in place: [`crate::all_reduce_gradients`] for
/// variables on a CUDA device, with NCCL on the device (one all-reduce per
/// dtype). Every variable must be on the communicator's device.
pub fn all_reduce_gradients_nccl(vs: &VarStore, nccl: &SharedNccl) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let groups = vars::read_groups(&vs.variables_)?;
    let mut grads: Vec<(&vars::Var, Option<Tensor>)> = Vec::new();
    let mut device = None;
    for v in groups.values().flatten() {
        let d = *device.get_or_insert(v.device);
        if !matches!(v.device, Device::Cuda(_)) || v.device != d {
            return Err(Error::variable(
                &v.name,
                format!(
                    "is on {}; averaging with NCCL needs every variable on the communicator's GPU ({})",
                    vars::device_name(v.device),
                    vars::device_name(d)
                ),
            ));
        }
        grads.push((v, vars::gradient(v)?));
    }
    let Some(device) = device else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::F64] {
        let of: Vec<&(&vars::Var, Option<Tensor>)> =
            grads.iter().filter(|(v, _)| v.dtype == dtype).collect();
        if of.is_empty() {
            continue;
        }
        let names: Vec<&str> = of.iter().map(|(v, _)| v.name.as_str()).collect();
        let lens: Vec<usize> = of.iter().map(|(v, _)| v.tensor.numel()).collect();
        let gs: Vec<Option<&Tensor>> = of.iter().map(|(_, g)| g.as_ref()).collect();
        average(nccl, (dtype, device), &names, &lens, &gs)?;
    }
    Ok(())
}
