//! Distributed checkpoints: per-rank files plus a manifest; resuming with the
//! same or another world size continues bitwise like an uninterrupted run.

mod common;

use std::path::Path;

use common::*;
use shampoo_core::{CpuBackend, DType};
use shampoo_dist::{CommOptions, DistOptions, DistributedShampoo, MANIFEST, Manifest, in_process};

/// `world` ranks: load from `load` (if any), train `steps`, save to `save`
/// (if any); every rank's parameters.
fn segment(
    world: usize,
    params: &[Vec<f32>],
    steps: std::ops::RangeInclusive<u64>,
    load: Option<&Path>,
    save: Option<&Path>,
) -> Vec<Vec<Vec<f32>>> {
    let shapes = shapes();
    per_rank(in_process(world, &CommOptions::default()), |comm| {
        let mut opt = DistributedShampoo::new(
            config(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            comm,
            DistOptions::default(),
        )
        .unwrap();
        if let Some(dir) = load {
            opt.load(dir).unwrap();
        }
        let mut p = params.to_vec();
        train_rank(&mut opt, &shapes, &mut p, steps.clone()).unwrap();
        if let Some(dir) = save {
            opt.save(dir).unwrap();
        }
        p
    })
}

#[test]
fn resume_with_the_same_world_size_is_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let first = segment(2, &init_params(&shapes()), 1..=3, None, Some(dir.path()));
    let m = Manifest::read(dir.path()).unwrap();
    assert_eq!((m.world_size, m.step, m.files.len()), (2, 3, 2));
    let resumed = segment(2, &first[0], 4..=6, Some(dir.path()), None);
    let expected = reference(&config(), &shapes(), 2, 6);
    for (r, p) in resumed.iter().enumerate() {
        assert_bitwise(p, &expected, &format!("resumed rank {r}"));
    }
}

#[test]
fn resume_on_three_ranks_from_two_reshards_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let first = segment(2, &init_params(&shapes()), 1..=3, None, Some(dir.path()));
    let resumed = segment(3, &first[0], 4..=6, Some(dir.path()), None);
    // Steps 1-3 average two ranks' gradients, steps 4-6 three ranks'.
    let expected = reference_worlds(&config(), &shapes(), &[2, 2, 2, 3, 3, 3]);
    for (r, p) in resumed.iter().enumerate() {
        assert_bitwise(p, &expected, &format!("re-sharded rank {r}"));
    }
}

#[test]
fn a_missing_rank_file_fails_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    segment(2, &init_params(&shapes()), 1..=2, None, Some(dir.path()));
    std::fs::remove_file(dir.path().join("rank-00001.safetensors")).unwrap();
    assert!(dir.path().join(MANIFEST).exists());
    let shapes = shapes();
    let errs = per_rank(in_process(2, &CommOptions::default()), |comm| {
        let mut opt = DistributedShampoo::new(
            config(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            comm,
            DistOptions::default(),
        )
        .unwrap();
        opt.load(dir.path()).unwrap_err().to_string()
    });
    let missing = dir.path().join("rank-00001.safetensors");
    // Every rank opens every listed file, so each reports the missing one.
    for e in &errs {
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }
}
