//! The cuBLAS and cuSOLVER handles of one backend, bound to its stream,
//! with the scratch their calls use, and the status checks of both
//! libraries.

use cudarc::cublas::sys as bsys;
use cudarc::cusolver::sys as ssys;
use cudarc::driver::sys as dsys;

use crate::{Error, Result};

/// The library handles of one backend (used under its mutex).
pub(super) struct Libs {
    pub(super) blas: bsys::cublasHandle_t,
    pub(super) solver: ssys::cusolverDnHandle_t,
    pub(super) params: ssys::cusolverDnParams_t,
    /// Scratch of the eigensolver, grown on demand.
    pub(super) scratch: super::scratch::Scratch,
    /// Scratch of the statistics' mode moves, grown on demand.
    pub(super) moved: super::scratch::DeviceScratch,
    /// bf16 copies of a GEMM's two operands, grown on demand.
    pub(super) bf16: [super::scratch::DeviceScratch; 2],
}

// SAFETY: the handles are only used while the backend's mutex is held, so
// never from two threads at once; cuBLAS and cuSOLVER handles may move
// between threads.
unsafe impl Send for Libs {}

impl Libs {
    pub(super) fn new(stream: dsys::CUstream) -> Result<Self> {
        let mut blas = std::ptr::null_mut();
        // SAFETY: plain handle creation; the context is current.
        let s = unsafe { bsys::cublasCreate_v2(&mut blas) };
        blas_ok("cublasCreate", s)?;
        // SAFETY: `blas` was just created; the stream is the backend's.
        let s = unsafe { bsys::cublasSetStream_v2(blas, stream as bsys::cudaStream_t) };
        blas_ok("cublasSetStream", s)?;
        let mut solver = std::ptr::null_mut();
        // SAFETY: as above, for cuSOLVER.
        let s = unsafe { ssys::cusolverDnCreate(&mut solver) };
        solver_ok("cusolverDnCreate", s)?;
        // SAFETY: `solver` was just created.
        let s = unsafe { ssys::cusolverDnSetStream(solver, stream as ssys::cudaStream_t) };
        solver_ok("cusolverDnSetStream", s)?;
        let mut params = std::ptr::null_mut();
        // SAFETY: plain creation.
        let s = unsafe { ssys::cusolverDnCreateParams(&mut params) };
        solver_ok("cusolverDnCreateParams", s)?;
        Ok(Libs {
            blas,
            solver,
            params,
            scratch: super::scratch::Scratch::default(),
            moved: super::scratch::DeviceScratch::default(),
            bf16: Default::default(),
        })
    }
}

impl Drop for Libs {
    fn drop(&mut self) {
        // SAFETY: each handle was created once in `new` and is destroyed
        // once here.
        unsafe {
            let _ = ssys::cusolverDnDestroyParams(self.params);
            let _ = ssys::cusolverDnDestroy(self.solver);
            let _ = bsys::cublasDestroy_v2(self.blas);
        }
    }
}

pub(super) fn blas_ok(what: &str, s: bsys::cublasStatus_t) -> Result<()> {
    if s == bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend("cublas", format!("{what}: {s:?}")))
    }
}

pub(super) fn solver_ok(what: &str, s: ssys::cusolverStatus_t) -> Result<()> {
    if s == ssys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend("cusolver", format!("{what}: {s:?}")))
    }
}
