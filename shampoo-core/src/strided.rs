//! Parameters whose elements are not stored in row-major order.
//!
//! The math (blocking, statistics, the reference trajectories) is defined
//! on a parameter's logical, row-major order. A tensor may store its
//! elements in another order: channels-last convolution weights
//! `(out, in, kh, kw)` keep `in` innermost. [`StridedShape`] names such a
//! parameter's shape and element strides; the blocks of its layout carry a
//! [`Strided`] map from logical index to memory offset, through which the
//! backends' gathers and scatters read and write the tensor in place. The
//! results are those of the contiguous tensor, bit for bit.
//!
//! Supported layouts are dense permutations of the dimensions: every
//! element has its own offset and the offsets fill `0..numel` (what
//! channels-last and any `permute(..).contiguous().permute(..)` give).
//! Overlapping tensors and tensors with gaps are refused.

use crate::{Error, Result};

/// A parameter's shape, and where its elements are in memory.
pub trait ParamShape {
    /// Logical shape (the order the math uses).
    fn dims(&self) -> &[usize];
    /// Element strides of `dims`; `None` for row-major.
    fn strides(&self) -> Option<&[usize]> {
        None
    }
}

impl ParamShape for Vec<usize> {
    fn dims(&self) -> &[usize] {
        self
    }
}

impl ParamShape for &[usize] {
    fn dims(&self) -> &[usize] {
        self
    }
}

/// A shape with explicit element strides (a libtorch tensor's `size()` and
/// `stride()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedShape {
    /// Logical shape.
    pub dims: Vec<usize>,
    /// Element stride of each dimension.
    pub strides: Vec<usize>,
}

impl ParamShape for StridedShape {
    fn dims(&self) -> &[usize] {
        &self.dims
    }
    fn strides(&self) -> Option<&[usize]> {
        Some(&self.strides)
    }
}

/// Row-major strides of `shape`.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1]);
    }
    s
}

/// `strides` of a tensor of `shape` in a canonical form, so that two
/// tensors laid out alike compare equal: the row-major strides when they
/// address the elements in row-major order, else the strides themselves
/// with 0 for dimensions of size 1 (whose stride addresses nothing).
pub fn canonical_strides(shape: &[usize], strides: &[usize]) -> Vec<usize> {
    let row_major = row_major_strides(shape);
    let is_row_major = strides.len() == shape.len()
        && shape
            .iter()
            .zip(row_major.iter().zip(strides))
            .all(|(&d, (x, y))| d == 1 || x == y);
    if is_row_major {
        return row_major;
    }
    strides
        .iter()
        .zip(shape)
        .map(|(&s, &d)| if d == 1 { 0 } else { s })
        .collect()
}

/// The map from a parameter's logical (row-major) index to its memory
/// offset, for a dense permuted layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strided {
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Strided {
    /// Checks `strides` for a parameter of `shape`: `Ok(None)` when they
    /// address the elements in row-major order (size-1 dimensions'
    /// strides do not matter), the map otherwise, and an error naming
    /// `name` when the layout is not a dense permutation (overlapping
    /// elements, gaps, or the wrong number of strides).
    pub fn new(name: &str, shape: &[usize], strides: &[usize]) -> Result<Option<Strided>> {
        if strides.len() != shape.len() {
            return Err(Error::shape(format!(
                "{name}: {} strides {strides:?} for shape {shape:?}",
                strides.len()
            )));
        }
        if shape.contains(&0) {
            return Ok(None);
        }
        if canonical_strides(shape, strides) == row_major_strides(shape) {
            return Ok(None);
        }
        // Dense and non-overlapping: sorted by stride (size-1 dimensions
        // left out), each stride is the product of the sizes before it.
        let mut dims: Vec<(usize, usize)> = shape
            .iter()
            .zip(strides)
            .filter(|(d, _)| **d != 1)
            .map(|(&d, &s)| (s, d))
            .collect();
        dims.sort_unstable();
        let mut expect = 1usize;
        for &(s, d) in &dims {
            if s != expect {
                return Err(Error::shape(format!(
                    "{name}: strides {strides:?} of shape {shape:?} are not a dense permutation of the dimensions ({}); make it contiguous or channels-last first",
                    if s < expect {
                        "elements overlap"
                    } else {
                        "the memory has gaps"
                    }
                )));
            }
            expect = expect.saturating_mul(d);
        }
        Ok(Some(Strided {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        }))
    }

    /// Logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element strides.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Memory offset of the element at row-major index `logical`.
    pub fn offset(&self, mut logical: usize) -> usize {
        let mut off = 0;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            off += (logical % d) * s;
            logical /= d;
        }
        off
    }

    /// Calls `f(memory_offset, logical_len, step)` for the strided runs
    /// that hold the logical elements `start .. start + len`: each run
    /// stays within the last dimension of size above one, so memory
    /// advances by that dimension's stride.
    pub fn for_each_run(&self, start: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        // Innermost dimension that is not of size 1 (a run never crosses
        // one of its rows).
        let (inner, step) = self
            .shape
            .iter()
            .zip(&self.strides)
            .rev()
            .find(|(d, _)| **d != 1)
            .map_or((1, 1), |(&d, &s)| (d, s));
        let mut at = start;
        let end = start + len;
        while at < end {
            let n = (inner - at % inner).min(end - at);
            f(self.offset(at), n, step);
            at += n;
        }
    }

    /// One stride for every merged dimension of `merged` (consecutive
    /// groups of this shape's dimensions, size-1 ones dropped), where each
    /// group's dimensions are nested in memory as in a row-major tensor;
    /// `None` where a group is not (the kernels then address its elements
    /// dimension by dimension).
    pub fn merged_strides(&self, merged: &[usize]) -> Vec<Option<usize>> {
        self.merged_groups(merged)
            .iter()
            .map(|g| nested_stride(g))
            .collect()
    }

    /// The dimensions (size and stride, size-1 ones dropped) that make up
    /// each merged dimension of `merged`.
    pub fn merged_groups(&self, merged: &[usize]) -> Vec<Vec<(usize, usize)>> {
        let kept: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| **d != 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        let mut groups = Vec::with_capacity(merged.len());
        let mut it = kept.into_iter().peekable();
        for &m in merged {
            let mut g = Vec::new();
            let mut prod = 1usize;
            while prod < m {
                match it.next() {
                    Some((d, s)) => {
                        prod *= d;
                        g.push((d, s));
                    }
                    None => break,
                }
            }
            groups.push(g);
        }
        groups
    }
}

/// The one stride of a merged dimension made of `group` (its original
/// dimensions' sizes and strides), when they are nested in memory as in a
/// row-major tensor; `None` when they are not.
pub fn nested_stride(group: &[(usize, usize)]) -> Option<usize> {
    let mut stride = None;
    let mut expect = None;
    for &(d, s) in group.iter().rev() {
        match expect {
            None => stride = Some(s),
            Some(e) if e == s => {}
            Some(_) => return None,
        }
        expect = Some(s * d);
    }
    stride.or(Some(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Channels-last strides of `(o, i, h, w)`.
    fn channels_last(s: [usize; 4]) -> Vec<usize> {
        let [_, i, h, w] = s;
        vec![i * h * w, 1, w * i, i]
    }

    #[test]
    fn row_major_and_size_one_strides_need_no_map() {
        assert_eq!(Strided::new("w", &[2, 3], &[3, 1]).unwrap(), None);
        assert_eq!(Strided::new("w", &[2, 1, 3], &[3, 7, 1]).unwrap(), None);
        assert_eq!(Strided::new("w", &[0, 3], &[1, 5]).unwrap(), None);
    }

    #[test]
    fn channels_last_maps_every_logical_index_to_its_own_offset() {
        let shape = [4, 3, 2, 5];
        let s = Strided::new("w", &shape, &channels_last(shape))
            .unwrap()
            .unwrap();
        let mut seen: Vec<usize> = (0..120).map(|l| s.offset(l)).collect();
        // Logical 88 = ((2 * 3 + 2) * 2 + 1) * 5 + 3: (o, i, h, w) = (2, 2, 1, 3).
        assert_eq!(s.offset(88), 2 * 30 + 2 + 15 + 3 * 3);
        seen.sort_unstable();
        assert_eq!(seen, (0..120).collect::<Vec<_>>());
    }

    #[test]
    fn runs_cover_the_logical_range_in_order() {
        let shape = [4, 3, 2, 5];
        let s = Strided::new("w", &shape, &channels_last(shape))
            .unwrap()
            .unwrap();
        let mut got = Vec::new();
        s.for_each_run(7, 11, |off, n, step| {
            got.extend((0..n).map(|t| off + t * step));
        });
        let want: Vec<usize> = (7..18).map(|l| s.offset(l)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn overlapping_or_gapped_layouts_are_refused_with_their_strides() {
        let e = Strided::new("conv.weight", &[2, 3], &[1, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape mismatch: conv.weight: strides [1, 1] of shape [2, 3] are not a dense permutation of the dimensions (elements overlap); make it contiguous or channels-last first"
        );
        let e = Strided::new("w", &[2, 3], &[6, 1]).unwrap_err();
        assert!(e.to_string().contains("the memory has gaps"), "{e}");
        let e = Strided::new("w", &[2, 3], &[1]).unwrap_err();
        assert!(
            e.to_string().contains("1 strides [1] for shape [2, 3]"),
            "{e}"
        );
    }

    #[test]
    fn merged_strides_follow_the_memory_nesting() {
        // (512, 512, 3, 3) channels-last merged as (512, 512, 9): the 3x3
        // window is nested (stride 512), the channels are not merged.
        let shape = [512, 512, 3, 3];
        let s = Strided::new("w", &shape, &channels_last(shape))
            .unwrap()
            .unwrap();
        assert_eq!(
            s.merged_strides(&[512, 512, 9]),
            vec![Some(4608), Some(1), Some(512)]
        );
        // (64, 3, 7, 7) merged as (192, 49): out and in are not nested.
        let shape = [64, 3, 7, 7];
        let s = Strided::new("w", &shape, &channels_last(shape))
            .unwrap()
            .unwrap();
        assert_eq!(s.merged_strides(&[192, 49]), vec![None, Some(3)]);
    }
}
