//! Channels-last (and any dense permuted) variables are read and written in
//! place through their strides: a model whose 4-d weights are channels-last
//! trains bit for bit like the same model with contiguous weights, through
//! root-inverse steps, on one process and on two sharded ranks; their
//! storage is updated in place; overlapping layouts are refused by name.

mod common;

use std::time::Duration;

use common::channels_last::{Trajectory, config, model, same_trajectories, train};
use shampoo_dist::{CommOptions, in_process};
use shampoo_tch::Shampoo;
use tch::{Device, Kind, Tensor};

#[test]
fn channels_last_weights_train_bit_for_bit_like_contiguous_ones() {
    same_trajectories(Device::Cpu);
}

// The same on a GPU: tests/cuda.rs.

#[test]
fn the_variables_storage_is_updated_in_place() {
    let (vs, m) = model(Device::Cpu, true);
    let before: Vec<(String, usize, Vec<i64>, Vec<f32>)> = {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.data_ptr() as usize, t.stride(), common::host(&t)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut opt = Shampoo::builder(&vs, config()).threads(1).build().unwrap();
    for step in 0..3 {
        opt.backward_step(&m.loss(step, Device::Cpu)).unwrap();
    }
    let vars = vs.variables();
    for (name, ptr, stride, values) in before {
        let t = &vars[&name];
        assert_eq!(t.data_ptr() as usize, ptr, "{name} moved to new storage");
        assert_eq!(t.stride(), stride, "{name} changed layout");
        assert_ne!(common::host(t), values, "{name} was not updated");
    }
}

#[test]
fn two_sharded_ranks_with_channels_last_weights_equal_one_process() {
    // Both ranks see the same batches, so their averaged gradient is each
    // rank's exactly, and the run is one process's (with the same layout,
    // so that libtorch computes the same gradients).
    let one = train(Device::Cpu, true, None);
    let comms = in_process(
        2,
        &CommOptions {
            timeout: Duration::from_secs(60),
        },
    );
    let ranks: Vec<Trajectory> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || train(Device::Cpu, true, Some(c))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, run) in ranks.iter().enumerate() {
        for (k, (a, b)) in run.iter().zip(&one).enumerate() {
            assert_eq!(a, b, "rank {r}, step {}", k + 1);
        }
    }
}

#[test]
fn an_overlapping_variable_is_refused_by_name_with_its_strides() {
    let (vs, _m) = model(Device::Cpu, false);
    tch::no_grad(|| {
        let mut c2 = vs.variables()["c2"].shallow_clone();
        // Every output channel shares the first one's memory (stride 0).
        let shared =
            Tensor::zeros([1, 4, 3, 3], (Kind::Float, Device::Cpu)).expand([6, 4, 3, 3], false);
        c2.set_data(&shared);
    });
    let err = match Shampoo::builder(&vs, config()).threads(1).build() {
        Ok(_) => panic!("an overlapping variable was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("\"c2\"") && err.contains("has strides [0, 9, 3, 1] for shape [6, 4, 3, 3]"),
        "{err}"
    );
}
