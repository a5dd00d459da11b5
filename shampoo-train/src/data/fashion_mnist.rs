//! Fashion-MNIST from its idx files (`*-ubyte.gz`, as the Debian package
//! `dataset-fashion-mnist` installs them in `/usr/share/datasets/fashion-mnist`).

use super::{Dataset, Scratch};
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the Debian package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Mean of the training pixels (scaled to `[0, 1]`), as the protocol uses.
pub const MEAN: f32 = 0.2860;
/// Standard deviation of the training pixels.
pub const STD: f32 = 0.3530;

/// One split of Fashion-MNIST in memory (28x28 grey images, 10 classes).
#[derive(Debug, Clone)]
pub struct FashionMnist {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl FashionMnist {
    /// Loads the training (`train-*`) or test (`t10k-*`) split from `dir`,
    /// keeping the first `limit` samples when given.
    pub fn load(dir: &Path, train: bool, limit: Option<usize>) -> Result<Self> {
        let prefix = if train { "train" } else { "t10k" };
        let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        let (dims, mut pixels) = read_idx(&images, 0x0803)?;
        let (ldims, mut labels_v) = read_idx(&labels, 0x0801)?;
        let (n, rows, cols) = (dims[0], dims[1], dims[2]);
        if ldims[0] != n {
            return Err(Error::Idx {
                path: labels,
                reason: format!("{} labels for {n} images", ldims[0]),
            });
        }
        if let Some(&bad) = labels_v.iter().find(|&&l| l >= 10) {
            return Err(Error::Idx {
                path: labels,
                reason: format!("label {bad} is not in 0..10"),
            });
        }
        let n = limit.map_or(n, |l| l.min(n));
        pixels.truncate(n * rows * cols);
        labels_v.truncate(n);
        Ok(FashionMnist {
            pixels,
            labels: labels_v,
            rows,
            cols,
        })
    }

    /// The labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl Dataset for FashionMnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn sample_shape(&self) -> [usize; 3] {
        [self.rows, self.cols, 1]
    }

    fn normalisation(&self) -> (&'static [f32], &'static [f32]) {
        (&[MEAN], &[STD])
    }

    fn label(&self, index: usize) -> i64 {
        self.labels[index] as i64
    }

    fn write_sample(
        &self,
        index: usize,
        _epoch: u64,
        _seed: u64,
        out: &mut [u8],
        _scratch: &mut Scratch,
    ) -> Result<bool> {
        let px = self.rows * self.cols;
        out.copy_from_slice(&self.pixels[index * px..(index + 1) * px]);
        Ok(true)
    }
}

/// Reads a gzip-compressed idx file with the given magic number; returns its
/// dimensions and its bytes.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFashionMnist {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                context: format!("opening {}", path.display()),
                source: e,
            }
        }
    })?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| idx_err(path, format!("not a gzip file ({e})")))?;
    parse_idx(&bytes, magic).map_err(|reason| idx_err(path, reason))
}

fn idx_err(path: &Path, reason: String) -> Error {
    Error::Idx {
        path: PathBuf::from(path),
        reason,
    }
}

fn parse_idx(bytes: &[u8], magic: u32) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    let word = |i: usize| -> std::result::Result<u32, String> {
        bytes
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated header".to_string())
    };
    let m = word(0)?;
    if m != magic {
        return Err(format!("magic number {m:#010x}, expected {magic:#010x}"));
    }
    let ndim = (magic & 0xff) as usize;
    let dims = (1..=ndim)
        .map(|i| word(i).map(|d| d as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let data = &bytes[4 * (ndim + 1)..];
    let expected: usize = dims.iter().product();
    if data.len() != expected {
        return Err(format!(
            "{} data bytes, the header says {expected}",
            data.len()
        ));
    }
    Ok((dims, data.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_header_errors_are_reported() {
        assert_eq!(
            parse_idx(&[0, 0, 8, 1, 0, 0, 0, 2, 5], 0x0801).unwrap_err(),
            "1 data bytes, the header says 2"
        );
        assert_eq!(
            parse_idx(&[0, 0, 8, 3], 0x0801).unwrap_err(),
            "magic number 0x00000803, expected 0x00000801"
        );
        assert_eq!(
            parse_idx(&[0, 0, 8, 1, 0, 0, 0, 2, 5, 6], 0x0801).unwrap(),
            (vec![2], vec![5, 6])
        );
    }
}
