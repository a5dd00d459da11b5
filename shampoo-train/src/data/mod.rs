//! Datasets, epoch order and per-rank sharding.
//!
//! Every epoch has one global order of the training set, a function of the
//! seed and the epoch only. Global batch `i` is `order[i*B .. (i+1)*B]`; rank
//! `r` of `W` takes the `r`-th of its `W` equal slices. The global batches,
//! and so the averaged gradients, are therefore the same for a given seed
//! whatever the world size. The last incomplete global batch of an epoch is
//! dropped.

pub mod fashion_mnist;
pub mod imagenet;

use crate::Result;
use crate::rng::SplitMix64;
use tch::Tensor;

/// One rank's part of a batch: normalised float32 images `[n, c, h, w]` and
/// int64 labels `[n]`.
#[derive(Debug)]
pub struct Batch {
    /// Images, normalised, NCHW float32.
    pub images: Tensor,
    /// Class indices, int64.
    pub labels: Tensor,
    /// Images of the requested indices that were skipped (corrupt).
    pub skipped: usize,
}

/// Which part of a dataset, and so which preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training split: augmentation on.
    Train,
    /// Test / validation split: deterministic preprocessing.
    Test,
}

/// A dataset split that can produce batches for given sample indices.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Input channels of the images.
    fn channels(&self) -> usize;
    /// Images skipped as corrupt so far.
    fn corrupt_count(&self) -> usize {
        0
    }
    /// The batch of the samples `indices`; `epoch` and `seed` key the random
    /// augmentation (so a resumed run sees the same crops).
    fn batch(&self, indices: &[usize], epoch: u64, seed: u64) -> Result<Batch>;
}

/// The order of the training samples in an epoch (a permutation of `0..n`).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::keyed(&[seed, epoch, 0x004f_5244_4552]).shuffle(&mut order);
    order
}

/// Number of complete global batches in an epoch of `n` samples.
pub fn steps_per_epoch(n: usize, global_batch: usize) -> usize {
    n / global_batch
}

/// Rank `rank`'s sample indices of global batch `pos` of an epoch.
pub fn rank_indices(
    order: &[usize],
    pos: usize,
    global_batch: usize,
    rank: usize,
    world: usize,
) -> &[usize] {
    let per_rank = global_batch / world;
    let start = pos * global_batch + rank * per_rank;
    &order[start..start + per_rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_batches_do_not_depend_on_the_world_size() {
        let order = epoch_order(1000, 7, 3);
        for pos in 0..steps_per_epoch(1000, 128) {
            let one = rank_indices(&order, pos, 128, 0, 1).to_vec();
            let two: Vec<usize> = (0..2)
                .flat_map(|r| rank_indices(&order, pos, 128, r, 2).to_vec())
                .collect();
            let four: Vec<usize> = (0..4)
                .flat_map(|r| rank_indices(&order, pos, 128, r, 4).to_vec())
                .collect();
            assert_eq!(one, two);
            assert_eq!(one, four);
        }
        assert_ne!(epoch_order(1000, 7, 3), epoch_order(1000, 7, 4));
        assert_eq!(epoch_order(1000, 7, 3), order);
    }
}
