//! Root-inverse telemetry: failures, float64 retries and kept previous
//! roots are counted per block and factor where the failure rules apply.

mod common;
use common::*;
use shampoo_core::{
    BlockRootInverseStats, DType, HostView, HostViewMut, RootInverseCounters, Shampoo,
};

fn step(opt: &mut Shampoo<Flaky>, p: &mut [Vec<f64>], g: &[Vec<f64>]) {
    let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F64(x)).collect();
    let grads: Vec<Option<HostView<'_>>> = g.iter().map(|x| Some(HostView::F64(x))).collect();
    opt.step(&mut views, &grads).unwrap();
}

#[test]
fn root_inverse_failures_retries_and_kept_roots_are_counted_per_block() {
    // A 6x4 matrix (one block, factors of 6 and 4) and a vector of 3.
    let shapes = vec![vec![6, 4], vec![3]];
    let cfg = config(
        r#"{"lr": 0.1, "betas": [0.0, 0.999], "epsilon": 1e-6, "max_preconditioner_dim": 6}"#,
    );
    let mut opt = Shampoo::new(cfg, &shapes, DType::F64, Flaky::new(Outcome::Solve)).unwrap();
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.5; numel(s)]).collect();
    let g = gradients(7, &shapes, 1).remove(0);
    step(&mut opt, &mut p, &g);
    assert!(opt.root_inverse_stats().is_empty());
    assert_eq!(opt.root_inverse_totals(), RootInverseCounters::default());

    // Two failing root inverses: every factor keeps its previous root.
    opt.backend().set(Outcome::Fail);
    step(&mut opt, &mut p, &g);
    step(&mut opt, &mut p, &g);
    // One that needs the float64 retry everywhere.
    opt.backend().set(Outcome::Retry);
    step(&mut opt, &mut p, &g);

    let counts = RootInverseCounters {
        failures: 2,
        f64_retries: 1,
        kept_previous: 2,
    };
    let stats = opt.root_inverse_stats();
    let expected = vec![
        BlockRootInverseStats {
            block: 0,
            param: 0,
            shape: vec![6, 4],
            dim: 0,
            counters: counts,
        },
        BlockRootInverseStats {
            block: 0,
            param: 0,
            shape: vec![6, 4],
            dim: 1,
            counters: counts,
        },
        BlockRootInverseStats {
            block: 1,
            param: 1,
            shape: vec![3],
            dim: 0,
            counters: counts,
        },
    ];
    assert_eq!(stats, expected);
    assert_eq!(
        opt.root_inverse_totals(),
        RootInverseCounters {
            failures: 6,
            f64_retries: 3,
            kept_previous: 6,
        }
    );

    // The fatal failure (the fourth in a row) is counted, but keeps nothing.
    opt.backend().set(Outcome::Fail);
    for _ in 0..3 {
        step(&mut opt, &mut p, &g);
    }
    let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F64(x)).collect();
    let grads: Vec<Option<HostView<'_>>> = g.iter().map(|x| Some(HostView::F64(x))).collect();
    assert!(opt.step(&mut views, &grads).is_err());
    let first = &opt.root_inverse_stats()[0];
    assert_eq!(
        first.counters,
        RootInverseCounters {
            failures: 6,
            f64_retries: 1,
            kept_previous: 5,
        }
    );
}
