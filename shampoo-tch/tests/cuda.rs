//! CUDA variables (feature `cuda`; every test returns early, saying so,
//! where libtorch sees no GPU): the adapter updates them in place through
//! shampoo-core's CUDA backend and matches the CPU adapter on the same
//! gradients; data-parallel CUDA ranks shard their blocks by default (each
//! holds about half the state) and agree bit for bit, replicated as an
//! explicit choice; with NCCL in a world of one the sharded path gives bit
//! for bit the run without a communicator.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Mlp, adam_only_config, batch, bits, init_fixed, shampoo_config};
use shampoo_dist::{CommOptions, Communicator, in_process};
use shampoo_tch::Shampoo;
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

const STEPS: i64 = 8;

fn gpu() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("skipped: libtorch sees no CUDA device");
        None
    }
}

/// A model of two `Mlp`s (weights preconditioned in group 0, the second
/// one's biases Adam-only in group 1), on `device`, with fixed weights.
fn model(device: Device, kind: Kind) -> (VarStore, Mlp) {
    let mut vs = VarStore::new(Device::Cpu);
    let m = Mlp::new(vs.root() / "m");
    init_fixed(&vs);
    vs.set_kind(kind);
    vs.set_device(device);
    (vs, m)
}

fn loss_on(m: &Mlp, step: i64, kind: Kind, device: Device) -> Tensor {
    let (x, y) = batch(step, kind);
    (m.forward(&x.to(device)) - y.to(device))
        .square()
        .mean(None)
}

/// Largest difference between the two stores' variables, relative to the
/// largest magnitude.
fn max_rel_diff(a: &VarStore, b: &VarStore) -> f64 {
    let (va, vb) = (a.variables(), b.variables());
    let mut worst = 0.0f64;
    for (name, ta) in &va {
        let ta = ta.to(Device::Cpu).to_kind(Kind::Double);
        let tb = vb[name].to(Device::Cpu).to_kind(Kind::Double);
        let scale = ta.abs().max().double_value(&[]).max(1e-12);
        let d = (&ta - &tb).abs().max().double_value(&[]);
        worst = worst.max(d / scale);
    }
    worst
}

fn run(device: Device, kind: Kind, clip: Option<f64>) -> (VarStore, Vec<f64>) {
    let (vs, m) = model(device, kind);
    let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
    let mut norms = Vec::new();
    for step in 0..STEPS {
        let l = loss_on(&m, step, kind, device);
        opt.zero_grad();
        l.backward();
        if let Some(c) = clip {
            norms.push(opt.clip_grad_norm(c).unwrap());
        }
        opt.step().unwrap();
    }
    (vs, norms)
}

#[test]
fn cuda_variables_update_in_place_like_the_cpu_adapter() {
    let Some(gpu) = gpu() else { return };
    for (kind, tol) in [(Kind::Float, 1e-4), (Kind::Double, 1e-10)] {
        let (cpu, _) = run(Device::Cpu, kind, None);
        let (vs, m) = model(gpu, kind);
        let ptrs: Vec<usize> = vs
            .trainable_variables()
            .iter()
            .map(|t| t.data_ptr() as usize)
            .collect();
        let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
        for step in 0..STEPS {
            opt.backward_step(&loss_on(&m, step, kind, gpu)).unwrap();
        }
        // In place: the variables' memory is where it was.
        let after: Vec<usize> = vs
            .trainable_variables()
            .iter()
            .map(|t| t.data_ptr() as usize)
            .collect();
        assert_eq!(ptrs, after);
        let d = max_rel_diff(&cpu, &vs);
        assert!(
            d < tol,
            "{kind:?}: CUDA and CPU differ by {d:e} (tolerance {tol:e})"
        );
    }
}

#[test]
fn clip_grad_norm_on_cuda_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (cpu, cpu_norms) = run(Device::Cpu, Kind::Float, Some(0.05));
    let (dev, dev_norms) = run(gpu, Kind::Float, Some(0.05));
    for (a, b) in cpu_norms.iter().zip(&dev_norms) {
        assert!((a - b).abs() <= 1e-5 * a, "norms {a} (cpu) and {b} (cuda)");
    }
    assert!(cpu_norms.iter().any(|&n| n > 0.05), "some step must clip");
    let d = max_rel_diff(&cpu, &dev);
    assert!(d < 1e-4, "clipped runs differ by {d:e}");
}

#[test]
fn a_group_on_two_devices_is_refused() {
    let Some(gpu) = gpu() else { return };
    let vs = VarStore::new(Device::Cpu);
    let _m = Mlp::new(vs.root() / "m");
    let mut opt = Shampoo::new(&vs, adam_only_config(0.01)).unwrap();
    // Move one variable to the GPU behind the VarStore's back.
    let mut moved = vs.variables()["m.l2.weight"].shallow_clone();
    tch::no_grad(|| moved.set_data(&moved.to(gpu)));
    let err = opt.step().unwrap_err().to_string();
    assert!(
        err.starts_with("parameter group 0: mixes variable") && err.contains("cuda:0"),
        "{err}"
    );
}

/// A rank's weights (as bits, by name) and state bytes.
type RankResult = (Vec<(String, Vec<u32>)>, usize);

/// Two data-parallel CUDA ranks (threads sharing GPU 0, host-staged
/// collective): their weights, and each rank's state bytes.
fn two_cuda_ranks(gpu: Device, replicated: bool) -> Vec<RankResult> {
    let comms = in_process(
        2,
        &CommOptions {
            timeout: Duration::from_secs(120),
        },
    );
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c: Arc<dyn Communicator>| {
                s.spawn(move || {
                    let rank = c.rank() as i64;
                    let (vs, m) = model(gpu, Kind::Float);
                    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
                        .communicator(c)
                        .replicated(replicated)
                        .build()
                        .unwrap();
                    for step in 0..STEPS {
                        let l = loss_on(&m, 2 * step + rank, Kind::Float, gpu);
                        opt.backward_step(&l).unwrap();
                        let t = opt.timings();
                        assert!(t.all_reduce > Duration::ZERO);
                        assert_eq!(t.gathered_bytes > 0, !replicated);
                    }
                    opt.flush().unwrap();
                    (bits(&vs), opt.state_bytes())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn data_parallel_cuda_ranks_shard_by_default_and_agree_bitwise() {
    let Some(gpu) = gpu() else { return };
    let sharded = two_cuda_ranks(gpu, false);
    assert_eq!(
        sharded[0].0, sharded[1].0,
        "CUDA ranks hold different weights"
    );
    let replicated = two_cuda_ranks(gpu, true);
    assert_eq!(replicated[0].0, replicated[1].0);
    // Sharded, the two ranks hold the whole state between them.
    let whole = replicated[0].1;
    assert_eq!(sharded[0].1 + sharded[1].1, whole);
    assert!(sharded[0].1 < whole && sharded[1].1 < whole);
}

/// NCCL in a world of one on GPU 0: the sharded path runs (own directions
/// packed into a slot, all-gathered by NCCL on the device, applied from the
/// gathered buffer; a world of one averages no gradients) and gives bit for
/// bit the replicated run without a communicator.
#[cfg(feature = "nccl")]
#[test]
fn nccl_in_a_world_of_one_changes_nothing() {
    use shampoo_dist::collective::nccl::NcclCollective;
    use shampoo_dist::comm::nccl::probe_device;
    use shampoo_dist::{Collectives, SingleProcess};

    let Some(gpu) = gpu() else { return };
    if let Err(e) = probe_device(0) {
        eprintln!("skipped: {e}");
        return;
    }
    let single: Arc<dyn Communicator> = Arc::new(SingleProcess);
    let nccl = Arc::new(NcclCollective::new(single.clone(), 0, &CommOptions::default()).unwrap());
    let collectives = Collectives::with_nccl(single, nccl).unwrap();
    let run = |with_nccl: bool| {
        let (vs, m) = model(gpu, Kind::Float);
        let mut b = Shampoo::builder(&vs, shampoo_config(0.01));
        if with_nccl {
            b = b.collectives(collectives.clone());
        }
        let mut opt = b.build().unwrap();
        for step in 0..STEPS {
            opt.zero_grad();
            loss_on(&m, step, Kind::Float, gpu).backward();
            if with_nccl && step == 0 {
                // The baselines' helper: a world of one changes nothing.
                let before = bits_of_grads(&vs);
                shampoo_tch::all_reduce_gradients(&vs, &collectives).unwrap();
                assert_eq!(bits_of_grads(&vs), before);
            }
            opt.step().unwrap();
        }
        opt.flush().unwrap();
        bits(&vs)
    };
    assert_eq!(run(true), run(false));
}

#[cfg(feature = "nccl")]
fn bits_of_grads(vs: &VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let g = common::host(&t.grad());
            (n, g.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn channels_last_cuda_weights_train_bit_for_bit_like_contiguous_ones() {
    let Some(device) = gpu() else { return };
    common::channels_last::same_trajectories(device);
}
