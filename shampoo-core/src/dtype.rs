//! Element types and host tensor views.

use serde::{Deserialize, Serialize};

/// Element type of parameters, gradients and optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// Short name (`f32`, `f64`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f64" | "float64" | "double" => Ok(DType::F64),
            _ => Err(format!("unknown dtype {s:?} (expected f32 or f64)")),
        }
    }
}

/// The floating-point element types the optimizer computes in.
pub trait Float:
    'static
    + Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + bytemuck::Pod
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Machine epsilon.
    const EPSILON: Self;
    /// Rounds an `f64` to this type.
    fn from_f64(v: f64) -> Self;
    /// Widens to `f64`.
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `self ^ e`.
    fn powf(self, e: Self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// Neither NaN nor infinite.
    fn is_finite(self) -> bool;
    /// Fused or unfused `self * a + b`, as the platform's `mul_add`.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $d:expr) => {
        impl Float for $t {
            const DTYPE: DType = $d;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPSILON: Self = <$t>::EPSILON;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
impl_float!(f32, DType::F32);
impl_float!(f64, DType::F64);

/// A read-only view of host memory of either dtype.
#[derive(Debug, Clone, Copy)]
pub enum HostView<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `f64` elements.
    F64(&'a [f64]),
}

/// A mutable view of host memory of either dtype.
#[derive(Debug)]
pub enum HostViewMut<'a> {
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `f64` elements.
    F64(&'a mut [f64]),
}

impl<'a> HostView<'a> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostView::F32(_) => DType::F32,
            HostView::F64(_) => DType::F64,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostView::F32(s) => s.len(),
            HostView::F64(s) => s.len(),
        }
    }
    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A sub-range.
    pub fn slice(self, start: usize, len: usize) -> HostView<'a> {
        match self {
            HostView::F32(s) => HostView::F32(&s[start..start + len]),
            HostView::F64(s) => HostView::F64(&s[start..start + len]),
        }
    }
    /// Typed access; `None` when the dtype differs.
    pub fn typed<T: Float>(self) -> Option<&'a [T]> {
        match self {
            HostView::F32(s) if T::DTYPE == DType::F32 => Some(bytemuck::cast_slice(s)),
            HostView::F64(s) if T::DTYPE == DType::F64 => Some(bytemuck::cast_slice(s)),
            _ => None,
        }
    }
}

impl<'a> HostViewMut<'a> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostViewMut::F32(_) => DType::F32,
            HostViewMut::F64(_) => DType::F64,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostViewMut::F32(s) => s.len(),
            HostViewMut::F64(s) => s.len(),
        }
    }
    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A shorter-lived read-only view.
    pub fn as_view(&self) -> HostView<'_> {
        match self {
            HostViewMut::F32(s) => HostView::F32(s),
            HostViewMut::F64(s) => HostView::F64(s),
        }
    }
    /// A shorter-lived mutable view.
    pub fn reborrow(&mut self) -> HostViewMut<'_> {
        match self {
            HostViewMut::F32(s) => HostViewMut::F32(s),
            HostViewMut::F64(s) => HostViewMut::F64(s),
        }
    }
    /// Splits at `mid` elements.
    pub fn split_at(self, mid: usize) -> (HostViewMut<'a>, HostViewMut<'a>) {
        match self {
            HostViewMut::F32(s) => {
                let (a, b) = s.split_at_mut(mid);
                (HostViewMut::F32(a), HostViewMut::F32(b))
            }
            HostViewMut::F64(s) => {
                let (a, b) = s.split_at_mut(mid);
                (HostViewMut::F64(a), HostViewMut::F64(b))
            }
        }
    }
    /// Typed access; `None` when the dtype differs.
    pub fn typed<T: Float>(self) -> Option<&'a mut [T]> {
        match self {
            HostViewMut::F32(s) if T::DTYPE == DType::F32 => Some(bytemuck::cast_slice_mut(s)),
            HostViewMut::F64(s) if T::DTYPE == DType::F64 => Some(bytemuck::cast_slice_mut(s)),
            _ => None,
        }
    }
}

impl<'a> From<&'a [f32]> for HostView<'a> {
    fn from(s: &'a [f32]) -> Self {
        HostView::F32(s)
    }
}
impl<'a> From<&'a [f64]> for HostView<'a> {
    fn from(s: &'a [f64]) -> Self {
        HostView::F64(s)
    }
}
impl<'a> From<&'a mut [f32]> for HostViewMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        HostViewMut::F32(s)
    }
}
impl<'a> From<&'a mut [f64]> for HostViewMut<'a> {
    fn from(s: &'a mut [f64]) -> Self {
        HostViewMut::F64(s)
    }
}
impl<'a> From<&'a Vec<f32>> for HostView<'a> {
    fn from(s: &'a Vec<f32>) -> Self {
        HostView::F32(s)
    }
}
impl<'a> From<&'a Vec<f64>> for HostView<'a> {
    fn from(s: &'a Vec<f64>) -> Self {
        HostView::F64(s)
    }
}
impl<'a> From<&'a mut Vec<f32>> for HostViewMut<'a> {
    fn from(s: &'a mut Vec<f32>) -> Self {
        HostViewMut::F32(s)
    }
}
impl<'a> From<&'a mut Vec<f64>> for HostViewMut<'a> {
    fn from(s: &'a mut Vec<f64>) -> Self {
        HostViewMut::F64(s)
    }
}
