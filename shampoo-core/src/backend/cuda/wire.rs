//! The 16-bit communication formats ([`WireJob`]): one launch of
//! `kernels/wire.cu` per job, the CPU backend's algorithm on bit patterns.

use super::CudaBackend;
use super::kernels::{Args, Kernel, grid_for, kernel_defines as defs};
use crate::Result;
use crate::backend::cpu::wire::check_wire;
use crate::backend::{ViewMutOps, ViewOps, WireFormat, WireJob};

/// The kernels' code of a format (`WIRE_BF16`, `WIRE_F16`).
fn code(f: WireFormat) -> u64 {
    match f {
        WireFormat::Bf16 => defs::WIRE_BF16,
        WireFormat::F16 => defs::WIRE_F16,
    }
}

pub(super) fn wire(be: &CudaBackend, jobs: &mut [WireJob<'_, CudaBackend>]) -> Result<()> {
    for job in jobs.iter_mut() {
        match job {
            WireJob::Pack { src, wire, format } => {
                let dt = src.dtype();
                check_wire(dt, wire.dtype(), wire.len(), src.len())?;
                // Every 16-bit slot of the wire view: the values, then zeros.
                let slots = wire.len() * dt.size() / 2;
                be.launch(
                    Kernel::Pack16,
                    dt,
                    grid_for(slots),
                    Args::new()
                        .u(src.ptr)
                        .u(wire.ptr)
                        .u(src.len() as u64)
                        .u(slots as u64)
                        .u(code(*format)),
                )?;
            }
            WireJob::Unpack { wire, dst, format } => {
                let dt = dst.dtype();
                check_wire(dt, wire.dtype(), wire.len(), dst.len())?;
                be.launch(
                    Kernel::Unpack16,
                    dt,
                    grid_for(dst.len()),
                    Args::new()
                        .u(wire.ptr)
                        .u(dst.ptr)
                        .u(dst.len() as u64)
                        .u(code(*format)),
                )?;
            }
        }
    }
    Ok(())
}
