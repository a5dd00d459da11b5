//! The NCCL transport on one GPU (feature `nccl`): a one-rank NCCL world
//! gives the same results as no communicator. Without a GPU (or without the
//! CUDA driver or NCCL) the GPU test prints why it is skipped, and creating
//! an NCCL communicator must be a clean error, never a panic.
#![cfg(feature = "nccl")]

use shampoo_dist::comm::nccl::{NcclCommunicator, NcclDType, find_nccl};
use shampoo_dist::{Communicator, SingleProcess};

/// Why a GPU test cannot run here, if it cannot.
fn gpu_missing() -> Option<String> {
    // SAFETY: probing the driver library only runs its initialisers.
    if unsafe { libloading::Library::new("libcuda.so.1") }.is_err() {
        return Some("no CUDA driver (libcuda.so.1 cannot be loaded)".into());
    }
    if let Err(e) = find_nccl() {
        return Some(e.to_string());
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("no CUDA device".into()),
        Err(e) => Some(format!("CUDA driver error: {e}")),
    }
}

#[test]
fn one_rank_nccl_equals_no_communicator() {
    if let Some(why) = gpu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let host: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut expected = host.clone();
    SingleProcess.all_reduce_mean(&mut expected).unwrap();

    let mut comm = NcclCommunicator::new(&SingleProcess).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let mut buf = stream.clone_htod(&host).unwrap();
    let mut out = stream.alloc_zeros::<f32>(host.len()).unwrap();
    {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (p, _s) = buf.device_ptr_mut(&stream);
        // SAFETY: `buf` holds host.len() f32 on device 0, alive until the
        // stream is synchronised below.
        unsafe {
            comm.all_reduce_mean(p, host.len(), NcclDType::F32, stream.cu_stream().cast())
                .unwrap()
        };
        drop(_s);
        let (src, _a) = buf.device_ptr(&stream);
        let (dst, _b) = out.device_ptr_mut(&stream);
        // SAFETY: both hold host.len() f32 (a world of one gathers one part).
        unsafe {
            comm.all_gather(
                src,
                dst,
                host.len(),
                NcclDType::F32,
                stream.cu_stream().cast(),
            )
            .unwrap()
        };
    }
    stream.synchronize().unwrap();
    let reduced = stream.clone_dtoh(&buf).unwrap();
    let gathered = stream.clone_dtoh(&out).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&reduced), bits(&expected));
    assert_eq!(bits(&gathered), bits(&host));
}

#[test]
fn without_a_gpu_creating_a_communicator_is_a_clean_error() {
    if gpu_missing().is_none() {
        eprintln!("skipped: a GPU is present (covered by one_rank_nccl_equals_no_communicator)");
        return;
    }
    let err = NcclCommunicator::new(&SingleProcess)
        .err()
        .expect("no GPU: an error");
    let msg = err.to_string();
    eprintln!("error without a GPU: {msg}");
    assert!(
        msg.starts_with("NCCL not found: looked for libnccl.so.2, libnccl.so in [")
            || msg.starts_with("NCCL ncclCommInitRank failed: ")
            || msg.starts_with("NCCL ncclGetUniqueId failed: "),
        "{msg}"
    );
}
