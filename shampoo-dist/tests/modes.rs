//! The preconditioners and averaging modes added after the first generation
//! (SOAP with QR, KL-Shampoo, spectral descent, Schedule-Free and GPA with
//! their evaluation view) on 1-4 in-process ranks give bitwise the
//! parameters of one process.

mod common;

use common::*;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};
use shampoo_dist::{CommOptions, DistOptions, DistributedShampoo, in_process};

const STEPS: u64 = 6;

fn cfg(body: &str) -> ShampooConfig {
    ShampooConfig::from_json(&format!(
        r#"{{"lr": 0.05, "betas": [0.9, 0.99], "epsilon": 1e-6, "weight_decay": 0.001,
            "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 2,
            "grafting": {{"type": "adam"}}, {body}}}"#
    ))
    .unwrap()
}

/// One process on the averaged gradients, then (with iterate averaging)
/// its evaluation view.
fn one_process(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    world: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let y = reference(config, shapes, world, STEPS);
    if config.iterate_averaging.is_none() {
        return (y.clone(), y);
    }
    // Replay to get at the optimizer (reference() drops it).
    let mut opt = Shampoo::new(
        config.clone(),
        shapes,
        DType::F32,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap();
    let mut params = init_params(shapes);
    for step in 1..=STEPS {
        let grads = averaged_grads(shapes, step, world);
        let mut v: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        let g: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_deref().map(HostView::F32))
            .collect();
        opt.step(&mut v, &g).unwrap();
    }
    assert_bitwise(&params, &y, "replayed reference");
    let mut v: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
    opt.eval(&mut v).unwrap();
    (y, params)
}

/// Every rank's parameters after the steps, then after `eval()`, then after
/// `train()` and one more step.
fn ranks(config: &ShampooConfig, shapes: &[Vec<usize>], world: usize) -> Vec<[Vec<Vec<f32>>; 2]> {
    per_rank(in_process(world, &CommOptions::default()), |comm| {
        let mut opt = DistributedShampoo::new(
            config.clone(),
            shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            comm,
            DistOptions::default(),
        )
        .unwrap();
        // The state a rank reports is what its checkpoint holds.
        let (tensors, _) = opt.local().state_tensors().unwrap();
        let saved: usize = tensors
            .values()
            .map(|t| match t {
                shampoo_core::checkpoint::HostTensor::F32(v, _) => 4 * v.len(),
                shampoo_core::checkpoint::HostTensor::F64(v, _) => 8 * v.len(),
                shampoo_core::checkpoint::HostTensor::U32(v, _) => 4 * v.len(),
            })
            .sum();
        assert_eq!(opt.state_bytes(), saved);
        let mut params = init_params(shapes);
        train_rank(&mut opt, shapes, &mut params, 1..=STEPS).unwrap();
        let y = params.clone();
        let mut v: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        opt.eval(&mut v).unwrap();
        assert_eq!(opt.is_train_mode(), config.iterate_averaging.is_none());
        let x = params.clone();
        let mut v: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        opt.train(&mut v).unwrap();
        train_rank(&mut opt, shapes, &mut params, STEPS + 1..=STEPS + 1).unwrap();
        [y, x]
    })
}

fn check(config: &ShampooConfig, shapes: &[Vec<usize>], what: &str) {
    for world in 1..=4 {
        let (y, x) = one_process(config, shapes, world);
        for (r, [ry, rx]) in ranks(config, shapes, world).iter().enumerate() {
            assert_bitwise(ry, &y, &format!("{what}: world {world}, rank {r}"));
            assert_bitwise(
                rx,
                &x,
                &format!("{what} (eval view): world {world}, rank {r}"),
            );
        }
    }
}

#[test]
fn soap_with_qr_on_one_to_four_ranks_equals_one_process() {
    check(
        &cfg(
            r#""preconditioner": {"type": "eigenvalue_corrected", "eigendecomposition": {"method": "qr"}}"#,
        ),
        &shapes(),
        "SOAP-QR",
    );
}

#[test]
fn kl_shampoo_on_one_to_four_ranks_equals_one_process() {
    for variant in ["root_inv", "eigendecomposed"] {
        check(
            &cfg(&format!(
                r#""preconditioner": {{"type": "kl_shampoo", "variant": "{variant}"}}"#
            )),
            &shapes(),
            variant,
        );
    }
}

#[test]
fn spectral_descent_on_one_to_four_ranks_equals_one_process() {
    // 2-D blocks only: 8x8, 8x4, 4x8, 4x4; 6x4; (2, 2, 3) -> 2x6; 5x8, 5x1.
    let shapes = vec![vec![12, 12], vec![6, 4], vec![2, 2, 3], vec![5, 9]];
    check(
        &cfg(r#""preconditioner": {"type": "spectral_descent"}"#),
        &shapes,
        "spectral (Newton-Schulz)",
    );
    check(
        &cfg(
            r#""preconditioner": {"type": "spectral_descent", "orthogonalization": {"method": "svd"}}"#,
        ),
        &shapes,
        "spectral (SVD)",
    );
}

#[test]
fn schedule_free_and_gpa_with_their_eval_view_on_one_to_four_ranks_equal_one_process() {
    check(
        &cfg(r#""iterate_averaging": {"type": "schedule_free", "train_interp_coeff": 0.9}"#),
        &shapes(),
        "Schedule-Free",
    );
    check(
        &cfg(r#""iterate_averaging": {"type": "gpa"}, "weight_decay_type": "corrected""#),
        &shapes(),
        "GPA",
    );
}
