//! ImageNet-style image folders: `DIR/train/<class>/*.jpg` and
//! `DIR/val/<class>/*.jpg`, decoded in parallel (rayon).
//!
//! Training images get torchvision's `RandomResizedCrop(res)` (scale
//! `[0.08, 1]`, ratio `[3/4, 4/3]`) and a horizontal flip with probability
//! 1/2; validation images are resized so that the shorter side is
//! `res * 256 / 224` and center-cropped to `res`. Both are normalised with
//! the ImageNet mean and standard deviation. The random choices of a sample
//! are a function of (seed, epoch, sample index), so a resumed run sees the
//! same crops.

use super::{Batch, Dataset, Split};
use crate::error::{Error, Result, io_err};
use crate::rng::SplitMix64;
use image::RgbImage;
use image::imageops::{self, FilterType};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::Tensor;

/// ImageNet channel means (RGB, pixels in `[0, 1]`).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What to do with an image that does not decode.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum OnCorrupt {
    /// Leave it out of its batch, warn, and count it.
    Skip,
    /// Stop with an error naming the file.
    Fail,
}

/// One split of an image-folder dataset.
#[derive(Debug)]
pub struct ImageFolder {
    samples: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
    split: Split,
    resolution: u32,
    on_corrupt: OnCorrupt,
    corrupt: AtomicUsize,
}

impl ImageFolder {
    /// Reads the file list of `root/train` or `root/val`. Classes are the
    /// sorted folder names of `root/train`; `val` may hold a subset of them.
    pub fn open(root: &Path, split: Split, resolution: u32, on_corrupt: OnCorrupt) -> Result<Self> {
        let classes = class_folders(&root.join("train"))?;
        let dir = root.join(match split {
            Split::Train => "train",
            Split::Test => "val",
        });
        let folders = if split == Split::Train {
            classes.clone()
        } else {
            class_folders(&dir)?
        };
        let mut samples = Vec::new();
        for name in &folders {
            let label = match classes.binary_search(name) {
                Ok(l) => l as i64,
                Err(_) => {
                    return Err(Error::DatasetLayout {
                        path: dir.join(name),
                        reason: format!(
                            "class `{name}` has no folder in {}",
                            root.join("train").display()
                        ),
                    });
                }
            };
            let folder = dir.join(name);
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&folder)
                .map_err(io_err(format!("reading {}", folder.display())))?
            {
                let entry = entry.map_err(io_err(format!("reading {}", folder.display())))?;
                let path = entry.path();
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if !hidden && path.is_file() {
                    files.push(path);
                }
            }
            if files.is_empty() {
                return Err(Error::DatasetLayout {
                    path: folder,
                    reason: "class folder holds no images".into(),
                });
            }
            files.sort();
            samples.extend(files.into_iter().map(|f| (f, label)));
        }
        Ok(ImageFolder {
            samples,
            classes,
            split,
            resolution,
            on_corrupt,
            corrupt: AtomicUsize::new(0),
        })
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Keeps `n` samples spread evenly over the list (so every class keeps
    /// its share).
    pub fn limit(&mut self, n: usize) {
        let len = self.samples.len();
        if n < len {
            let keep: Vec<_> = (0..n).map(|i| self.samples[i * len / n].clone()).collect();
            self.samples = keep;
        }
    }

    fn load_one(&self, index: usize, epoch: u64, seed: u64) -> Result<Option<Vec<f32>>> {
        let (path, _) = &self.samples[index];
        let img = match image::open(path) {
            Ok(img) => img.to_rgb8(),
            Err(e) => {
                return match self.on_corrupt {
                    OnCorrupt::Fail => Err(Error::CorruptImage {
                        path: path.clone(),
                        reason: e.to_string(),
                    }),
                    OnCorrupt::Skip => {
                        self.corrupt.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("skipping corrupt image {}: {e}", path.display());
                        Ok(None)
                    }
                };
            }
        };
        let res = self.resolution;
        let out = match self.split {
            Split::Train => {
                let mut rng = SplitMix64::keyed(&[seed, epoch, index as u64, 0x0041_5547]);
                let (x, y, w, h) = random_resized_crop(img.width(), img.height(), &mut rng);
                let crop = imageops::crop_imm(&img, x, y, w, h).to_image();
                let mut out = imageops::resize(&crop, res, res, FilterType::Triangle);
                if rng.next_f64() < 0.5 {
                    imageops::flip_horizontal_in_place(&mut out);
                }
                out
            }
            Split::Test => {
                let short = (res as f64 * 256.0 / 224.0).round() as u32;
                let (w, h) = (img.width(), img.height());
                let (nw, nh) = if w <= h {
                    (
                        short,
                        ((h as f64 * short as f64 / w as f64).round() as u32).max(res),
                    )
                } else {
                    (
                        ((w as f64 * short as f64 / h as f64).round() as u32).max(res),
                        short,
                    )
                };
                let resized = imageops::resize(&img, nw, nh, FilterType::Triangle);
                imageops::crop_imm(&resized, (nw - res) / 2, (nh - res) / 2, res, res).to_image()
            }
        };
        Ok(Some(normalise(&out)))
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn channels(&self) -> usize {
        3
    }

    fn corrupt_count(&self) -> usize {
        self.corrupt.load(Ordering::Relaxed)
    }

    fn batch(&self, indices: &[usize], epoch: u64, seed: u64) -> Result<Batch> {
        let decoded: Vec<Option<Vec<f32>>> = indices
            .par_iter()
            .map(|&i| self.load_one(i, epoch, seed))
            .collect::<Result<_>>()?;
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut skipped = 0;
        for (&i, d) in indices.iter().zip(decoded) {
            match d {
                Some(px) => {
                    images.extend_from_slice(&px);
                    labels.push(self.samples[i].1);
                }
                None => skipped += 1,
            }
        }
        let n = labels.len() as i64;
        let r = self.resolution as i64;
        Ok(Batch {
            images: Tensor::from_slice(&images).view([n, 3, r, r]),
            labels: Tensor::from_slice(&labels),
            skipped,
        })
    }
}

/// Sorted names of the class folders of `dir`; errors for a missing folder,
/// a folder without class folders, or a plain file among them.
fn class_folders(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Err(Error::DatasetLayout {
            path: dir.to_path_buf(),
            reason: "no such folder; expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
                .into(),
        });
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if !entry.path().is_dir() {
            return Err(Error::DatasetLayout {
                path: entry.path(),
                reason: format!(
                    "is a file, but {} must hold only class folders",
                    dir.display()
                ),
            });
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(Error::DatasetLayout {
            path: dir.to_path_buf(),
            reason: "holds no class folders".into(),
        });
    }
    names.sort();
    Ok(names)
}

/// torchvision's `RandomResizedCrop` box (x, y, w, h): scale `[0.08, 1]`,
/// aspect ratio `[3/4, 4/3]` (log-uniform), ten tries, then a center crop.
fn random_resized_crop(width: u32, height: u32, rng: &mut SplitMix64) -> (u32, u32, u32, u32) {
    let area = width as f64 * height as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.uniform(0.08, 1.0);
        let ratio = rng.uniform(lo, hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let x = rng.below((width - w + 1) as usize) as u32;
            let y = rng.below((height - h + 1) as usize) as u32;
            return (x, y, w, h);
        }
    }
    let side = width.min(height);
    ((width - side) / 2, (height - side) / 2, side, side)
}

/// HWC u8 RGB to normalised CHW float32.
fn normalise(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_resized_crop_stays_inside_the_image() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..1000 {
            let (x, y, w, h) = random_resized_crop(40, 30, &mut rng);
            assert!(
                w >= 1 && h >= 1 && x + w <= 40 && y + h <= 30,
                "{x} {y} {w} {h}"
            );
        }
    }
}
