//! The TCP host transport, with ranks as threads of the test process:
//! collectives give bitwise the in-process transport's results, the
//! optimizer equals one process, and failures name the rank at fault.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shampoo_core::strided::StridedShape;
use shampoo_core::{CpuBackend, DType};
use shampoo_dist::{CommOptions, Communicator, DistOptions, DistributedShampoo, Error, in_process};

fn data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| noise((rank * 100_003 + i) as u64) as f32 * 1e3)
        .collect()
}

/// Every collective on `comm`; the results in one byte vector.
fn exercise(comm: &dyn Communicator) -> Vec<u8> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut out = Vec::new();
    for n in [0usize, 1, 2, 7, 1000] {
        let mut x = data(rank, n);
        comm.all_reduce_mean(&mut x).unwrap();
        out.extend(x.iter().flat_map(|v| v.to_le_bytes()));
        let mut y: Vec<f64> = data(rank + 7, n).iter().map(|&v| v as f64 / 3.0).collect();
        comm.all_reduce_mean_f64(&mut y).unwrap();
        out.extend(y.iter().flat_map(|v| v.to_le_bytes()));
        let send: Vec<u8> = (0..n).map(|i| (i * 31 + rank * 7) as u8).collect();
        let mut recv = vec![0u8; n * world];
        comm.all_gather_bytes(&send, &mut recv).unwrap();
        out.extend(&recv);
        let mut b: Vec<u8> = (0..n).map(|i| (i + rank) as u8).collect();
        comm.broadcast_bytes(&mut b, world - 1).unwrap();
        out.extend(&b);
        comm.barrier().unwrap();
    }
    out
}

#[test]
fn tcp_collectives_equal_the_in_process_transport_bitwise() {
    let world = 3;
    let opts = CommOptions {
        timeout: Duration::from_secs(20),
    };
    let tcp = per_tcp_rank(world, &opts, |c, _| exercise(c.unwrap().as_ref()));
    let local = per_rank(in_process(world, &opts), |c| exercise(c.as_ref()));
    assert_eq!(tcp, local);
    for r in 1..world {
        assert_eq!(tcp[r], tcp[0], "rank {r} differs from rank 0");
    }
    // And the mean is the documented arithmetic.
    let parts: Vec<Vec<f32>> = (0..world).map(|r| data(r, 7)).collect();
    let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
    let mut mean = vec![0f32; 7];
    shampoo_dist::mean_in_rank_order(&refs, &mut mean);
    // Bytes per size n: f32 + f64 all-reduce, all-gather, broadcast.
    let off: usize = [0, 1, 2].iter().map(|n| n * (4 + 8 + world + 1)).sum();
    let got: Vec<f32> = tcp[0][off..off + 28]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, mean);
}

#[test]
fn tcp_world_of_three_equals_one_process_bitwise() {
    let config = config();
    let shapes = shapes();
    let steps = 4;
    let expected = reference(&config, &shapes, 3, steps);
    let opts = CommOptions {
        timeout: Duration::from_secs(20),
    };
    let got = per_tcp_rank(3, &opts, |c, _| {
        let mut opt = DistributedShampoo::new(
            config.clone(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            c.unwrap(),
            DistOptions::default(),
        )
        .unwrap();
        let mut params = init_params(&shapes);
        train_rank(&mut opt, &shapes, &mut params, 1..=steps).unwrap();
        params
    });
    for (r, p) in got.iter().enumerate() {
        assert_bitwise(p, &expected, &format!("tcp rank {r}"));
    }
}

#[test]
fn a_silent_rank_makes_the_others_time_out_naming_it() {
    let timeout = Duration::from_millis(1000);
    let opts = CommOptions { timeout };
    let results = per_tcp_rank(3, &opts, |c, rank| {
        let c = c.unwrap();
        let mut x = vec![1.0f32; 100];
        if rank == 2 {
            // Hang (here: stay away for longer than the timeout), then leave.
            std::thread::sleep(timeout * 4);
            return (String::new(), Duration::ZERO);
        }
        let start = Instant::now();
        let err = c.all_reduce_mean(&mut x).unwrap_err();
        (err.to_string(), start.elapsed())
    });
    for (rank, (msg, elapsed)) in results.iter().enumerate().take(2) {
        assert_eq!(
            msg,
            &format!(
                "rank {rank}: rank 2 did not answer within 1s in all_reduce #2 (collective timeout; is rank 2 hung or dead?)"
            )
        );
        assert!(*elapsed >= timeout && *elapsed < timeout * 3, "{elapsed:?}");
    }
}

#[test]
fn a_rank_that_exits_makes_the_others_fail_at_once_naming_it() {
    let opts = CommOptions {
        timeout: Duration::from_secs(30),
    };
    let results = per_tcp_rank(3, &opts, |c, rank| {
        let c = c.unwrap();
        if rank == 1 {
            drop(c); // closes its connections
            return None;
        }
        let start = Instant::now();
        let mut recv = vec![0u8; 12];
        let err = c.all_gather_bytes(&[rank as u8; 4], &mut recv).unwrap_err();
        Some((err, start.elapsed()))
    });
    for (rank, r) in results.iter().enumerate() {
        let Some((err, elapsed)) = r else { continue };
        match err {
            Error::PeerLost {
                rank: me, peer, op, ..
            } => {
                assert_eq!((*me, *peer, op.as_str()), (rank, 1, "all_gather #2"));
            }
            e => panic!("rank {rank}: expected PeerLost, got {e}"),
        }
        assert!(*elapsed < Duration::from_secs(5), "{elapsed:?}");
    }
}

#[test]
fn mismatched_shapes_are_the_same_fingerprint_error_on_every_rank() {
    let opts = CommOptions {
        timeout: Duration::from_secs(20),
    };
    let errs = per_tcp_rank(3, &opts, |c, rank| {
        let mut shapes = shapes();
        if rank == 2 {
            shapes[2] = vec![3, 5, 8];
        }
        DistributedShampoo::new(
            config(),
            &shapes,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            c.unwrap(),
            DistOptions::default(),
        )
        .err()
        .map(|e| e.to_string())
    });
    let expected = "optimizer fingerprint mismatch across ranks: rank 2 differs from rank 0: parameter 2 has shape [3, 5, 7] on rank 0 and [3, 5, 8] on rank 2";
    for (r, e) in errs.iter().enumerate() {
        assert_eq!(e.as_deref(), Some(expected), "rank {r}");
    }
}

#[test]
fn ranks_with_different_memory_layouts_are_the_same_fingerprint_error() {
    // Gradients are averaged in memory order: a channels-last parameter on
    // one rank and a row-major one on another would mix elements.
    let opts = CommOptions {
        timeout: Duration::from_secs(20),
    };
    let errs = per_tcp_rank(2, &opts, |c, rank| {
        let dims = vec![4, 3, 2, 2];
        let strides = if rank == 1 {
            vec![12, 1, 6, 3]
        } else {
            shampoo_core::strided::row_major_strides(&dims)
        };
        let given = [StridedShape { dims, strides }];
        DistributedShampoo::new(
            config(),
            &given,
            DType::F32,
            CpuBackend::new(1).unwrap(),
            c.unwrap(),
            DistOptions::default(),
        )
        .err()
        .map(|e| e.to_string())
    });
    let expected = "optimizer fingerprint mismatch across ranks: rank 1 differs from rank 0: parameter 0 is laid out row-major on rank 0 and strides [12, 1, 6, 3] on rank 1 (gradients are averaged in memory order: give every rank the same layout)";
    for (r, e) in errs.iter().enumerate() {
        assert_eq!(e.as_deref(), Some(expected), "rank {r}");
    }
}

#[test]
fn a_rank_that_never_starts_is_named_at_rendezvous() {
    let timeout = Duration::from_millis(600);
    let opts = CommOptions { timeout };
    let port = free_port();
    // Rank 1 never joins.
    let errs: Vec<Option<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = [0usize, 2]
            .iter()
            .map(|&rank| {
                let opts = &opts;
                s.spawn(move || {
                    shampoo_dist::comm::tcp::TcpCommunicator::connect(
                        rank,
                        3,
                        "127.0.0.1",
                        port,
                        opts,
                    )
                    .err()
                    .map(|e| e.to_string())
                })
            })
            .collect();
        let mut v: Vec<Option<String>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        v.insert(1, None);
        v
    });
    assert_eq!(
        errs[0].as_deref(),
        Some(
            "rank 0: rank 1 did not answer within 600ms in connection set-up (collective timeout; is rank 1 hung or dead?)"
        )
    );
    assert_eq!(
        errs[2].as_deref(),
        Some(
            "rank 2: rank 1 did not answer within 600ms in rendezvous (it never published its address) (collective timeout; is rank 1 hung or dead?)"
        )
    );
}

#[test]
fn different_collectives_on_two_ranks_are_a_mismatch_error() {
    let opts = CommOptions {
        timeout: Duration::from_secs(10),
    };
    let run = |c: std::sync::Arc<dyn Communicator>, rank: usize| {
        if rank == 0 {
            c.barrier().unwrap_err().to_string()
        } else {
            let mut recv = vec![0u8; 8];
            c.all_gather_bytes(&[1, 2, 3, 4], &mut recv)
                .unwrap_err()
                .to_string()
        }
    };
    let tcp = per_tcp_rank(2, &opts, |c, rank| run(c.unwrap(), rank));
    assert_eq!(
        tcp,
        [
            "rank 0: collective mismatch with rank 1: this rank is in barrier #2, rank 1 sent all_gather #2",
            "rank 1: collective mismatch with rank 0: this rank is in all_gather #2, rank 0 sent barrier #2",
        ]
    );
    let comms = in_process(2, &opts);
    let local = per_rank(comms, |c| {
        let rank = c.rank();
        run(c, rank)
    });
    assert_eq!(
        local,
        [
            "rank 0: collective mismatch with rank 1: this rank is in barrier #1, rank 1 in all_gather #1",
            "rank 1: collective mismatch with rank 0: this rank is in all_gather #1, rank 0 in barrier #1",
        ]
    );
}

#[test]
fn group_all_gather_moves_only_the_group_and_matches_in_process() {
    let opts = CommOptions {
        timeout: Duration::from_secs(20),
    };
    let run = |c: &dyn Communicator| {
        let rank = c.rank();
        let group = (rank / 2) * 2..(rank / 2) * 2 + 2;
        let send = [rank as u8; 3];
        let mut recv = vec![0u8; 6];
        c.all_gather_group_bytes(&send, &mut recv, group).unwrap();
        // A world collective afterwards still lines up on every rank.
        c.barrier().unwrap();
        recv
    };
    let tcp = per_tcp_rank(4, &opts, |c, _| run(c.unwrap().as_ref()));
    let local = per_rank(in_process(4, &opts), |c| run(c.as_ref()));
    let expected = vec![
        vec![0, 0, 0, 1, 1, 1],
        vec![0, 0, 0, 1, 1, 1],
        vec![2, 2, 2, 3, 3, 3],
        vec![2, 2, 2, 3, 3, 3],
    ];
    assert_eq!(tcp, expected);
    assert_eq!(local, expected);
}
