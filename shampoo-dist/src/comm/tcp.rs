//! The host transport: CPU ranks connected over TCP in a full mesh.
//!
//! Set-up: rank 0 serves the rendezvous [store](super::store) on
//! `MASTER_ADDR:MASTER_PORT`; every rank listens on an ephemeral port,
//! publishes `ip:port` (the interface through which it reaches the store)
//! and connects to every lower rank; the mesh is confirmed by a barrier.
//!
//! Collectives send every message with a header (`op`, sequence number,
//! length) that the receiver checks, so ranks that call different
//! collectives get a mismatch error instead of garbage. Each peer has its
//! own connection, so a wait always concerns one named peer: a rank that
//! stops answering makes its peers fail with [`Error::Timeout`] naming it,
//! and one that exits makes them fail at once with [`Error::PeerLost`].
//!
//! - all-reduce: direct reduce-scatter (rank `c` receives chunk `c` from
//!   every rank and sums the chunks in rank order), then all-gather of the
//!   reduced chunks. Each rank sends and receives `2 (W-1)/W` of the buffer,
//!   like a ring, and the sum order is rank order whatever the chunk.
//! - all-gather: every rank sends its part to every peer.
//! - broadcast: the root sends to every peer.
//! - barrier: an empty all-gather.
//!
//! Sends to different peers run on scoped threads while the calling thread
//! receives, so no pair of ranks can block each other on full socket
//! buffers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::store::{StoreClient, StoreServer};
use super::{
    CommOptions, Communicator, ReduceElem, check_gather, check_group, check_root, reduce_chunks,
};
use crate::{Error, Result};

const MAGIC: u32 = 0x5348_4d50; // "SHMP"
const HEADER: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    ReduceScatter = 2,
    ReduceGather = 3,
    AllGather = 4,
    Broadcast = 5,
    Barrier = 6,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Hello => "connection set-up",
            Op::ReduceScatter | Op::ReduceGather => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::ReduceScatter,
            3 => Op::ReduceGather,
            4 => Op::AllGather,
            5 => Op::Broadcast,
            6 => Op::Barrier,
            _ => return None,
        })
    }
}

struct Peer {
    read: Mutex<TcpStream>,
    write: Mutex<TcpStream>,
}

/// One CPU rank of a TCP world.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    opts: CommOptions,
    peers: Vec<Option<Peer>>,
    /// Serialises collectives; holds the sequence number and scratch.
    state: Mutex<(u64, Vec<u64>)>,
    _store: Option<StoreServer>,
}

fn header(op: Op, seq: u64, len: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = op as u8;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl TcpCommunicator {
    /// Joins a world of `world` ranks as `rank`, through the store at
    /// `master_addr:master_port` (served by rank 0). Every wait is bounded by
    /// `opts.timeout`.
    pub fn connect(
        rank: usize,
        world: usize,
        master_addr: &str,
        master_port: u16,
        opts: &CommOptions,
    ) -> Result<TcpCommunicator> {
        if world == 0 || rank >= world {
            return Err(Error::Env(format!(
                "RANK {rank} is not a rank of a world of {world}"
            )));
        }
        let store = if rank == 0 {
            Some(StoreServer::bind(master_port)?)
        } else {
            None
        };
        let deadline = Instant::now() + opts.timeout;
        let setup_err = |reason: String| Error::Rendezvous {
            addr: format!("{master_addr}:{master_port}"),
            reason: format!("rank {rank}: {reason}"),
        };
        let listener =
            TcpListener::bind("0.0.0.0:0").map_err(|e| setup_err(format!("cannot listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| setup_err(e.to_string()))?
            .port();
        let mut client = StoreClient::connect(master_addr, master_port, opts.timeout)?;
        let ip = client.local_ip()?;
        client.set(
            &format!("rank/{rank}"),
            format!("{world} {}", SocketAddr::new(ip, port)).as_bytes(),
        )?;
        let mut peers: Vec<Option<Peer>> = (0..world).map(|_| None).collect();
        let timeout = opts.timeout;
        let to_peer = |s: TcpStream, peer: usize| -> Result<Peer> {
            let io = |e: std::io::Error| setup_err(format!("socket options for rank {peer}: {e}"));
            s.set_nodelay(true).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            let w = s.try_clone().map_err(io)?;
            Ok(Peer {
                read: Mutex::new(s),
                write: Mutex::new(w),
            })
        };
        // Connect to every lower rank.
        for (q, slot) in peers.iter_mut().enumerate().take(rank) {
            let v = client
                .wait(&format!("rank/{q}"))?
                .ok_or_else(|| Error::Timeout {
                    rank,
                    peer: q,
                    op: "rendezvous (it never published its address)".into(),
                    timeout,
                })?;
            let v = String::from_utf8_lossy(&v).into_owned();
            let (their_world, addr) = v
                .split_once(' ')
                .ok_or_else(|| setup_err(format!("malformed address of rank {q}: {v:?}")))?;
            if their_world != world.to_string() {
                return Err(Error::Mismatch {
                    rank,
                    peer: q,
                    detail: format!("WORLD_SIZE is {world} here and {their_world} on rank {q}"),
                });
            }
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| setup_err(format!("address of rank {q} {addr:?}: {e}")))?;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut s = TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))
                .map_err(|e| setup_err(format!("cannot connect to rank {q} at {addr}: {e}")))?;
            s.set_write_timeout(Some(timeout))
                .and_then(|_| s.write_all(&header(Op::Hello, rank as u64, world as u64)))
                .map_err(|e| setup_err(format!("cannot greet rank {q} at {addr}: {e}")))?;
            *slot = Some(to_peer(s, q)?);
        }
        // Accept every higher rank.
        listener
            .set_nonblocking(true)
            .map_err(|e| setup_err(e.to_string()))?;
        let mut missing = world - 1 - rank;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, from)) => {
                    let hello = (|| -> std::io::Result<[u8; HEADER]> {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(timeout))?;
                        let mut h = [0u8; HEADER];
                        s.read_exact(&mut h)?;
                        Ok(h)
                    })()
                    .map_err(|e| setup_err(format!("greeting from {from}: {e}")))?;
                    let magic = u32::from_le_bytes(hello[0..4].try_into().expect("4"));
                    let peer = u64::from_le_bytes(hello[8..16].try_into().expect("8")) as usize;
                    let their_world = u64::from_le_bytes(hello[16..24].try_into().expect("8"));
                    if magic != MAGIC || hello[4] != Op::Hello as u8 {
                        return Err(setup_err(format!(
                            "{from} connected but is not a shampoo-dist rank"
                        )));
                    }
                    if their_world != world as u64 {
                        return Err(Error::Mismatch {
                            rank,
                            peer,
                            detail: format!(
                                "WORLD_SIZE is {world} here and {their_world} on rank {peer}"
                            ),
                        });
                    }
                    if peer <= rank || peer >= world || peers[peer].is_some() {
                        return Err(setup_err(format!(
                            "unexpected greeting from rank {peer} ({from})"
                        )));
                    }
                    peers[peer] = Some(to_peer(s, peer)?);
                    missing -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let silent = (rank + 1..world)
                            .find(|&p| peers[p].is_none())
                            .expect("a missing peer");
                        return Err(Error::Timeout {
                            rank,
                            peer: silent,
                            op: Op::Hello.name().into(),
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(setup_err(format!("accept: {e}"))),
            }
        }
        let comm = TcpCommunicator {
            rank,
            world,
            opts: opts.clone(),
            peers,
            state: Mutex::new((0, Vec::new())),
            _store: store,
        };
        comm.barrier()?;
        tracing::debug!(rank, world, "tcp mesh connected");
        Ok(comm)
    }

    fn peer(&self, p: usize) -> &Peer {
        self.peers[p]
            .as_ref()
            .expect("every other rank is connected")
    }

    fn io_err(&self, peer: usize, op: Op, seq: u64, e: std::io::Error) -> Error {
        if is_timeout(&e) {
            Error::Timeout {
                rank: self.rank,
                peer,
                op: format!("{} #{seq}", op.name()),
                timeout: self.opts.timeout,
            }
        } else {
            Error::PeerLost {
                rank: self.rank,
                peer,
                op: format!("{} #{seq}", op.name()),
                reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "connection closed (the rank exited or crashed)".into()
                } else {
                    e.to_string()
                },
            }
        }
    }

    fn send(&self, peer: usize, op: Op, seq: u64, data: &[u8]) -> Result<()> {
        let mut s = self
            .peer(peer)
            .write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.write_all(&header(op, seq, data.len() as u64))
            .and_then(|_| s.write_all(data))
            .map_err(|e| self.io_err(peer, op, seq, e))
    }

    fn recv(&self, peer: usize, op: Op, seq: u64, out: &mut [u8]) -> Result<()> {
        let mut s = self
            .peer(peer)
            .read
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h)
            .map_err(|e| self.io_err(peer, op, seq, e))?;
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let their_op = Op::from_u8(h[4]);
        let their_seq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let len = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        if magic != MAGIC || their_op != Some(op) || their_seq != seq {
            return Err(Error::Mismatch {
                rank: self.rank,
                peer,
                detail: format!(
                    "this rank is in {} #{seq}, rank {peer} sent {} #{their_seq}",
                    op.name(),
                    their_op.map_or("an unknown message", Op::name)
                ),
            });
        }
        if len != out.len() as u64 {
            return Err(Error::Mismatch {
                rank: self.rank,
                peer,
                detail: format!(
                    "{} #{seq}: this rank expects {} bytes, rank {peer} sent {len}",
                    op.name(),
                    out.len()
                ),
            });
        }
        s.read_exact(out).map_err(|e| self.io_err(peer, op, seq, e))
    }

    /// Sends `sends` on scoped threads while receiving `recvs` (in order) on
    /// this one; the first receive error wins, else the first send error.
    fn exchange(
        &self,
        op: Op,
        seq: u64,
        sends: Vec<(usize, &[u8])>,
        recvs: Vec<(usize, &mut [u8])>,
    ) -> Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = sends
                .into_iter()
                .map(|(p, data)| s.spawn(move || self.send(p, op, seq, data)))
                .collect();
            let mut result = Ok(());
            for (p, buf) in recvs {
                result = self.recv(p, op, seq, buf);
                if result.is_err() {
                    break;
                }
            }
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Unavailable("a send thread panicked".into())));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    /// All-gather among the ranks of `group` only.
    fn gather_among(
        &self,
        send: &[u8],
        recv: &mut [u8],
        group: std::ops::Range<usize>,
    ) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = Self::next_seq(&mut st);
        let n = send.len();
        let me = self.rank - group.start;
        let mut parts: Vec<&mut [u8]> = if n == 0 {
            (0..group.len()).map(|_| Default::default()).collect()
        } else {
            recv.chunks_mut(n).collect()
        };
        parts[me].copy_from_slice(send);
        let sends: Vec<(usize, &[u8])> = group
            .clone()
            .filter(|&p| p != self.rank)
            .map(|p| (p, send))
            .collect();
        let recvs: Vec<(usize, &mut [u8])> = parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| (group.start + i, part))
            .filter(|(p, _)| *p != self.rank)
            .collect();
        self.exchange(Op::AllGather, seq, sends, recvs)
    }

    fn next_seq(state: &mut (u64, Vec<u64>)) -> u64 {
        state.0 += 1;
        state.0
    }

    fn all_reduce<T: ReduceElem>(&self, buf: &mut [T]) -> Result<()> {
        let w = self.world;
        if w == 1 {
            for x in buf.iter_mut() {
                *x = x.div_by(1);
            }
            return Ok(());
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = Self::next_seq(&mut st);
        let n = buf.len();
        let size = std::mem::size_of::<T>();
        let bounds: Vec<usize> = (0..=w).map(|c| c * n / w).collect();
        let me = self.rank;
        let mine = bounds[me + 1] - bounds[me];
        // Scratch: one chunk of mine per rank (own included), 8-byte aligned.
        let need = (w * mine * size).div_ceil(8);
        if st.1.len() < need {
            st.1.resize(need, 0);
        }
        let scratch: &mut [u8] =
            &mut bytemuck::cast_slice_mut::<u64, u8>(&mut st.1)[..w * mine * size];
        {
            // Phase 1: chunk p of my buffer to rank p; chunk `me` from all.
            let bytes: &[u8] = bytemuck::cast_slice(buf);
            let sends: Vec<(usize, &[u8])> = (0..w)
                .filter(|&p| p != me)
                .map(|p| (p, &bytes[bounds[p] * size..bounds[p + 1] * size]))
                .collect();
            let mut parts: Vec<&mut [u8]> = scratch.chunks_mut((mine * size).max(1)).collect();
            parts.resize_with(w, Default::default);
            parts[me].copy_from_slice(&bytes[bounds[me] * size..bounds[me + 1] * size]);
            let recvs: Vec<(usize, &mut [u8])> = parts
                .into_iter()
                .enumerate()
                .filter(|(p, _)| *p != me)
                .collect();
            self.exchange(Op::ReduceScatter, seq, sends, recvs)?;
        }
        {
            let typed: &[T] = bytemuck::cast_slice(&scratch[..]);
            let chunks: Vec<&[T]> = (0..w).map(|p| &typed[p * mine..(p + 1) * mine]).collect();
            reduce_chunks(&mut buf[bounds[me]..bounds[me + 1]], &chunks);
        }
        // Phase 2: my reduced chunk to all; chunk p from rank p.
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf);
        let mut parts: Vec<&mut [u8]> = Vec::with_capacity(w);
        let mut rest = bytes;
        for p in 0..w {
            let (a, b) = rest.split_at_mut((bounds[p + 1] - bounds[p]) * size);
            parts.push(a);
            rest = b;
        }
        let own: &[u8] = &*std::mem::take(&mut parts[me]);
        let sends: Vec<(usize, &[u8])> = (0..w).filter(|&p| p != me).map(|p| (p, own)).collect();
        let recvs: Vec<(usize, &mut [u8])> = parts
            .into_iter()
            .enumerate()
            .filter(|(p, _)| *p != me)
            .collect();
        self.exchange(Op::ReduceGather, seq, sends, recvs)
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf)
    }
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather(self.world, send.len(), recv.len())?;
        self.gather_among(send, recv, 0..self.world)
    }
    fn all_gather_group_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        group: std::ops::Range<usize>,
    ) -> Result<()> {
        check_group(self.rank, self.world, &group, send.len(), recv.len())?;
        self.gather_among(send, recv, group)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(self.world, root)?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = Self::next_seq(&mut st);
        if self.rank == root {
            let data: &[u8] = buf;
            let sends = (0..self.world)
                .filter(|&p| p != root)
                .map(|p| (p, data))
                .collect();
            self.exchange(Op::Broadcast, seq, sends, Vec::new())
        } else {
            self.exchange(Op::Broadcast, seq, Vec::new(), vec![(root, buf)])
        }
    }
    fn barrier(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = Self::next_seq(&mut st);
        let sends = (0..self.world)
            .filter(|&p| p != self.rank)
            .map(|p| (p, &[][..]))
            .collect();
        let mut empty: Vec<[u8; 0]> = vec![[]; self.world];
        let recvs = empty
            .iter_mut()
            .enumerate()
            .filter(|(p, _)| *p != self.rank)
            .map(|(p, e)| (p, &mut e[..]))
            .collect();
        self.exchange(Op::Barrier, seq, sends, recvs)
    }
}
