//! The device-aware collectives on the CPU backend: the host-staged adapter
//! (download, host collective, upload) gives bitwise what the direct host
//! transport gives, collective by collective and through whole distributed
//! runs; gradient presence is counted exactly, and a collective that reads
//! the counts back late (as NCCL's does) refuses a bad step one step later,
//! naming it.

mod common;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use common::*;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut};
use shampoo_dist::{
    Collective, CollectiveKind, CommDType, CommOptions, Communicator, DistOptions,
    DistributedShampoo, FlagCounter, HostCollective, HostStaged, in_process,
};

fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| noise((rank * 1000 + i) as u64) as f32 * 3.0)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every collective of `c` on CPU memory, world and groups of two.
fn exercise(c: &dyn Collective<CpuBackend>) -> Vec<Vec<u32>> {
    let be = CpuBackend::new(1).unwrap();
    let (rank, world) = (c.rank(), c.world_size());
    let mut out = Vec::new();
    let mut buf = values(rank, 37);
    c.all_reduce_mean(&be, HostViewMut::F32(&mut buf)).unwrap();
    out.push(bits(&buf));
    let group: Range<usize> = (rank / 2 * 2)..(rank / 2 * 2 + 2).min(world);
    let mut buf = values(rank, 23);
    c.all_reduce_mean_group(&be, HostViewMut::F32(&mut buf), group.clone())
        .unwrap();
    out.push(bits(&buf));
    let send = values(rank, 11);
    let mut recv = vec![0f32; 11 * world];
    c.all_gather(&be, HostView::F32(&send), HostViewMut::F32(&mut recv))
        .unwrap();
    out.push(bits(&recv));
    let mut recv = vec![0f32; 11 * group.len()];
    c.all_gather_group(
        &be,
        HostView::F32(&send),
        HostViewMut::F32(&mut recv),
        group,
    )
    .unwrap();
    out.push(bits(&recv));
    let mut counter = c.flag_counter(&be, 3).unwrap();
    counter.start(&[1, u8::from(rank % 2 == 0), 0]).unwrap();
    let sums = counter
        .finish(false)
        .unwrap()
        .expect("host counts are ready");
    out.push(sums);
    out
}

#[test]
fn host_staged_collectives_equal_the_direct_transport_bitwise() {
    let world = 4;
    let direct = per_rank(in_process(world, &CommOptions::default()), |c| {
        let c = HostCollective::new(c);
        assert_eq!(Collective::<CpuBackend>::kind(&c), CollectiveKind::Host);
        exercise(&c)
    });
    let staged = per_rank(in_process(world, &CommOptions::default()), |c| {
        let c = HostStaged::new(c);
        assert_eq!(
            Collective::<CpuBackend>::kind(&c),
            CollectiveKind::HostStaged
        );
        exercise(&c)
    });
    assert_eq!(direct, staged);
    // The group mean is the rank-order mean of the group's members.
    let mut want = vec![0f32; 23];
    let parts = [values(2, 23), values(3, 23)];
    shampoo_dist::mean_in_rank_order(&[&parts[0], &parts[1]], &mut want);
    assert_eq!(direct[3][1], bits(&want));
    assert_eq!(direct[2][1], bits(&want));
    // Flags: rank r sets [1, r even, 0].
    for r in &direct {
        assert_eq!(r[4], vec![4, 2, 0]);
    }
}

/// A `world`-rank in-process run with the collective `make` builds.
fn run_with(
    world: usize,
    opts: DistOptions,
    make: impl Fn(Arc<dyn Communicator>) -> Arc<dyn Collective<CpuBackend>> + Sync,
) -> Vec<Vec<Vec<f32>>> {
    let (config, shapes) = (config(), shapes());
    per_rank(in_process(world, &CommOptions::default()), |comm| {
        let mut opt = DistributedShampoo::new(
            config.clone(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            make(comm),
            opts.clone(),
        )
        .unwrap();
        let mut params = init_params(&shapes);
        train_rank(&mut opt, &shapes, &mut params, 1..=5).unwrap();
        params
    })
}

#[test]
fn host_staged_runs_equal_direct_runs_bitwise() {
    let cases = [
        DistOptions::default(),
        DistOptions {
            comm_dtype: CommDType::Bf16,
            ..DistOptions::default()
        },
        DistOptions {
            communicate_params: true,
            ..DistOptions::default()
        },
        DistOptions::replicated(),
    ];
    for world in [1, 3] {
        for opts in &cases {
            let direct = run_with(world, opts.clone(), |c| Arc::new(HostCollective::new(c)));
            let staged = run_with(world, opts.clone(), |c| Arc::new(HostStaged::new(c)));
            for (r, (d, s)) in direct.iter().zip(&staged).enumerate() {
                assert_bitwise(s, d, &format!("world {world}, {opts:?}, rank {r}"));
            }
        }
    }
    // Full precision through the adapter is still one process, bitwise.
    let (config, shapes) = (config(), shapes());
    let staged = run_with(3, DistOptions::default(), |c| Arc::new(HostStaged::new(c)));
    assert_bitwise(&staged[2], &reference(&config, &shapes, 3, 5), "rank 2");
}

/// A host collective whose flag counts arrive one `finish` late, as a
/// device collective's do when the GPU has not caught up: `finish(false)`
/// says "not yet", `finish(true)` waits.
struct Late(HostCollective, Arc<Mutex<Vec<bool>>>);

struct LateCounter(Box<dyn FlagCounter>, Arc<Mutex<Vec<bool>>>);

impl FlagCounter for LateCounter {
    fn start(&mut self, flags: &[u8]) -> shampoo_dist::Result<()> {
        self.0.start(flags)
    }
    fn finish(&mut self, wait: bool) -> shampoo_dist::Result<Option<Vec<u32>>> {
        self.1.lock().unwrap().push(wait);
        if wait { self.0.finish(true) } else { Ok(None) }
    }
}

impl Collective<CpuBackend> for Late {
    fn rank(&self) -> usize {
        Collective::<CpuBackend>::rank(&self.0)
    }
    fn world_size(&self) -> usize {
        Collective::<CpuBackend>::world_size(&self.0)
    }
    fn host(&self) -> &Arc<dyn Communicator> {
        Collective::<CpuBackend>::host(&self.0)
    }
    fn kind(&self) -> CollectiveKind {
        CollectiveKind::Nccl
    }
    fn all_reduce_mean_group(
        &self,
        be: &CpuBackend,
        buf: HostViewMut<'_>,
        group: Range<usize>,
    ) -> shampoo_dist::Result<()> {
        self.0.all_reduce_mean_group(be, buf, group)
    }
    fn all_gather_group(
        &self,
        be: &CpuBackend,
        send: HostView<'_>,
        recv: HostViewMut<'_>,
        group: Range<usize>,
    ) -> shampoo_dist::Result<()> {
        self.0.all_gather_group(be, send, recv, group)
    }
    fn flag_counter(
        &self,
        be: &CpuBackend,
        len: usize,
    ) -> shampoo_dist::Result<Box<dyn FlagCounter>> {
        Ok(Box::new(LateCounter(
            self.0.flag_counter(be, len)?,
            self.1.clone(),
        )))
    }
    fn wait_idle(&self, be: &CpuBackend) -> shampoo_dist::Result<()> {
        self.0.wait_idle(be)
    }
}

/// Steps a 2-rank world where rank 1 has no gradient for parameter 0 at
/// step `bad`; returns each rank's outcome of steps 1..=steps and of the
/// end (a flush, or a save into `save`), and the `wait` of each of its
/// counter's `finish` calls.
fn late_run(bad: u64, steps: u64, save: Option<&std::path::Path>) -> Vec<(Vec<String>, Vec<bool>)> {
    let (config, shapes) = (config(), shapes());
    per_rank(in_process(2, &CommOptions::default()), |comm| {
        let rank = comm.rank();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut opt = DistributedShampoo::new(
            config.clone(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            Arc::new(Late(HostCollective::new(comm), log.clone()))
                as Arc<dyn Collective<CpuBackend>>,
            DistOptions::default(),
        )
        .unwrap();
        let mut params = init_params(&shapes);
        let mut outcomes = Vec::new();
        for step in 1..=steps {
            let mut grads: Vec<Option<Vec<f32>>> = (0..shapes.len())
                .map(|p| grad(&shapes, step, rank, p))
                .collect();
            if rank == 1 && step == bad {
                grads[0] = None;
            }
            let mut views: Vec<HostViewMut<'_>> =
                params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
            let mut gviews: Vec<Option<HostViewMut<'_>>> = grads
                .iter_mut()
                .map(|g| g.as_deref_mut().map(HostViewMut::F32))
                .collect();
            outcomes.push(match opt.step(&mut views, &mut gviews) {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            });
        }
        let end = match save {
            Some(dir) => opt.save(dir),
            None => opt.flush(),
        };
        outcomes.push(end.map_or_else(|e| e.to_string(), |()| "ok".into()));
        let waits = log.lock().unwrap().clone();
        (outcomes, waits)
    })
}

#[test]
fn counts_read_back_late_refuse_the_step_one_step_later_naming_it() {
    let msg = "parameter 0 has a gradient on 1 of 2 ranks at step 2; pass a gradient for it on every rank or on none";
    // The bad step 2 goes through; step 3 reports it, on both ranks.
    for (outcomes, waits) in late_run(2, 4, None) {
        assert_eq!(outcomes, vec!["ok", "ok", msg, "ok", "ok"]);
        // A step asks for its own counts without waiting (`false`) and
        // waits (`true`) only for the previous step's, which the GPU has
        // long finished by then: step 1 [false], step 2 [true, false], step 3
        // [true: the error], step 4 [false], the flush [true].
        assert_eq!(waits, vec![false, true, false, true, false, true]);
    }
}

#[test]
fn a_bad_last_step_is_reported_by_flush_and_by_save() {
    let msg = "parameter 0 has a gradient on 1 of 2 ranks at step 3; pass a gradient for it on every rank or on none";
    for (outcomes, _) in late_run(3, 3, None) {
        assert_eq!(outcomes, vec!["ok", "ok", "ok", msg]);
    }
    let dir = tempfile::tempdir().unwrap();
    for (outcomes, _) in late_run(3, 3, Some(dir.path())) {
        assert_eq!(outcomes, vec!["ok", "ok", "ok", msg]);
    }
    assert!(
        !dir.path().join(shampoo_dist::MANIFEST).exists(),
        "no checkpoint of a refused step"
    );
}

#[test]
fn flags_are_counted_exactly_in_worlds_where_a_float_average_is_not_one() {
    // NCCL's average scales each input by 1/n and sums: in f32, n flags of
    // 1 do not come back as exactly 1 for some world sizes (here 10).
    let nccl_avg = |n: usize| (0..n).fold(0f32, |s, _| s + 1.0 * (1.0 / n as f32));
    assert_ne!(nccl_avg(10), 1.0);
    // Counted as integers, a world of 10 with every gradient present is
    // fine, and one rank without one is named exactly.
    let (config, shapes) = (config(), shapes());
    let out = per_rank(in_process(10, &CommOptions::default()), |comm| {
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
        train_rank(&mut opt, &shapes, &mut params, 1..=1).unwrap();
        let mut grads: Vec<Option<Vec<f32>>> = (0..shapes.len())
            .map(|p| grad(&shapes, 2, rank, p))
            .collect();
        if rank == 7 {
            grads[2] = None;
        }
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        let mut gviews: Vec<Option<HostViewMut<'_>>> = grads
            .iter_mut()
            .map(|g| g.as_deref_mut().map(HostViewMut::F32))
            .collect();
        opt.step(&mut views, &mut gviews).unwrap_err().to_string()
    });
    for e in out {
        assert_eq!(
            e,
            "parameter 2 has a gradient on 9 of 10 ranks at step 2; pass a gradient for it on every rank or on none"
        );
    }
}
