//! Collectives between ranks, behind one trait with several transports.
//!
//! - [`in_process`]: ranks are threads of one process (tests).
//! - [`tcp`]: CPU ranks in separate processes or machines, connected in a
//!   full mesh after a rendezvous through a key-value [`store`].
//! - `nccl` (feature `nccl`): GPUs, on raw device pointers.
//! - [`SingleProcess`]: a world of one; every collective is a no-op.
//!
//! Every transport sums in rank order (`((x_0 + x_1) + x_2) + ...`, then
//! divides by the world size), so every rank gets bitwise the same result
//! and the result does not depend on the transport: [`mean_in_rank_order`]
//! is the reference arithmetic they all follow.

mod env;
mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod store;
pub mod tcp;

use std::time::Duration;

use crate::Result;

pub use env::{EnvRanks, communicator_from_env};
pub use local::in_process;

/// Element type of the direction all-gather (`communication_dtype` of the
/// published implementation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CommDType {
    /// Full precision: the parameters' own dtype (f32 parameters travel as
    /// f32, f64 parameters as f64). Results are those of one process
    /// (bitwise on CPU ranks).
    #[default]
    Full,
    /// bfloat16: 2 bytes per element, relative rounding error <= 2^-8 per
    /// direction element.
    Bf16,
    /// IEEE half: 2 bytes per element, relative rounding error <= 2^-11 for
    /// directions of magnitude in [6.1e-5, 65504] (smaller ones lose
    /// relative precision, larger ones overflow to infinity).
    F16,
}

impl CommDType {
    /// Bytes per element on the wire for parameters of `param`'s size.
    pub fn wire_size(self, param: shampoo_core::DType) -> usize {
        match self {
            CommDType::Full => param.size(),
            CommDType::Bf16 | CommDType::F16 => 2,
        }
    }
    /// Short name (`full`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            CommDType::Full => "full",
            CommDType::Bf16 => "bf16",
            CommDType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for CommDType {
    type Err = String;
    /// `full` (also `default`, the published `DEFAULT`), `bf16`
    /// (`bfloat16`), `f16` (`float16`, `half`). `f32`/`float32` are refused
    /// with a hint: full precision is the parameters' dtype, which may be
    /// f64.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" | "default" => Ok(CommDType::Full),
            "bf16" | "bfloat16" => Ok(CommDType::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(CommDType::F16),
            "f32" | "fp32" | "float32" => Err(format!(
                "communication dtype {s:?} is ambiguous: use `full` (the parameters' own dtype, f32 or f64), bf16 or f16"
            )),
            _ => Err(format!(
                "unknown communication dtype {s:?} (expected full, bf16 or f16)"
            )),
        }
    }
}

impl std::fmt::Display for CommDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Collectives on host memory (CPU ranks).
///
/// Methods take `&self` (implementations synchronise internally), so one
/// communicator can be shared through an `Arc` by several optimizers and the
/// training loop. Every rank must call the same collectives in the same
/// order with the same sizes; a mismatch is an error where the transport can
/// detect it, and a peer that stops answering is a timeout naming it.
pub trait Communicator: Send + Sync {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place average over ranks (summed in rank order, then divided).
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_reduce_mean`] for `f64`.
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `recv` = concatenation of every rank's `send`, in rank order (every
    /// rank sends the same number of bytes; `recv` holds `world_size` times
    /// that).
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// All-gather within `group`, a range of consecutive ranks holding this
    /// one: `recv` = the group's sends in rank order (`group.len()` times
    /// `send.len()` bytes). Every rank of the world calls it at the same
    /// time, each with its own group; the groups partition the world.
    ///
    /// The provided implementation all-gathers over the whole world and
    /// keeps the group's part; transports override it to move only the
    /// group's bytes.
    fn all_gather_group_bytes(
        &self,
        send: &[u8],
        recv: &mut [u8],
        group: std::ops::Range<usize>,
    ) -> Result<()> {
        check_group(
            self.rank(),
            self.world_size(),
            &group,
            send.len(),
            recv.len(),
        )?;
        if group.len() == self.world_size() {
            return self.all_gather_bytes(send, recv);
        }
        let mut all = vec![0u8; send.len() * self.world_size()];
        self.all_gather_bytes(send, &mut all)?;
        recv.copy_from_slice(&all[group.start * send.len()..group.end * send.len()]);
        Ok(())
    }
    /// Copies `root`'s `buf` into every other rank's `buf` (same sizes).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Transport options.
#[derive(Debug, Clone, PartialEq)]
pub struct CommOptions {
    /// How long any wait on a peer may take (collectives, rendezvous,
    /// connection set-up) before it fails with an error naming the peer.
    pub timeout: Duration,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions {
            timeout: Duration::from_secs(300),
        }
    }
}

/// The variable that sets [`CommOptions::timeout`] in seconds
/// ([`CommOptions::from_env`]; `shampoo-run --comm-timeout` sets it).
pub const TIMEOUT_VAR: &str = "SHAMPOO_COMM_TIMEOUT";

impl CommOptions {
    /// The defaults, with the timeout from [`TIMEOUT_VAR`] when it is set
    /// (seconds, fractions allowed, more than 0).
    pub fn from_env() -> Result<CommOptions> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`CommOptions::from_env`] with the variables read through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CommOptions> {
        let mut opts = CommOptions::default();
        if let Some(v) = get(TIMEOUT_VAR).filter(|v| !v.trim().is_empty()) {
            let secs: f64 = v.trim().parse().map_err(|_| {
                crate::Error::Env(format!("{TIMEOUT_VAR}={v:?} is not a number of seconds"))
            })?;
            opts.timeout = Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    crate::Error::Env(format!(
                        "{TIMEOUT_VAR}={v:?}: the timeout must be a positive number of seconds"
                    ))
                })?;
        }
        Ok(opts)
    }
}

/// Checks the sizes of an all-gather.
pub(crate) fn check_gather(world: usize, send: usize, recv: usize) -> Result<()> {
    if send.checked_mul(world) != Some(recv) {
        return Err(crate::Error::invalid(format!(
            "all_gather: receive buffer of {recv} bytes for {world} ranks sending {send} bytes each"
        )));
    }
    Ok(())
}

/// Checks a group all-gather's arguments.
pub(crate) fn check_group(
    rank: usize,
    world: usize,
    group: &std::ops::Range<usize>,
    send: usize,
    recv: usize,
) -> Result<()> {
    if !group.contains(&rank) || group.end > world {
        return Err(crate::Error::invalid(format!(
            "group {group:?} of a world of {world} does not hold rank {rank}"
        )));
    }
    check_gather(group.len(), send, recv)
}

/// Checks a broadcast root.
pub(crate) fn check_root(world: usize, root: usize) -> Result<()> {
    if root >= world {
        return Err(crate::Error::invalid(format!(
            "broadcast root {root} is not a rank of a world of {world}"
        )));
    }
    Ok(())
}

/// Element types the mean all-reduce works on.
pub(crate) trait ReduceElem: bytemuck::Pod + std::ops::AddAssign + Send + Sync {
    fn div_by(self, n: usize) -> Self;
}
impl ReduceElem for f32 {
    fn div_by(self, n: usize) -> Self {
        self / n as f32
    }
}
impl ReduceElem for f64 {
    fn div_by(self, n: usize) -> Self {
        self / n as f64
    }
}

/// The reference arithmetic of every transport's mean all-reduce:
/// `out = (((parts[0] + parts[1]) + parts[2]) + ...) / parts.len()`,
/// element by element, in the parts' own type.
///
/// A single process that wants bitwise the same gradients as a `W`-rank job
/// averages the ranks' gradients with this function.
pub fn mean_in_rank_order<T>(parts: &[&[T]], out: &mut [T])
where
    T: Copy + std::ops::AddAssign + std::ops::Div<Output = T> + FromWorld,
{
    let Some(first) = parts.first() else {
        return;
    };
    out.copy_from_slice(first);
    for p in &parts[1..] {
        for (o, &x) in out.iter_mut().zip(p.iter()) {
            *o += x;
        }
    }
    let w = T::from_world(parts.len());
    for o in out.iter_mut() {
        *o = *o / w;
    }
}

/// Conversion of a world size to a float (exact for any realistic world).
pub trait FromWorld {
    /// `n` as this float type.
    fn from_world(n: usize) -> Self;
}
impl FromWorld for f32 {
    fn from_world(n: usize) -> Self {
        n as f32
    }
}
impl FromWorld for f64 {
    fn from_world(n: usize) -> Self {
        n as f64
    }
}

/// `out = (chunks[0] + chunks[1] + ...) / chunks.len()` in rank order: the
/// arithmetic of [`mean_in_rank_order`] for the transports' element types.
pub(crate) fn reduce_chunks<T: ReduceElem>(out: &mut [T], chunks: &[&[T]]) {
    out.copy_from_slice(chunks[0]);
    for c in &chunks[1..] {
        for (o, &x) in out.iter_mut().zip(c.iter()) {
            *o += x;
        }
    }
    for o in out.iter_mut() {
        *o = o.div_by(chunks.len());
    }
}

/// The communicator of a world of one process: every collective returns
/// its input.
#[derive(Debug, Clone, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        // Same arithmetic as every transport: the sum of one part divided by 1.
        for x in buf.iter_mut() {
            *x /= 1.0;
        }
        Ok(())
    }
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()> {
        for x in buf.iter_mut() {
            *x /= 1.0;
        }
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather(1, send.len(), recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root(1, root)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
