//! Datasets, epoch order, per-rank sharding and the input pipeline.
//!
//! Every epoch has one global order of the training set, a function of the
//! seed and the epoch only. Global batch `i` is `order[i*B .. (i+1)*B]`; rank
//! `r` of `W` takes the `r`-th of its `W` equal slices. The global batches,
//! and so the averaged gradients, are therefore the same for a given seed
//! whatever the world size. The last incomplete global batch of an epoch is
//! dropped.
//!
//! The input pipeline: a dataset writes one sample at a time as uint8 HWC
//! pixels into a slice of a batch buffer ([`Dataset::write_sample`]: for
//! image folders, decode ([`decode`]), crop, resize and flip
//! ([`transform`]) straight into the slice). [`loader::Loader`] does this on
//! its own worker threads, batches ahead of the step that uses them, into
//! preallocated uint8 NHWC buffers (pinned for a GPU); [`Normaliser`] turns a
//! buffer into normalised float32 NCHW on the model's device. [`assemble`]
//! is the synchronous reference of the same assembly, which the loader
//! reproduces bit for bit.

pub mod bench;
pub mod decode;
pub mod fashion_mnist;
pub mod imagenet;
pub mod loader;
pub mod transform;

use crate::Result;
use crate::rng::SplitMix64;
use tch::{Device, Kind, Tensor};

/// One rank's part of a batch, ready for the model: normalised float32
/// images `[n, c, h, w]` and int64 labels `[n]`, on the model's device.
#[derive(Debug)]
pub struct Batch {
    /// Images, normalised, NCHW float32 (channels-last strides with
    /// `--channels-last`).
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

/// Buffers a thread reuses from one sample to the next (the file's bytes,
/// the decoded image, the resizer's work space), so that producing a sample
/// allocates nothing once they have grown to the largest image.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The encoded file.
    pub(crate) file: Vec<u8>,
    /// The decoded image, RGB8 (or the dataset's own channel count).
    pub(crate) pixels: Vec<u8>,
    /// fast_image_resize's state (filter coefficients and row buffers).
    pub(crate) resizer: fast_image_resize::Resizer,
}

/// A dataset split that writes samples, one at a time, into a batch buffer.
///
/// A sample is `sample_shape()` = `[height, width, channels]` uint8 pixels,
/// HWC; batches are NHWC buffers of such samples. Normalisation to float
/// happens later, on the model's device ([`to_input`]).
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// `[height, width, channels]` of every sample as [`Dataset::write_sample`]
    /// writes it.
    fn sample_shape(&self) -> [usize; 3];
    /// Input channels of the images.
    fn channels(&self) -> usize {
        self.sample_shape()[2]
    }
    /// Per-channel mean and standard deviation of the pixels scaled to
    /// `[0, 1]`, used to normalise them.
    fn normalisation(&self) -> (&'static [f32], &'static [f32]);
    /// Images skipped as corrupt so far.
    fn corrupt_count(&self) -> usize {
        0
    }
    /// The class of sample `index`.
    fn label(&self, index: usize) -> i64;
    /// Writes sample `index` into `out` (exactly `h * w * c` bytes, HWC),
    /// with the augmentation keyed by (`seed`, `epoch`, `index`). Returns
    /// `false` when the sample is skipped (a corrupt image under
    /// `--on-corrupt skip`); `out` is then left in an unspecified state.
    fn write_sample(
        &self,
        index: usize,
        epoch: u64,
        seed: u64,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<bool>;
}

/// A batch assembled on the host: the kept samples' uint8 NHWC pixels, in
/// the order of the requested indices, and their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBatch {
    /// `labels.len() * h * w * c` bytes.
    pub pixels: Vec<u8>,
    /// Class of each kept sample.
    pub labels: Vec<i64>,
    /// Samples left out as corrupt.
    pub skipped: usize,
    /// `[height, width, channels]` of a sample.
    pub shape: [usize; 3],
}

impl HostBatch {
    /// The batch as the model takes it, on `device` ([`to_input`]).
    pub fn to_batch(
        &self,
        dataset: &dyn Dataset,
        device: Device,
        channels_last: bool,
    ) -> Result<Batch> {
        let [h, w, c] = self.shape.map(|d| d as i64);
        let n = self.labels.len() as i64;
        let pixels = Tensor::from_slice(&self.pixels).f_view([n, h, w, c])?;
        let norm = Normaliser::new(dataset, device)?;
        Ok(Batch {
            images: norm.to_input(&pixels.f_to_device(device)?, channels_last)?,
            labels: Tensor::from_slice(&self.labels).f_to_device(device)?,
            skipped: self.skipped,
        })
    }
}

/// The synchronous reference of batch assembly: the samples `indices`
/// written one after the other on the calling thread, corrupt ones left out.
/// [`loader::Loader`] produces exactly these bytes, ahead of time and on
/// worker threads.
pub fn assemble<D: Dataset + ?Sized>(
    dataset: &D,
    indices: &[usize],
    epoch: u64,
    seed: u64,
) -> Result<HostBatch> {
    let shape = dataset.sample_shape();
    let bytes = shape.iter().product::<usize>();
    let mut pixels = vec![0u8; indices.len() * bytes];
    let mut scratch = Scratch::default();
    let mut kept = Vec::with_capacity(indices.len());
    for (&index, out) in indices.iter().zip(pixels.chunks_exact_mut(bytes)) {
        kept.push(dataset.write_sample(index, epoch, seed, out, &mut scratch)?);
    }
    let n = compact(&mut pixels, bytes, &kept);
    pixels.truncate(n * bytes);
    Ok(HostBatch {
        pixels,
        labels: kept_labels(dataset, indices, &kept),
        skipped: indices.len() - n,
        shape,
    })
}

/// Moves the kept samples (`kept[i]`) of an NHWC buffer of `bytes`-byte
/// samples to its front, in order; returns how many there are.
pub(crate) fn compact(pixels: &mut [u8], bytes: usize, kept: &[bool]) -> usize {
    let mut n = 0;
    for (i, &k) in kept.iter().enumerate() {
        if k {
            if i != n {
                pixels.copy_within(i * bytes..(i + 1) * bytes, n * bytes);
            }
            n += 1;
        }
    }
    n
}

/// The labels of the kept samples.
pub(crate) fn kept_labels<D: Dataset + ?Sized>(
    dataset: &D,
    indices: &[usize],
    kept: &[bool],
) -> Vec<i64> {
    indices
        .iter()
        .zip(kept)
        .filter(|(_, k)| **k)
        .map(|(&i, _)| dataset.label(i))
        .collect()
}

/// Turns uint8 NHWC batches into the model's input on the device: float32,
/// `(x / 255 - mean) / std` per channel, NCHW shape (NCHW memory, or NHWC
/// strides for channels-last models, which then need no copy at all).
#[derive(Debug)]
pub struct Normaliser {
    mean: Tensor,
    std: Tensor,
}

impl Normaliser {
    /// The dataset's mean and standard deviation, as `[1, c, 1, 1]` float32
    /// tensors on `device`.
    pub fn new(dataset: &dyn Dataset, device: Device) -> Result<Self> {
        let (mean, std) = dataset.normalisation();
        let c = mean.len() as i64;
        Ok(Normaliser {
            mean: Tensor::from_slice(mean)
                .f_view([1, c, 1, 1])?
                .f_to_device(device)?,
            std: Tensor::from_slice(std)
                .f_view([1, c, 1, 1])?
                .f_to_device(device)?,
        })
    }

    /// `pixels`: uint8 `[n, h, w, c]` on the model's device.
    pub fn to_input(&self, pixels: &Tensor, channels_last: bool) -> Result<Tensor> {
        let nchw = pixels.f_permute([0, 3, 1, 2])?;
        // The layout change happens on the uint8 values (a quarter of the
        // float bytes); `to_kind` keeps the strides it is given.
        let nchw = if channels_last {
            nchw
        } else {
            nchw.f_contiguous()?
        };
        let mut x = nchw.f_to_kind(Kind::Float)?;
        let _ = x.f_div_scalar_(255.0)?;
        let _ = x.f_sub_(&self.mean)?;
        let _ = x.f_div_(&self.std)?;
        Ok(x)
    }
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

    struct Pixels;

    impl Dataset for Pixels {
        fn len(&self) -> usize {
            256
        }
        fn num_classes(&self) -> usize {
            1
        }
        fn sample_shape(&self) -> [usize; 3] {
            [4, 4, 3]
        }
        fn normalisation(&self) -> (&'static [f32], &'static [f32]) {
            (&imagenet::MEAN, &imagenet::STD)
        }
        fn label(&self, _: usize) -> i64 {
            0
        }
        fn write_sample(
            &self,
            i: usize,
            _: u64,
            _: u64,
            out: &mut [u8],
            _: &mut Scratch,
        ) -> Result<bool> {
            for (j, o) in out.iter_mut().enumerate() {
                *o = (i * 7 + j * 13) as u8;
            }
            Ok(i % 5 != 3)
        }
    }

    #[test]
    fn normalisation_on_the_device_is_the_float32_formula_bit_for_bit() {
        let idx: Vec<usize> = (0..40).collect();
        let host = assemble(&Pixels, &idx, 0, 0).unwrap();
        assert_eq!((host.labels.len(), host.skipped), (32, 8));
        for channels_last in [false, true] {
            let b = host.to_batch(&Pixels, Device::Cpu, channels_last).unwrap();
            let got = Vec::<f32>::try_from(b.images.contiguous().flatten(0, -1)).unwrap();
            // NHWC bytes -> NCHW floats, as the old per-image code did.
            let mut want = vec![0f32; got.len()];
            for n in 0..32 {
                for p in 0..16 {
                    for c in 0..3 {
                        let v = host.pixels[(n * 16 + p) * 3 + c];
                        want[(n * 3 + c) * 16 + p] =
                            (v as f32 / 255.0 - imagenet::MEAN[c]) / imagenet::STD[c];
                    }
                }
            }
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "channels_last {channels_last}"
            );
        }
    }

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
