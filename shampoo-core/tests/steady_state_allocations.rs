//! A steady-state step allocates no buffers: only small job lists.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};

/// Bytes allocated by each of 9 steps of a model with shapes scaled by
/// `scale` (same blocks and groups, `scale^2` times the elements).
fn bytes_per_step(scale: usize) -> Vec<(bool, usize)> {
    let shapes = vec![
        vec![64 * scale, 32 * scale],
        vec![32 * scale],
        vec![16 * scale, 3, 3, 3],
        vec![250 * scale],
    ];
    let cfg = ShampooConfig::from_json(&format!(
        r#"{{"max_preconditioner_dim": {}, "precondition_frequency": 3, "betas": [0.9, 0.999],
            "grafting": {{"type": "adam"}}, "weight_decay": 0.01, "momentum": {{"momentum": 0.9}}}}"#,
        32 * scale
    ))
    .unwrap();
    let mut opt = Shampoo::new(cfg, &shapes, DType::F32, CpuBackend::new(2).unwrap()).unwrap();
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| vec![0.1; s.iter().product()])
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|i| (i % 7) as f32 - 3.0)
                .collect()
        })
        .collect();
    let mut per_step = Vec::new();
    for _ in 0..9 {
        let b0 = BYTES.load(Ordering::Relaxed);
        let root = opt.next_step_has_root_inverse();
        {
            let mut v: Vec<HostViewMut<'_>> =
                params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
            let g: Vec<Option<HostView<'_>>> =
                grads.iter().map(|g| Some(HostView::F32(g))).collect();
            opt.step(&mut v, &g).unwrap();
        }
        per_step.push((root, BYTES.load(Ordering::Relaxed) - b0));
    }
    per_step
}

#[test]
fn steady_state_steps_allocate_only_bookkeeping() {
    // Warm up the process-wide caches (thread pools, faer's packing scratch,
    // per-thread eigensolver scratch) at the larger size first.
    bytes_per_step(4);
    let small = bytes_per_step(1);
    let large = bytes_per_step(4);
    let _ = CALLS.load(Ordering::Relaxed);
    eprintln!("bytes per step (root inverse?, bytes): x1 {small:?}; x4 {large:?}");
    // Job lists only: small, and the same for 16x the elements. A worker
    // thread of the backend's (new) pool that meets some work for the first
    // time may set up thread-local scratch during any step, so steps are
    // compared by their steady state, the least a non-root step allocated.
    let steady = |steps: &[(bool, usize)]| {
        let plain: Vec<usize> = steps[3..]
            .iter()
            .filter(|(root, _)| !root)
            .map(|&(_, b)| b)
            .collect();
        for &b in &plain {
            assert!(b < 64 * 1024, "a step allocated {b} bytes");
        }
        plain.into_iter().min().expect("non-root steps")
    };
    let (s, l) = (steady(&small), steady(&large));
    assert!(
        l.abs_diff(s) < 4096,
        "allocations grew with the model: {s} -> {l} bytes"
    );
}
