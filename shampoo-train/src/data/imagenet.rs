//! ImageNet-style image folders: `DIR/train/<class>/*.jpg` and
//! `DIR/val/<class>/*.jpg`.
//!
//! Training images get torchvision's `RandomResizedCrop(res)` (scale
//! `[0.08, 1]`, ratio `[3/4, 4/3]`) and a horizontal flip with probability
//! 1/2; validation images are resized so that the shorter side is
//! `res * 256 / 224` and center-cropped to `res`. Each sample is decoded
//! ([`super::decode`]), cropped, resized and flipped ([`super::transform`])
//! straight into its slice of a uint8 batch buffer; the ImageNet mean and
//! standard deviation are applied on the device ([`super::Normaliser`]). The
//! random choices of a sample are a function of (seed, epoch, sample
//! index), so a resumed run sees the same crops.

use super::{Dataset, Scratch, Split, decode, transform};
use crate::error::{Error, Result, io_err};
use crate::rng::SplitMix64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

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
        if resolution == 0 {
            return Err(Error::Invalid("--resolution must be at least 1".into()));
        }
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

    /// The file of sample `index`.
    pub fn path(&self, index: usize) -> &Path {
        &self.samples[index].0
    }

    fn corrupt(&self, path: &Path, reason: String) -> Result<bool> {
        match self.on_corrupt {
            OnCorrupt::Fail => Err(Error::CorruptImage {
                path: path.to_path_buf(),
                reason,
            }),
            OnCorrupt::Skip => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("skipping corrupt image {}: {reason}", path.display());
                Ok(false)
            }
        }
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        let r = self.resolution as usize;
        [r, r, 3]
    }

    fn normalisation(&self) -> (&'static [f32], &'static [f32]) {
        (&MEAN, &STD)
    }

    fn corrupt_count(&self) -> usize {
        self.corrupt.load(Ordering::Relaxed)
    }

    fn label(&self, index: usize) -> i64 {
        self.samples[index].1
    }

    fn write_sample(
        &self,
        index: usize,
        epoch: u64,
        seed: u64,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<bool> {
        let path = &self.samples[index].0;
        if let Err(e) = decode::read_file(path, &mut scratch.file) {
            return self.corrupt(path, e.to_string());
        }
        let img = match decode::decode_rgb(&scratch.file, &mut scratch.pixels) {
            Ok(img) => img,
            Err(reason) => return self.corrupt(path, reason),
        };
        let size = (img.width, img.height);
        let src = &scratch.pixels[..img.width as usize * img.height as usize * 3];
        let res = self.resolution;
        let resized = match self.split {
            Split::Train => {
                let mut rng = SplitMix64::keyed(&[seed, epoch, index as u64, 0x0041_5547]);
                let crop = transform::random_resized_crop(img.width, img.height, &mut rng);
                let r = transform::resized_crop(&mut scratch.resizer, src, size, 3, crop, res, out);
                if r.is_ok() && rng.next_f64() < 0.5 {
                    transform::flip_horizontal(out, res as usize, 3);
                }
                r
            }
            Split::Test => {
                let short = (res as f64 * 256.0 / 224.0).round() as u32;
                transform::resized_center_crop(&mut scratch.resizer, src, size, 3, short, res, out)
            }
        };
        resized.map_err(|e| {
            Error::Invalid(format!(
                "resizing {} ({}x{}) to {res}: {e}",
                path.display(),
                img.width,
                img.height
            ))
        })?;
        Ok(true)
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
