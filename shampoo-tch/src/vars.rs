//! Reading the trainable variables of a `VarStore` and viewing their memory
//! in place.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use shampoo_core::{CpuBackend, DType, HostView, HostViewMut};
use tch::nn::Variables;
use tch::{Device, Kind, Tensor};

use crate::engine::TensorBackend;
use crate::{Error, Result};

/// The reason given for tensors on a CUDA device when the crate is built
/// without its `cuda` feature.
pub const CUDA_UNSUPPORTED: &str =
    "CUDA tensors need shampoo-tch's `cuda` feature, which this build lacks";

/// One trainable variable as seen at the start of a step.
pub(crate) struct Var {
    pub name: String,
    pub tensor: Tensor,
    pub shape: Vec<usize>,
    /// Element strides, canonical ([`memory_strides`]).
    pub strides: Vec<usize>,
    pub dtype: DType,
    pub device: Device,
}

/// `t`'s element strides in the core's canonical form
/// ([`shampoo_core::strided::canonical_strides`]), so that two tensors laid
/// out alike compare equal.
pub(crate) fn memory_strides(t: &Tensor) -> Vec<usize> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let strides: Vec<usize> = t.stride().iter().map(|&s| s.max(0) as usize).collect();
    shampoo_core::strided::canonical_strides(&shape, &strides)
}

/// The trainable variables of every group, each group sorted by name.
/// Variables without elements are left out (there is nothing to update).
pub(crate) fn read_groups(vars: &Arc<Mutex<Variables>>) -> Result<BTreeMap<usize, Vec<Var>>> {
    let v = vars.lock().map_err(|_| Error::Group {
        group: 0,
        reason: "the VarStore's lock is poisoned (a thread panicked while holding it)".into(),
    })?;
    // Names are keyed by what identifies a tensor's memory: the address of
    // its first element, its shape and its element type. Variables that
    // share memory (tied) share a key; they take its names in order.
    let mut names: HashMap<(usize, Vec<i64>, Kind), Vec<&str>> = HashMap::new();
    for (name, t) in &v.named_variables {
        if t.defined() && t.numel() > 0 {
            names
                .entry((t.data_ptr() as usize, t.size(), t.kind()))
                .or_default()
                .push(name);
        }
    }
    for list in names.values_mut() {
        list.sort_unstable_by(|a, b| b.cmp(a)); // popped from the end: first name first
    }
    let mut groups: BTreeMap<usize, Vec<Var>> = BTreeMap::new();
    for (i, var) in v.trainable_variables.iter().enumerate() {
        let t = &var.tensor;
        if !t.defined() || t.numel() == 0 {
            continue;
        }
        let size = t.size();
        let name = names
            .get_mut(&(t.data_ptr() as usize, size.clone(), t.kind()))
            .and_then(|l| l.pop())
            .map_or_else(
                || format!("<unnamed trainable variable {i}>"),
                str::to_string,
            );
        let dtype = check_tensor(&name, t, "")?;
        let shape = size.iter().map(|&d| d as usize).collect();
        groups.entry(var.group).or_default().push(Var {
            name,
            tensor: t.shallow_clone(),
            shape,
            strides: memory_strides(t),
            dtype,
            device: t.device(),
        });
    }
    drop(v);
    for vars in groups.values_mut() {
        vars.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(groups)
}

/// Checks that `t` can be viewed in place as a backend's memory: on the
/// CPU (or a CUDA device, with feature `cuda`), `f32` or `f64`, dense, its
/// elements in row-major order or any permutation of its dimensions
/// (channels-last). `what` prefixes the reason ("" for the variable, "its
/// gradient " for the gradient).
pub(crate) fn check_tensor(name: &str, t: &Tensor, what: &str) -> Result<DType> {
    match t.device() {
        Device::Cpu => {}
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {}
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => {
            return Err(Error::variable(
                name,
                format!("{what}is on cuda:{i}: {CUDA_UNSUPPORTED}"),
            ));
        }
        d => {
            return Err(Error::variable(
                name,
                format!("{what}is on device {d:?}; only CPU and CUDA tensors are supported"),
            ));
        }
    }
    if t.is_sparse() {
        return Err(Error::variable(
            name,
            format!("{what}is a sparse tensor; only dense tensors are supported"),
        ));
    }
    let dtype = match t.kind() {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        k => {
            return Err(Error::variable(
                name,
                format!("{what}has dtype {k:?}; only Float (f32) and Double (f64) are supported"),
            ));
        }
    };
    if !t.is_contiguous() {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let strides: Vec<usize> = t.stride().iter().map(|&s| s.max(0) as usize).collect();
        if t.stride().iter().any(|&s| s < 0)
            || shampoo_core::strided::Strided::new(name, &shape, &strides).is_err()
        {
            return Err(Error::variable(
                name,
                format!(
                    "{what}has strides {:?} for shape {shape:?}: its elements overlap or leave gaps (a view?); only dense layouts (contiguous, channels-last, any permutation of the dimensions) are supported; make it contiguous",
                    t.stride()
                ),
            ));
        }
    }
    Ok(dtype)
}

/// The gradient of `var`, checked against the variable: `None` when it is
/// undefined (the variable took no part in the backward pass).
pub(crate) fn gradient(var: &Var) -> Result<Option<Tensor>> {
    let g = var.tensor.grad();
    if !g.defined() {
        return Ok(None);
    }
    let dtype = check_tensor(&var.name, &g, "its gradient ")?;
    if g.device() != var.device {
        return Err(Error::variable(
            &var.name,
            format!(
                "its gradient is on {} but the variable is on {}",
                device_name(g.device()),
                device_name(var.device)
            ),
        ));
    }
    if dtype != var.dtype {
        return Err(Error::variable(
            &var.name,
            format!("its gradient is {dtype} but the variable is {}", var.dtype),
        ));
    }
    if g.size() != var.tensor.size() {
        return Err(Error::variable(
            &var.name,
            format!(
                "its gradient has shape {:?} but the variable has {:?}",
                g.size(),
                var.tensor.size()
            ),
        ));
    }
    let strides = memory_strides(&g);
    if strides != var.strides {
        return Err(Error::variable(
            &var.name,
            format!(
                "its gradient has strides {:?} but the variable has {:?}; the optimizer reads both in place, so they must be laid out alike (libtorch gives a channels-last variable a channels-last gradient unless the gradient was replaced)",
                g.stride(),
                var.tensor.stride()
            ),
        ));
    }
    Ok(Some(g))
}

/// The address space (device) and byte range a dense tensor occupies.
fn byte_range(t: &Tensor, dtype: DType) -> (i64, usize, usize) {
    let space = match t.device() {
        Device::Cpu => -1,
        Device::Cuda(i) => i as i64,
        _ => -2,
    };
    let start = t.data_ptr() as usize;
    (space, start, start + t.numel() * dtype.size())
}

/// A device as users write it: `cpu`, `cuda:0`.
pub(crate) fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        d => format!("{d:?}"),
    }
}

/// Errors when any two of the given tensors share memory: views handed to
/// the optimizer must not alias.
pub(crate) fn check_disjoint(tensors: &[(&str, &Tensor, DType)]) -> Result<()> {
    let mut ranges: Vec<(i64, usize, usize, &str)> = tensors
        .iter()
        .map(|(name, t, d)| {
            let (space, s, e) = byte_range(t, *d);
            (space, s, e, *name)
        })
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 == w[0].0 && w[1].1 < w[0].2 {
            return Err(Error::variable(
                w[1].3,
                format!(
                    "shares memory with variable {:?} (or a gradient does); tied or aliased variables are not supported",
                    w[0].3
                ),
            ));
        }
    }
    Ok(())
}

/// A mutable host view of a checked CPU tensor.
///
/// # Safety
///
/// As [`TensorBackend::tensor_view_mut`] for the CPU backend.
pub(crate) unsafe fn view_mut<'a>(t: &'a Tensor, dtype: DType) -> HostViewMut<'a> {
    // SAFETY: forwarded contract.
    unsafe { CpuBackend::tensor_view_mut(t, dtype) }
}

/// A read-only host view of a checked CPU tensor.
///
/// # Safety
///
/// As [`TensorBackend::tensor_view`] for the CPU backend.
pub(crate) unsafe fn view<'a>(t: &'a Tensor, dtype: DType) -> HostView<'a> {
    // SAFETY: forwarded contract.
    unsafe { CpuBackend::tensor_view(t, dtype) }
}
