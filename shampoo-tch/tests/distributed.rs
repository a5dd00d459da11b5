//! Data-parallel: two ranks (threads, `shampoo_dist::in_process`) end with
//! identical weights, equal bit for bit to one process stepping with the
//! ranks' averaged gradients (f32 communication).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Reference, TwoLayer, adam_only_config, bits, host, init_fixed, loss, shampoo_config};
use shampoo_dist::Collectives;
use shampoo_dist::{
    CommDType, CommOptions, Communicator, DistOptions, in_process, mean_in_rank_order,
};
use shampoo_tch::{Shampoo, all_reduce_gradients};
use tch::nn::VarStore;
use tch::{Device, Kind};

const STEPS: i64 = 6;
/// The step that clips (its averaged gradients' norm is above `CLIP`).
const CLIP_STEP: i64 = 3;
const CLIP: f64 = 0.05;

fn comm_options() -> CommOptions {
    CommOptions {
        timeout: Duration::from_secs(60),
    }
}

/// The batch of `rank` at `step`.
fn batch_id(step: i64, rank: i64) -> i64 {
    2 * step + rank
}

/// One rank's training loop; returns its final weights.
fn run_rank(comm: Arc<dyn Communicator>) -> Vec<(String, Vec<u32>)> {
    run_rank_with(comm, DistOptions::default(), false)
}

/// Two ranks of `run_rank_with`; returns each rank's final weights.
fn run_two(opts: DistOptions, replicated: bool) -> Vec<Vec<(String, Vec<u32>)>> {
    let comms = in_process(2, &comm_options());
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let opts = opts.clone();
                s.spawn(move || run_rank_with(c, opts, replicated))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn run_rank_with(
    comm: Arc<dyn Communicator>,
    opts: DistOptions,
    replicated: bool,
) -> Vec<(String, Vec<u32>)> {
    let vs = VarStore::new(Device::Cpu);
    let m = TwoLayer::new(&vs);
    init_fixed(&vs);
    let rank = comm.rank() as i64;
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .group(1, adam_only_config(0.02))
        .threads(1)
        .communicator(comm)
        .dist_options(opts)
        .replicated(replicated)
        .build()
        .unwrap();
    for step in 0..STEPS {
        let l = loss(&m, batch_id(step, rank), Kind::Float);
        if step == CLIP_STEP {
            opt.backward_step_clip_norm(&l, CLIP).unwrap();
        } else {
            opt.backward_step(&l).unwrap();
        }
        let t = opt.timings();
        assert!(t.all_reduce > Duration::ZERO);
        // Replicated ranks exchange no directions.
        assert_eq!(t.all_gather > Duration::ZERO, !replicated);
    }
    bits(&vs)
}

/// The gradients of `names` on one batch at the current weights.
fn gradients(vs: &VarStore, m: &TwoLayer, batch: i64, names: &[&str]) -> Vec<Vec<f32>> {
    for (_, t) in vs.variables() {
        let mut t = t;
        t.zero_grad();
    }
    loss(m, batch, Kind::Float).backward();
    let vars = vs.variables();
    names.iter().map(|n| host(&vars[*n].grad())).collect()
}

#[test]
fn two_ranks_end_identical_and_equal_to_one_process_on_averaged_gradients() {
    let comms = in_process(2, &comm_options());
    let results: Vec<Vec<(String, Vec<u32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || run_rank(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0], results[1], "ranks hold different weights");

    // One process: average the two ranks' gradients as the all-reduce does,
    // clip as the adapter does, step shampoo_core.
    let vs = VarStore::new(Device::Cpu);
    let m = TwoLayer::new(&vs);
    init_fixed(&vs);
    let names = ["w1", "w2", "b1", "b2"]; // group 0 sorted, then group 1 sorted
    let mut ref_w = Reference::new(&vs, shampoo_config(0.01), &names[..2]);
    let mut ref_b = Reference::new(&vs, adam_only_config(0.02), &names[2..]);
    for step in 0..STEPS {
        let g0 = gradients(&vs, &m, batch_id(step, 0), &names);
        let g1 = gradients(&vs, &m, batch_id(step, 1), &names);
        let mut avg: Vec<Vec<f32>> = g0
            .iter()
            .zip(&g1)
            .map(|(a, b)| {
                let mut out = vec![0.0f32; a.len()];
                mean_in_rank_order(&[a.as_slice(), b.as_slice()], &mut out);
                out
            })
            .collect();
        if step == CLIP_STEP {
            let norm = avg
                .iter()
                .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum::<f64>()
                .sqrt();
            let coef = CLIP / (norm + 1e-6);
            assert!(coef < 1.0, "the clip step must clip (norm {norm})");
            for g in &mut avg {
                g.iter_mut().for_each(|x| *x *= coef as f32);
            }
        }
        let avg: Vec<Option<Vec<f32>>> = avg.into_iter().map(Some).collect();
        ref_w.step_with(&avg[..2]);
        ref_b.step_with(&avg[2..]);
        ref_w.write_back(&vs);
        ref_b.write_back(&vs);
    }
    assert_eq!(
        results[0],
        bits(&vs),
        "distributed run differs from one process"
    );
}

#[test]
fn all_reduce_gradients_averages_every_gradient_in_rank_order() {
    let comms = in_process(2, &comm_options());
    let names = ["b1", "b2", "w1", "w2"];
    // Per rank: the gradients before and after the all-reduce.
    type BeforeAfter = (Vec<Vec<f32>>, Vec<Vec<f32>>);
    let results: Vec<BeforeAfter> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let vs = VarStore::new(Device::Cpu);
                    let m = TwoLayer::new(&vs);
                    init_fixed(&vs);
                    let before = gradients(&vs, &m, c.rank() as i64, &names);
                    all_reduce_gradients(&vs, &Collectives::host(c.clone())).unwrap();
                    let vars = vs.variables();
                    let after = names.iter().map(|n| host(&vars[*n].grad())).collect();
                    (before, after)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(
        results[0].0, results[1].0,
        "the ranks' gradients must differ"
    );
    for (i, _) in names.iter().enumerate() {
        let mut want = vec![0.0f32; results[0].0[i].len()];
        mean_in_rank_order(&[&results[0].0[i], &results[1].0[i]], &mut want);
        assert_eq!(results[0].1[i], want);
        assert_eq!(results[1].1[i], want);
    }
}

fn dist_optimizer(vs: &VarStore, comm: Arc<dyn Communicator>, replicated: bool) -> Shampoo {
    Shampoo::builder(vs, shampoo_config(0.01))
        .group(1, adam_only_config(0.02))
        .threads(1)
        .communicator(comm)
        .replicated(replicated)
        .build()
        .unwrap()
}

#[test]
fn replicated_ranks_end_bitwise_equal_to_sharded_ranks() {
    let sharded = run_two(DistOptions::default(), false);
    let replicated = run_two(DistOptions::default(), true);
    assert_eq!(replicated[0], replicated[1], "replicated ranks differ");
    assert_eq!(replicated[0], sharded[0]);
}

#[test]
fn a_distributed_run_resumes_bit_for_bit_from_its_checkpoint() {
    resumes_bit_for_bit(false);
}

#[test]
fn a_replicated_run_resumes_bit_for_bit_from_its_checkpoint() {
    resumes_bit_for_bit(true);
}

/// Two ranks save at step 3; a fresh optimizer loads and continues to the
/// same weights. Then: other world sizes and modes load it or refuse it.
fn resumes_bit_for_bit(replicated: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("optimizer");
    let comms = in_process(2, &comm_options());
    // Per rank: the weights of the run that saved, and of the resumed run.
    type Runs = (Vec<(String, Vec<u32>)>, Vec<(String, Vec<u32>)>);
    let results: Vec<Runs> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let ckpt = ckpt.clone();
                s.spawn(move || {
                    let rank = c.rank() as i64;
                    let vs = VarStore::new(Device::Cpu);
                    let m = TwoLayer::new(&vs);
                    init_fixed(&vs);
                    let mut vs2 = VarStore::new(Device::Cpu);
                    let m2 = TwoLayer::new(&vs2);
                    let mut opt = dist_optimizer(&vs, c.clone(), replicated);
                    for step in 0..STEPS {
                        if step == 3 {
                            opt.save(&ckpt).unwrap();
                            vs2.copy(&vs).unwrap();
                        }
                        opt.backward_step(&loss(&m, batch_id(step, rank), Kind::Float))
                            .unwrap();
                    }
                    let mut opt2 = dist_optimizer(&vs2, c.clone(), replicated);
                    opt2.load(&ckpt).unwrap();
                    assert_eq!(opt2.step_count(0), Some(3));
                    for step in 3..STEPS {
                        opt2.backward_step(&loss(&m2, batch_id(step, rank), Kind::Float))
                            .unwrap();
                    }
                    (bits(&vs), bits(&vs2))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ckpt.join("manifest.json").is_file());
    for (rank, (original, resumed)) in results.iter().enumerate() {
        assert_eq!(resumed, original, "rank {rank}: the resumed run differs");
    }
    assert_eq!(results[0].0, results[1].0);

    // Any other world size and mode loads it too (blocks are read by id
    // from the files that hold them): one sharded rank, one replicated
    // rank, and a one-process optimizer all continue the same way, which a
    // fresh optimizer does not.
    let run_one = |mode: Option<bool>, load: bool| -> Vec<(String, Vec<u32>)> {
        let vs = VarStore::new(Device::Cpu);
        let m = TwoLayer::new(&vs);
        init_fixed(&vs);
        let mut opt = match mode {
            Some(replicated) => {
                let one = in_process(1, &comm_options()).pop().unwrap();
                dist_optimizer(&vs, one, replicated)
            }
            None => Shampoo::builder(&vs, shampoo_config(0.01))
                .group(1, adam_only_config(0.02))
                .threads(1)
                .build()
                .unwrap(),
        };
        if load {
            opt.load(&ckpt).unwrap();
            assert_eq!((opt.step_count(0), opt.step_count(1)), (Some(3), Some(3)));
        }
        for step in 3..STEPS {
            opt.backward_step(&loss(&m, batch_id(step, 0), Kind::Float))
                .unwrap();
        }
        bits(&vs)
    };
    let same_mode = run_one(Some(replicated), true);
    assert_eq!(run_one(Some(!replicated), true), same_mode);
    assert_eq!(run_one(None, true), same_mode);
    assert_ne!(run_one(None, false), same_mode);
}

/// A checkpoint written by two sharded ranks, loaded by one process, and
/// one process's loaded by two replicated ranks: each continues exactly as
/// the run it came from would have (CPU, full precision, bitwise).
#[test]
fn checkpoints_move_between_world_sizes_and_modes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("optimizer");
    // Two sharded ranks to step 3, saved; then to STEPS.
    let comms = in_process(2, &comm_options());
    let two: Vec<Vec<(String, Vec<u32>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let ckpt = ckpt.clone();
                s.spawn(move || {
                    let rank = c.rank() as i64;
                    let vs = VarStore::new(Device::Cpu);
                    let m = TwoLayer::new(&vs);
                    init_fixed(&vs);
                    let mut opt = dist_optimizer(&vs, c, false);
                    for step in 0..STEPS {
                        if step == 3 {
                            opt.save(&ckpt).unwrap();
                            if rank == 0 {
                                vs.save(ckpt.with_extension("weights")).unwrap();
                            }
                        }
                        opt.backward_step(&loss(&m, batch_id(step, rank), Kind::Float))
                            .unwrap();
                    }
                    bits(&vs)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Two replicated ranks resume from it: the same weights as sharded.
    let comms = in_process(2, &comm_options());
    let resumed: Vec<Vec<(String, Vec<u32>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let ckpt = ckpt.clone();
                s.spawn(move || {
                    let rank = c.rank() as i64;
                    let mut vs = VarStore::new(Device::Cpu);
                    let m = TwoLayer::new(&vs);
                    vs.load(ckpt.with_extension("weights")).unwrap();
                    let mut opt = dist_optimizer(&vs, c, true);
                    opt.load(&ckpt).unwrap();
                    for step in 3..STEPS {
                        opt.backward_step(&loss(&m, batch_id(step, rank), Kind::Float))
                            .unwrap();
                    }
                    bits(&vs)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        resumed[0], two[0],
        "replicated ranks resumed from sharded ones"
    );
    assert_eq!(resumed[1], two[0]);
}

#[test]
fn dist_options_reach_the_distributed_optimizer() {
    let f32_run = run_two(DistOptions::default(), false);
    let bf16_run = run_two(
        DistOptions {
            comm_dtype: CommDType::Bf16,
            ..DistOptions::default()
        },
        false,
    );
    // Every rank applies the same (rounded) directions...
    assert_eq!(bf16_run[0], bf16_run[1]);
    // ... which are not the f32 ones.
    assert_ne!(bf16_run[0], f32_run[0]);
}
