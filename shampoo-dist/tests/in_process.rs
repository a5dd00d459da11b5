//! In-process worlds of 1-4 ranks give bitwise the parameters of one
//! process, whatever the block assignment.

mod common;

use common::*;
use shampoo_dist::DistOptions;

const STEPS: u64 = 6;

#[test]
fn one_to_four_ranks_equal_one_process_bitwise() {
    let config = config();
    let shapes = shapes();
    for world in 1..=4 {
        let expected = reference(&config, &shapes, world, STEPS);
        let ranks = run_in_process(&config, &shapes, world, STEPS, DistOptions::default());
        let mut all_owned: Vec<usize> = ranks.iter().flat_map(|(_, o)| o.clone()).collect();
        all_owned.sort_unstable();
        let blocks = all_owned.len();
        assert_eq!(
            all_owned,
            (0..blocks).collect::<Vec<_>>(),
            "each block has one owner"
        );
        for (r, (params, _)) in ranks.iter().enumerate() {
            assert_bitwise(params, &expected, &format!("world {world}, rank {r}"));
        }
        // Parameters with gradients moved; the one without is untouched.
        assert_ne!(ranks[0].0[0], init_params(&shapes)[0]);
        assert_bitwise(
            &[ranks[0].0[NO_GRAD].clone()],
            &[init_params(&shapes)[NO_GRAD].clone()],
            "parameter without gradient",
        );
    }
}

#[test]
fn ranks_without_blocks_still_join() {
    let config = config();
    // Two blocks: with 3 and 4 ranks, some own nothing.
    let shapes = vec![vec![8, 8], vec![5]];
    for world in [3, 4] {
        let expected = reference(&config, &shapes, world, STEPS);
        let ranks = run_in_process(&config, &shapes, world, STEPS, DistOptions::default());
        assert!(ranks.iter().any(|(_, owned)| owned.is_empty()));
        for (r, (params, _)) in ranks.iter().enumerate() {
            assert_bitwise(params, &expected, &format!("world {world}, rank {r}"));
        }
    }
}

#[test]
fn state_bytes_is_the_checkpointed_state_and_ranks_split_it() {
    use shampoo_core::checkpoint::HostTensor;
    use shampoo_core::{CpuBackend, DType};
    use shampoo_dist::{CommOptions, DistributedShampoo, in_process};
    let (config, shapes) = (config(), shapes());
    let tensor_bytes = |t: &HostTensor| match t {
        HostTensor::F32(v, _) => 4 * v.len(),
        HostTensor::F64(v, _) => 8 * v.len(),
        HostTensor::U32(v, _) => 4 * v.len(),
    };
    let mut totals = Vec::new();
    for world in [1, 3] {
        let per = per_rank(in_process(world, &CommOptions::default()), |comm| {
            let opt = DistributedShampoo::new(
                config.clone(),
                &shapes,
                DType::F32,
                CpuBackend::new(1).unwrap(),
                comm,
                DistOptions::default(),
            )
            .unwrap();
            let (tensors, _) = opt.local().state_tensors().unwrap();
            let saved: usize = tensors.values().map(tensor_bytes).sum();
            assert_eq!(opt.state_bytes(), saved);
            saved
        });
        assert!(per.iter().all(|&b| b > 0));
        totals.push(per.iter().sum::<usize>());
    }
    assert_eq!(
        totals[0], totals[1],
        "3 ranks together hold one copy of the state"
    );
}

#[test]
fn a_gradient_on_some_ranks_only_is_the_same_error_everywhere() {
    use shampoo_core::{CpuBackend, DType, HostViewMut};
    use shampoo_dist::{CommOptions, DistributedShampoo, in_process};
    let (config, shapes) = (config(), shapes());
    let errs = per_rank(in_process(3, &CommOptions::default()), |comm| {
        let rank = comm.rank();
        let mut opt = DistributedShampoo::new(
            config.clone(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            comm,
            DistOptions::default(),
        )
        .unwrap();
        let mut params = init_params(&shapes);
        let mut grads: Vec<Option<Vec<f32>>> = (0..shapes.len())
            .map(|p| grad(&shapes, 1, rank, p))
            .collect();
        if rank == 1 {
            grads[0] = None;
        }
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        let mut gviews: Vec<Option<HostViewMut<'_>>> = grads
            .iter_mut()
            .map(|g| g.as_deref_mut().map(HostViewMut::F32))
            .collect();
        opt.step(&mut views, &mut gviews).unwrap_err().to_string()
    });
    for e in errs {
        assert_eq!(
            e,
            "parameter 0 has a gradient on 2 of 3 ranks at step 1; pass a gradient for it on every rank or on none"
        );
    }
}
