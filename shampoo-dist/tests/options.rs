//! Distributed options: `communicate_params`, `num_trainers_per_group` and
//! 16-bit direction communication.

mod common;

use common::*;
use shampoo_dist::{CommDType, DistOptions};

const STEPS: u64 = 6;

#[test]
fn communicate_params_equals_one_process_bitwise() {
    let (config, shapes) = (config(), shapes());
    for world in [2, 3] {
        let expected = reference(&config, &shapes, world, STEPS);
        let opts = DistOptions {
            communicate_params: true,
            ..DistOptions::default()
        };
        for (r, (p, _)) in run_in_process(&config, &shapes, world, STEPS, opts)
            .iter()
            .enumerate()
        {
            assert_bitwise(
                p,
                &expected,
                &format!("communicate_params, world {world}, rank {r}"),
            );
        }
    }
}

#[test]
fn groups_of_trainers_each_cover_all_blocks_and_equal_one_process() {
    let (config, shapes) = (config(), shapes());
    let world = 4;
    let expected = reference(&config, &shapes, world, STEPS);
    let opts = DistOptions {
        num_trainers_per_group: Some(2),
        ..DistOptions::default()
    };
    let ranks = run_in_process(&config, &shapes, world, STEPS, opts);
    // Ranks r and r + 2 hold the same blocks; ranks 0 and 1 hold all of them.
    assert_eq!(ranks[0].1, ranks[2].1);
    assert_eq!(ranks[1].1, ranks[3].1);
    let mut group: Vec<usize> = ranks[0].1.iter().chain(&ranks[1].1).copied().collect();
    group.sort_unstable();
    assert_eq!(group, (0..group.len()).collect::<Vec<_>>());
    for (r, (p, _)) in ranks.iter().enumerate() {
        assert_bitwise(p, &expected, &format!("groups of 2, rank {r}"));
    }
    // The all-gather covers the group only.
    let gather = |g: Option<usize>| {
        per_rank(
            shampoo_dist::in_process(world, &shampoo_dist::CommOptions::default()),
            |comm| {
                shampoo_dist::DistributedShampoo::new(
                    config.clone(),
                    &shapes,
                    shampoo_core::DType::F32,
                    shampoo_core::CpuBackend::new(1).unwrap(),
                    comm,
                    DistOptions {
                        num_trainers_per_group: g,
                        ..DistOptions::default()
                    },
                )
                .unwrap()
                .gather_bytes()
            },
        )[0]
    };
    let (whole, pairs) = (gather(None), gather(Some(2)));
    // Slots of 2 ranks each hold about twice a slot of 4 ranks.
    assert!(pairs < whole, "{pairs} >= {whole}");
}

#[test]
fn trainers_per_group_must_divide_the_world() {
    let (config, shapes) = (config(), shapes());
    let errs = per_rank(
        shampoo_dist::in_process(3, &shampoo_dist::CommOptions::default()),
        |comm| {
            shampoo_dist::DistributedShampoo::new(
                config.clone(),
                &shapes,
                shampoo_core::DType::F32,
                shampoo_core::CpuBackend::new(1).unwrap(),
                comm,
                DistOptions {
                    num_trainers_per_group: Some(2),
                    ..DistOptions::default()
                },
            )
            .err()
            .unwrap()
            .to_string()
        },
    );
    for e in errs {
        assert_eq!(
            e,
            "invalid argument: num_trainers_per_group = 2 does not divide the world size 3"
        );
    }
}

/// One step in 16 bits against one step in f32, from the same state: every
/// element is within the documented bound `u * |d| + 2 ulp(p)` where `d` is
/// the f32 run's update and `u` the wire type's unit roundoff.
fn one_step_bound(c: CommDType, u: f64) {
    let (config, shapes) = (config(), shapes());
    let p0 = init_params(&shapes);
    for world in [2, 3] {
        let exact = run_in_process(&config, &shapes, world, 1, DistOptions::default());
        let opts = DistOptions {
            comm_dtype: c,
            ..DistOptions::default()
        };
        let low = run_in_process(&config, &shapes, world, 1, opts);
        for r in 1..world {
            assert_bitwise(&low[r].0, &low[0].0, &format!("{c} ranks agree"));
        }
        let mut worst = 0f64;
        let mut moved = false;
        for (p, start) in p0.iter().enumerate() {
            for (i, &s) in start.iter().enumerate() {
                let (a, b) = (exact[0].0[p][i] as f64, low[0].0[p][i] as f64);
                let d = a - s as f64;
                let ulp = f32::EPSILON as f64 * a.abs().max(b.abs());
                let bound = u * d.abs() + 2.0 * ulp;
                assert!(
                    (a - b).abs() <= bound,
                    "{c}: param {p}[{i}]: {a} vs {b}, d {d}"
                );
                if d != 0.0 {
                    worst = worst.max((a - b).abs() / d.abs());
                }
                moved |= a != b;
            }
        }
        assert!(
            moved,
            "{c}: rounding changed nothing; the test would not see an error"
        );
        assert!(worst > 0.0);
    }
}

#[test]
fn bf16_directions_are_within_2_pow_minus_8_of_f32_per_step() {
    one_step_bound(CommDType::Bf16, 2f64.powi(-8));
}

#[test]
fn f16_directions_are_within_2_pow_minus_11_of_f32_per_step() {
    one_step_bound(CommDType::F16, 2f64.powi(-11));
}

#[test]
fn sixteen_bit_communication_halves_the_all_gather() {
    use shampoo_dist::{CommOptions, DistributedShampoo, in_process};
    let (config, shapes) = (config(), shapes());
    let sizes = |c: CommDType| {
        per_rank(in_process(2, &CommOptions::default()), |comm| {
            let opt = DistributedShampoo::new(
                config.clone(),
                &shapes,
                shampoo_core::DType::F32,
                shampoo_core::CpuBackend::new(1).unwrap(),
                comm,
                DistOptions {
                    comm_dtype: c,
                    ..DistOptions::default()
                },
            )
            .unwrap();
            (opt.gather_bytes(), opt.comm_bytes_per_step())
        })[0]
    };
    let (g32, total32) = sizes(CommDType::Full);
    let (g16, total16) = sizes(CommDType::Bf16);
    assert_eq!(g32, 2 * g16);
    // Received per step: the gradient all-reduce (all elements, the same in
    // both) and the other rank's slot.
    let numel: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(total32, 4 * numel + g32 / 2);
    assert_eq!(total16, 4 * numel + g16 / 2);
}

#[test]
fn f64_parameters_equal_one_process_bitwise() {
    use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo};
    use shampoo_dist::{CommOptions, DistributedShampoo, in_process, mean_in_rank_order};
    let (config, shapes) = (config(), shapes());
    let world = 3;
    let init: Vec<Vec<f64>> = init_params(&shapes)
        .iter()
        .map(|p| p.iter().map(|&x| x as f64).collect())
        .collect();
    let grad64 = |step: u64, rank: usize, p: usize| -> Option<Vec<f64>> {
        grad(&shapes, step, rank, p).map(|g| g.iter().map(|&x| x as f64 / 3.0).collect())
    };
    // One process.
    let mut opt = Shampoo::new(
        config.clone(),
        &shapes,
        DType::F64,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap();
    let mut expected = init.clone();
    for step in 1..=STEPS {
        let grads: Vec<Option<Vec<f64>>> = (0..shapes.len())
            .map(|p| {
                let per: Vec<Vec<f64>> = (0..world)
                    .map(|r| grad64(step, r, p))
                    .collect::<Option<_>>()?;
                let parts: Vec<&[f64]> = per.iter().map(Vec::as_slice).collect();
                let mut mean = vec![0f64; per[0].len()];
                mean_in_rank_order(&parts, &mut mean);
                Some(mean)
            })
            .collect();
        let mut pv: Vec<HostViewMut<'_>> =
            expected.iter_mut().map(|p| HostViewMut::F64(p)).collect();
        let gv: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_deref().map(HostView::F64))
            .collect();
        opt.step(&mut pv, &gv).unwrap();
    }
    // Three ranks, directions in full (f64) precision.
    let got = per_rank(in_process(world, &CommOptions::default()), |comm| {
        let rank = comm.rank();
        let mut opt = DistributedShampoo::new(
            config.clone(),
            &shapes,
            DType::F64,
            CpuBackend::new(1).unwrap(),
            comm,
            DistOptions::default(),
        )
        .unwrap();
        let mut params = init.clone();
        for step in 1..=STEPS {
            let mut grads: Vec<Option<Vec<f64>>> =
                (0..shapes.len()).map(|p| grad64(step, rank, p)).collect();
            let mut pv: Vec<HostViewMut<'_>> =
                params.iter_mut().map(|p| HostViewMut::F64(p)).collect();
            let mut gv: Vec<Option<HostViewMut<'_>>> = grads
                .iter_mut()
                .map(|g| g.as_deref_mut().map(HostViewMut::F64))
                .collect();
            opt.step(&mut pv, &mut gv).unwrap();
        }
        params
    });
    for (r, p) in got.iter().enumerate() {
        let bits = |v: &Vec<Vec<f64>>| -> Vec<Vec<u64>> {
            v.iter()
                .map(|x| x.iter().map(|y| y.to_bits()).collect())
                .collect()
        };
        assert!(
            bits(p) == bits(&expected),
            "f64, rank {r} differs from one process"
        );
    }
    assert_ne!(expected, init);
}
