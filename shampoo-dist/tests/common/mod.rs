//! Shared by the integration tests: a synthetic problem, a single-process
//! reference and runners for in-process worlds.

#![allow(dead_code)] // each test file uses a different subset

use std::sync::Arc;

use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};
use shampoo_dist::{
    CommOptions, Communicator, DistOptions, DistributedShampoo, in_process, mean_in_rank_order,
};

/// Root inverses at steps 2, 4, 6; adam grafting, momentum, decoupled decay.
pub const CONFIG: &str = r#"{"lr": 0.05, "betas": [0.9, 0.99], "epsilon": 1e-6,
    "weight_decay": 0.001, "max_preconditioner_dim": 8, "precondition_frequency": 2,
    "start_preconditioning_step": 2,
    "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8},
    "momentum": {"momentum": 0.5, "dampening": 0.0, "nesterov": true}}"#;

pub fn config() -> ShampooConfig {
    ShampooConfig::from_json(CONFIG).unwrap()
}

/// Blocks of several shapes: 8x8, 8x4, 4x8, 4x4 (from [12,12]), 10 -> 8,2,
/// [3,5,7] merges to [15,7] -> 8x7, 7x7; and a scalar.
pub fn shapes() -> Vec<Vec<usize>> {
    vec![vec![12, 12], vec![10], vec![3, 5, 7], vec![6, 4], vec![1]]
}

/// Parameter 3 never has a gradient.
pub const NO_GRAD: usize = 3;

/// A deterministic pseudo-random value in [-1, 1).
pub fn noise(seed: u64) -> f64 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

pub fn init_params(shapes: &[Vec<usize>]) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(p, s)| {
            (0..s.iter().product::<usize>())
                .map(|i| noise(1_000_000 + 1000 * p as u64 + i as u64) as f32)
                .collect()
        })
        .collect()
}

/// Rank `rank`'s gradient of parameter `p` at step `step` (None for NO_GRAD).
pub fn grad(shapes: &[Vec<usize>], step: u64, rank: usize, p: usize) -> Option<Vec<f32>> {
    if p == NO_GRAD && shapes.len() > NO_GRAD {
        return None;
    }
    let n: usize = shapes[p].iter().product();
    Some(
        (0..n)
            .map(|i| {
                (noise(step * 7_919 + rank as u64 * 104_729 + p as u64 * 1_299_709 + i as u64)
                    * (1.0 + p as f64)) as f32
            })
            .collect(),
    )
}

/// One process: the ranks' gradients averaged with the transports'
/// arithmetic, then the core optimizer.
pub fn reference(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    world: usize,
    steps: u64,
) -> Vec<Vec<f32>> {
    reference_worlds(config, shapes, &vec![world; steps as usize])
}

/// [`reference`] with the world size of every step (`worlds[step - 1]`).
pub fn reference_worlds(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    worlds: &[usize],
) -> Vec<Vec<f32>> {
    let steps = worlds.len() as u64;
    let mut opt = Shampoo::new(
        config.clone(),
        shapes,
        DType::F32,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap();
    let mut params = init_params(shapes);
    for step in 1..=steps {
        let world = worlds[step as usize - 1];
        let grads = averaged_grads(shapes, step, world);
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        let gviews: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_deref().map(HostView::F32))
            .collect();
        opt.step(&mut views, &gviews).unwrap();
    }
    params
}

/// The gradients of step `step` averaged over `world` ranks with the
/// transports' arithmetic.
pub fn averaged_grads(shapes: &[Vec<usize>], step: u64, world: usize) -> Vec<Option<Vec<f32>>> {
    (0..shapes.len())
        .map(|p| {
            let per_rank: Vec<Vec<f32>> = (0..world)
                .map(|r| grad(shapes, step, r, p))
                .collect::<Option<_>>()?;
            let parts: Vec<&[f32]> = per_rank.iter().map(Vec::as_slice).collect();
            let mut mean = vec![0f32; per_rank[0].len()];
            mean_in_rank_order(&parts, &mut mean);
            Some(mean)
        })
        .collect()
}

/// One rank's training loop; returns its parameters.
pub fn train_rank(
    opt: &mut DistributedShampoo,
    shapes: &[Vec<usize>],
    params: &mut [Vec<f32>],
    steps: std::ops::RangeInclusive<u64>,
) -> shampoo_dist::Result<()> {
    let rank = opt.rank();
    for step in steps {
        let mut grads: Vec<Option<Vec<f32>>> = (0..shapes.len())
            .map(|p| grad(shapes, step, rank, p))
            .collect();
        let mut views: Vec<HostViewMut<'_>> =
            params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        let mut gviews: Vec<Option<HostViewMut<'_>>> = grads
            .iter_mut()
            .map(|g| g.as_deref_mut().map(HostViewMut::F32))
            .collect();
        opt.step(&mut views, &mut gviews)?;
    }
    Ok(())
}

/// Runs `f(rank, comm)` on one thread per rank and collects the results.
pub fn per_rank<T: Send>(
    comms: Vec<Arc<dyn Communicator>>,
    f: impl Fn(Arc<dyn Communicator>) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A `world`-rank in-process run of `steps` steps; every rank's parameters
/// and owned blocks.
pub fn run_in_process(
    config: &ShampooConfig,
    shapes: &[Vec<usize>],
    world: usize,
    steps: u64,
    opts: DistOptions,
) -> Vec<(Vec<Vec<f32>>, Vec<usize>)> {
    per_rank(in_process(world, &CommOptions::default()), |comm| {
        let mut opt = DistributedShampoo::new(
            config.clone(),
            shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            comm,
            opts.clone(),
        )
        .unwrap();
        let mut params = init_params(shapes);
        train_rank(&mut opt, shapes, &mut params, 1..=steps).unwrap();
        (params, opt.owned_blocks().to_vec())
    })
}

/// Bitwise comparison with a readable failure.
pub fn assert_bitwise(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (p, (x, y)) in a.iter().zip(b).enumerate() {
        let xb: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
        let yb: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
        if xb != yb {
            let i = xb.iter().zip(&yb).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: parameter {p} differs first at element {i}: {} vs {}",
                x[i], y[i]
            );
        }
    }
}

/// A free TCP port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `world` TCP communicators, one per thread, passed to `f`.
pub fn per_tcp_rank<T: Send>(
    world: usize,
    opts: &CommOptions,
    f: impl Fn(shampoo_dist::Result<Arc<dyn Communicator>>, usize) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let c = shampoo_dist::comm::tcp::TcpCommunicator::connect(
                        rank,
                        world,
                        "127.0.0.1",
                        port,
                        opts,
                    )
                    .map(|c| Arc::new(c) as Arc<dyn Communicator>);
                    f(c, rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
