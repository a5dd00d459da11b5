//! Parameters stored in another order than row-major (channels-last
//! convolution weights, column-major matrices): the optimizer reads and
//! writes them in place through their strides, and every result is the
//! contiguous tensor's, bit for bit.

mod common;
use common::*;
use shampoo_core::strided::{Strided, StridedShape};
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo};

/// Channels-last strides of `(o, i, h, w)`.
fn channels_last(s: &[usize]) -> Vec<usize> {
    let (i, h, w) = (s[1], s[2], s[3]);
    vec![i * h * w, 1, w * i, i]
}

/// `x` (logical order) stored as `memory` lays it out.
fn store(x: &[f64], memory: &Option<Strided>) -> Vec<f64> {
    match memory {
        None => x.to_vec(),
        Some(m) => {
            let mut out = vec![f64::NAN; x.len()];
            for (l, &v) in x.iter().enumerate() {
                out[m.offset(l)] = v;
            }
            out
        }
    }
}

/// The logical order of `x`, stored as `memory` lays it out.
fn load(x: &[f64], memory: &Option<Strided>) -> Vec<f64> {
    match memory {
        None => x.to_vec(),
        Some(m) => (0..x.len()).map(|l| x[m.offset(l)]).collect(),
    }
}

fn bits(x: &[Vec<f64>]) -> Vec<Vec<u64>> {
    x.iter()
        .map(|v| v.iter().map(|f| f.to_bits()).collect())
        .collect()
}

/// Runs `steps` steps on parameters of `shapes`, stored with `strides`
/// (`None`: row-major), and returns them in logical order after every step.
fn run(
    cfg: &str,
    shapes: &[Vec<usize>],
    strides: &[Option<Vec<usize>>],
    init: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
) -> Vec<Vec<Vec<f64>>> {
    let given: Vec<StridedShape> = shapes
        .iter()
        .zip(strides)
        .map(|(s, st)| StridedShape {
            dims: s.clone(),
            strides: st
                .clone()
                .unwrap_or_else(|| shampoo_core::strided::row_major_strides(s)),
        })
        .collect();
    let memory: Vec<Option<Strided>> = given
        .iter()
        .map(|g| Strided::new("p", &g.dims, &g.strides).unwrap())
        .collect();
    let mut opt =
        Shampoo::new(config(cfg), &given, DType::F64, CpuBackend::new(2).unwrap()).unwrap();
    let mut params: Vec<Vec<f64>> = init.iter().zip(&memory).map(|(p, m)| store(p, m)).collect();
    let mut trajectory = Vec::new();
    for g in grads {
        let gs: Vec<Vec<f64>> = g.iter().zip(&memory).map(|(g, m)| store(g, m)).collect();
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F64(p)).collect();
        let gv: Vec<Option<HostView<'_>>> = gs.iter().map(|g| Some(HostView::F64(g))).collect();
        opt.step(&mut views, &gv).unwrap();
        trajectory.push(
            params
                .iter()
                .zip(&memory)
                .map(|(p, m)| load(p, m))
                .collect(),
        );
    }
    trajectory
}

#[test]
fn strided_parameters_train_bit_for_bit_like_contiguous_ones() {
    // Merged as (6, 4, 4) (out x in not nested in memory), (6, 4, 9) (the
    // window nested), a column-major matrix split into blocks, a vector.
    let shapes = vec![vec![2, 3, 4, 4], vec![6, 4, 3, 3], vec![6, 10], vec![7]];
    let strides = vec![
        Some(channels_last(&shapes[0])),
        Some(channels_last(&shapes[1])),
        Some(vec![1, 6]),
        None,
    ];
    let init = gradients(40, &shapes, 1).remove(0);
    let grads = gradients(41, &shapes, 9);
    // Root inverses at steps 1, 4, 7; weight decay reads the parameters
    // through the gather, momentum and grafting run on the blocks.
    for cfg in [
        r#"{"lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1e-8, "max_preconditioner_dim": 8,
            "precondition_frequency": 3, "weight_decay": 0.01, "momentum": {"momentum": 0.5},
            "grafting": {"type": "adam"}}"#,
        r#"{"lr": 0.01, "max_preconditioner_dim": 12, "precondition_frequency": 2,
            "weight_decay": 0.1, "weight_decay_type": "l2",
            "preconditioner": {"type": "eigenvalue_corrected"}}"#,
    ] {
        let contiguous = run(cfg, &shapes, &vec![None; 4], &init, &grads);
        let strided = run(cfg, &shapes, &strides, &init, &grads);
        for (k, (a, b)) in strided.iter().zip(&contiguous).enumerate() {
            assert_eq!(bits(a), bits(b), "step {} of {cfg}", k + 1);
        }
        assert_ne!(contiguous[8], init, "the parameters moved");
    }
}

#[test]
fn an_overlapping_layout_is_refused_when_the_optimizer_is_built() {
    let given = [StridedShape {
        dims: vec![4, 3],
        strides: vec![1, 1],
    }];
    let err = match Shampoo::new(
        config("{}"),
        &given,
        DType::F64,
        CpuBackend::new(1).unwrap(),
    ) {
        Ok(_) => panic!("an overlapping layout was accepted"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        "shape mismatch: parameter 0: strides [1, 1] of shape [4, 3] are not a dense permutation of the dimensions (elements overlap); make it contiguous or channels-last first"
    );
}
