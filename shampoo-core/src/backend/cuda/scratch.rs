//! Device scratch that only grows: what the eigensolver and the
//! statistics' mode moves work in.

use cudarc::driver::result as drv;

use crate::{Error, Result};

const OP: &str = "scratch";

/// A device allocation that only grows.
#[derive(Default)]
pub(super) struct DeviceScratch {
    ptr: u64,
    bytes: usize,
}

impl DeviceScratch {
    /// At least `bytes` bytes (reallocating, which waits for the device,
    /// only when the request is larger than any before).
    pub(super) fn ensure(&mut self, bytes: usize) -> Result<u64> {
        if bytes > self.bytes {
            if self.ptr != 0 {
                // SAFETY: allocated below, freed once; cuMemFree waits for
                // work still using it.
                unsafe { drv::free_sync(self.ptr) }.map_err(|e| Error::backend(OP, e))?;
                self.ptr = 0;
                self.bytes = 0;
            }
            // SAFETY: a plain device allocation.
            self.ptr = unsafe { drv::malloc_sync(bytes) }
                .map_err(|e| Error::backend(OP, format!("scratch of {bytes} bytes: {e}")))?;
            self.bytes = bytes;
        }
        Ok(self.ptr)
    }
}

impl Drop for DeviceScratch {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: freed once, by its owner.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// The eigensolver's scratch: solver workspace (device and host), the
/// input copy, per-matrix flags and infos, and the float64 retry buffers.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) work: DeviceScratch,
    pub(super) host: Vec<u8>,
    pub(super) backup: DeviceScratch,
    pub(super) flags: DeviceScratch,
    pub(super) info: DeviceScratch,
    pub(super) retry: DeviceScratch,
}
