//! The in-process transport: ranks are threads sharing one exchange table.
//!
//! Every collective is one exchange: each rank deposits its contribution
//! (tagged with the collective's name and sequence number), the last rank to
//! arrive publishes all contributions, and every rank computes its result
//! from them with the same arithmetic as the other transports.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::{CommOptions, Communicator, ReduceElem, check_gather, check_root, reduce_chunks};
use crate::{Error, Result};

/// One rank's contribution to an exchange.
struct Deposit {
    op: &'static str,
    seq: u64,
    data: Vec<u8>,
}

struct Table {
    /// Completed exchanges so far.
    generation: u64,
    pending: Vec<Option<Deposit>>,
    result: Arc<Vec<Deposit>>,
}

struct Shared {
    world: usize,
    table: Mutex<Table>,
    done: Condvar,
}

/// One rank of an in-process world.
struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    opts: CommOptions,
    seq: Mutex<u64>,
}

/// In-process transport for tests: `world` communicators connected by
/// shared memory, one per thread.
pub fn in_process(world: usize, opts: &CommOptions) -> Vec<Arc<dyn Communicator>> {
    let shared = Arc::new(Shared {
        world,
        table: Mutex::new(Table {
            generation: 0,
            pending: (0..world).map(|_| None).collect(),
            result: Arc::new(Vec::new()),
        }),
        done: Condvar::new(),
    });
    (0..world)
        .map(|rank| {
            Arc::new(LocalComm {
                rank,
                shared: shared.clone(),
                opts: opts.clone(),
                seq: Mutex::new(0),
            }) as Arc<dyn Communicator>
        })
        .collect()
}

impl LocalComm {
    /// Deposits `data` and waits for every rank's deposit of the same
    /// collective.
    fn exchange(&self, op: &'static str, data: Vec<u8>) -> Result<Arc<Vec<Deposit>>> {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let seq = *seq;
        let s = &*self.shared;
        let mut t = s.table.lock().unwrap_or_else(|e| e.into_inner());
        let generation = t.generation;
        t.pending[self.rank] = Some(Deposit { op, seq, data });
        if t.pending.iter().all(Option::is_some) {
            let all: Vec<Deposit> = t
                .pending
                .iter_mut()
                .map(|d| d.take().expect("full"))
                .collect();
            t.result = Arc::new(all);
            t.generation += 1;
            s.done.notify_all();
        } else {
            let deadline = Instant::now() + self.opts.timeout;
            while t.generation == generation {
                let now = Instant::now();
                if now >= deadline {
                    let silent = t.pending.iter().position(Option::is_none).unwrap_or(0);
                    // Withdraw, so that a later call does not see a stale deposit.
                    t.pending[self.rank] = None;
                    return Err(Error::Timeout {
                        rank: self.rank,
                        peer: silent,
                        op: format!("{op} #{seq}"),
                        timeout: self.opts.timeout,
                    });
                }
                t = s
                    .done
                    .wait_timeout(t, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let result = t.result.clone();
        drop(t);
        for (peer, d) in result.iter().enumerate() {
            if d.op != op || d.seq != seq {
                return Err(Error::Mismatch {
                    rank: self.rank,
                    peer,
                    detail: format!(
                        "this rank is in {op} #{seq}, rank {peer} in {} #{}",
                        d.op, d.seq
                    ),
                });
            }
        }
        Ok(result)
    }

    fn all_reduce<T: ReduceElem>(&self, op: &'static str, buf: &mut [T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(buf);
        let all = self.exchange(op, bytes.to_vec())?;
        // Deposits are byte vectors without alignment guarantees: copy into
        // typed vectors before summing.
        let mut typed: Vec<Vec<T>> = Vec::with_capacity(all.len());
        for (peer, d) in all.iter().enumerate() {
            if d.data.len() != bytes.len() {
                return Err(Error::Mismatch {
                    rank: self.rank,
                    peer,
                    detail: format!(
                        "{op}: {} bytes here, {} bytes on rank {peer}",
                        bytes.len(),
                        d.data.len()
                    ),
                });
            }
            let mut v = vec![T::zeroed(); buf.len()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&d.data);
            typed.push(v);
        }
        let chunks: Vec<&[T]> = typed.iter().map(Vec::as_slice).collect();
        reduce_chunks(buf, &chunks);
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce("all_reduce", buf)
    }
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce("all_reduce_f64", buf)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather(self.shared.world, send.len(), recv.len())?;
        let all = self.exchange("all_gather", send.to_vec())?;
        for (peer, (d, out)) in all
            .iter()
            .zip(recv.chunks_mut(send.len().max(1)))
            .enumerate()
        {
            if d.data.len() != send.len() {
                return Err(Error::Mismatch {
                    rank: self.rank,
                    peer,
                    detail: format!(
                        "all_gather: {} bytes here, {} bytes on rank {peer}",
                        send.len(),
                        d.data.len()
                    ),
                });
            }
            out.copy_from_slice(&d.data);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(self.shared.world, root)?;
        let data = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let all = self.exchange("broadcast", data)?;
        if self.rank != root {
            let d = &all[root].data;
            if d.len() != buf.len() {
                return Err(Error::Mismatch {
                    rank: self.rank,
                    peer: root,
                    detail: format!(
                        "broadcast: {} bytes here, {} bytes on the root",
                        buf.len(),
                        d.len()
                    ),
                });
            }
            buf.copy_from_slice(d);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}
