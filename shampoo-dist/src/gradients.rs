//! Averaging gradients over the ranks, on the backend's memory, with the
//! presence of each gradient counted exactly.
//!
//! [`GradientAverager`] copies the present gradients into one preallocated
//! bucket (absent ones as zeros), averages it with one all-reduce, and
//! copies the mean back. Alongside, one flag per parameter (gradient present
//! or not) is summed over the ranks as an integer ([`FlagCounter`]): a
//! parameter must have a gradient on every rank or on none. Host
//! collectives have the sums at once and refuse a bad step before anything
//! is updated; a device collective reads them back asynchronously, so the
//! step does not wait for the GPU, and they are checked at the next call
//! (or by [`GradientAverager::check`]): the error then names the step it
//! happened in.

use shampoo_core::DType;
use shampoo_core::backend::{Backend, Map, ViewMutOps, ViewOps};

use crate::collective::{Collective, FlagCounter};
use crate::{Error, Result};

/// Averages the gradients of a fixed list of parameters over the ranks.
pub struct GradientAverager<B: Backend> {
    dtype: DType,
    lens: Vec<usize>,
    /// All parameters' elements (only when the world has several ranks).
    bucket: Option<B::Buffer>,
    counter: Option<Box<dyn FlagCounter>>,
    /// The step whose flags are on their way.
    pending: Option<u64>,
    flags: Vec<u8>,
    world: usize,
}

impl<B: Backend> GradientAverager<B> {
    /// For parameters of `lens` elements of `dtype`.
    pub fn new(
        comm: &dyn Collective<B>,
        backend: &B,
        dtype: DType,
        lens: &[usize],
    ) -> Result<Self> {
        let world = comm.world_size();
        let (bucket, counter) = if world > 1 {
            (
                Some(backend.alloc(dtype, lens.iter().sum())?),
                Some(comm.flag_counter(backend, lens.len())?),
            )
        } else {
            (None, None)
        };
        Ok(GradientAverager {
            dtype,
            lens: lens.to_vec(),
            bucket,
            counter,
            pending: None,
            flags: vec![0; lens.len()],
            world,
        })
    }

    /// Elements per parameter.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Averages `grads` in place over the ranks (collective), as the
    /// gradients of step `step` (named by a presence error). A world of one
    /// changes nothing.
    ///
    /// A parameter whose gradient exists on some ranks only is
    /// [`Error::Presence`] on every rank: from this call (host collectives)
    /// or from the next one (device collectives).
    pub fn average(
        &mut self,
        comm: &dyn Collective<B>,
        backend: &B,
        grads: &mut [Option<B::ViewMut<'_>>],
        step: u64,
    ) -> Result<()> {
        if grads.len() != self.lens.len() {
            return Err(Error::invalid(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.lens.len()
            )));
        }
        for (i, (g, &n)) in grads.iter().zip(&self.lens).enumerate() {
            if let Some(g) = g
                && (g.dtype() != self.dtype || g.len() != n)
            {
                return Err(Error::invalid(format!(
                    "gradient {i} is {} x {}, parameter {i} is {} x {n}",
                    g.dtype(),
                    g.len(),
                    self.dtype,
                )));
            }
        }
        let (Some(bucket), Some(counter)) = (&mut self.bucket, &mut self.counter) else {
            return Ok(());
        };
        // The last step's counts, if still outstanding (device collectives).
        if let Some(prev) = self.pending.take()
            && let Some(sums) = counter.finish(true)?
        {
            check_sums(&sums, prev, self.world)?;
        }
        for (f, g) in self.flags.iter_mut().zip(grads.iter()) {
            *f = u8::from(g.is_some());
        }
        counter.start(&self.flags)?;
        match counter.finish(false)? {
            Some(sums) => check_sums(&sums, step, self.world)?,
            None => self.pending = Some(step),
        }

        // Gradients into the bucket, absent ones as zeros.
        {
            let mut rest = backend.view_mut(bucket);
            let mut jobs: Vec<Map<'_, B>> = Vec::with_capacity(grads.len());
            for (g, &n) in grads.iter().zip(&self.lens) {
                let (dst, tail) = rest.split_at(n);
                rest = tail;
                if n == 0 {
                    continue;
                }
                jobs.push(match g {
                    Some(g) => Map::Copy {
                        src: backend.as_view(g),
                        dst,
                        numel: n,
                        count: 1,
                        select: None,
                    },
                    None => Map::Fill {
                        dst,
                        value: 0.0,
                        numel: n,
                        count: 1,
                        select: None,
                    },
                });
            }
            backend.map(&mut jobs)?;
        }
        comm.all_reduce_mean(backend, backend.view_mut(bucket))?;
        // The means back into the gradients.
        let mut jobs: Vec<Map<'_, B>> = Vec::with_capacity(grads.len());
        let mut off = 0;
        let all = backend.view(bucket);
        for (g, &n) in grads.iter_mut().zip(&self.lens) {
            if let Some(g) = g
                && n > 0
            {
                jobs.push(Map::Copy {
                    src: all.slice(off, n),
                    dst: backend.reborrow(g),
                    numel: n,
                    count: 1,
                    select: None,
                });
            }
            off += n;
        }
        backend.map(&mut jobs)?;
        Ok(())
    }

    /// Checks the presence counts still outstanding (device collectives
    /// check a step late), waiting for them up to the collective's deadline.
    pub fn check(&mut self) -> Result<()> {
        if let (Some(step), Some(counter)) = (self.pending.take(), &mut self.counter)
            && let Some(sums) = counter.finish(true)?
        {
            check_sums(&sums, step, self.world)?;
        }
        Ok(())
    }
}

/// Every parameter's gradient count must be 0 or the world size.
fn check_sums(sums: &[u32], step: u64, world: usize) -> Result<()> {
    match sums
        .iter()
        .enumerate()
        .find(|&(_, &k)| k != 0 && k as usize != world)
    {
        Some((param, &count)) => Err(Error::Presence {
            param,
            step,
            count: count as usize,
            world,
        }),
        None => Ok(()),
    }
}
