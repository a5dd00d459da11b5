//! 16-bit communication formats ([`WireJob`]): correctly rounded conversion
//! between binary floating-point formats on their bit patterns.
//!
//! The same integer algorithm is `kernels/wire.cu` (the CUDA backend's
//! kernels): a value `sig * 2^e` (integer significand) is re-quantised to
//! the target's quantum `2^t`, `t = max(E, emin) - m` (`E` the value's
//! exponent, `emin` the target's smallest normal exponent, `m` its mantissa
//! bits), rounding the dropped bits to nearest, ties to even. The target's
//! bit pattern is then `((t + m + bias - 1) << m) + q`, which also covers
//! subnormal results (`q < 2^m`) and a round-up into the next binade;
//! patterns from the all-ones exponent up are infinity.

use super::CpuBackend;
use crate::backend::{WireFormat, WireJob, wire16_len};
use crate::{Error, HostView, HostViewMut, Result};

/// A binary floating-point format: mantissa and exponent bit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Format {
    mant: u32,
    exp: u32,
}

/// IEEE binary32.
pub(crate) const F32: Format = Format { mant: 23, exp: 8 };
/// IEEE binary64.
pub(crate) const F64: Format = Format { mant: 52, exp: 11 };
/// bfloat16.
pub(crate) const BF16: Format = Format { mant: 7, exp: 8 };
/// IEEE binary16.
pub(crate) const F16: Format = Format { mant: 10, exp: 5 };
/// TensorFloat-32 (float32's range, 10 mantissa bits).
pub(crate) const TF32: Format = Format { mant: 10, exp: 8 };

/// `x` rounded to `to`'s precision (to nearest, ties to even) and back: a
/// float32 operand as a reduced-precision matrix unit reads it.
pub(crate) fn round_f32(x: f32, to: Format) -> f32 {
    let narrow = convert(u64::from(x.to_bits()), F32, to);
    f32::from_bits(convert(narrow, to, F32) as u32)
}

impl WireFormat {
    pub(crate) fn format(self) -> Format {
        match self {
            WireFormat::Bf16 => BF16,
            WireFormat::F16 => F16,
        }
    }
}

/// The bit pattern of `bits` (in format `from`) converted to format `to`,
/// rounded to nearest, ties to even.
pub(crate) fn convert(bits: u64, from: Format, to: Format) -> u64 {
    let fbias = (1i64 << (from.exp - 1)) - 1;
    let tbias = (1i64 << (to.exp - 1)) - 1;
    let sign = (bits >> (from.mant + from.exp)) & 1;
    let exp = ((bits >> from.mant) & ((1u64 << from.exp) - 1)) as i64;
    let man = bits & ((1u64 << from.mant) - 1);
    let tsign = sign << (to.mant + to.exp);
    let tinf = ((1u64 << to.exp) - 1) << to.mant;
    if exp == (1i64 << from.exp) - 1 {
        if man == 0 {
            return tsign | tinf;
        }
        // NaN: quiet, with the leading payload bits.
        let payload = if to.mant >= from.mant {
            man << (to.mant - from.mant)
        } else {
            man >> (from.mant - to.mant)
        };
        return tsign | tinf | (1u64 << (to.mant - 1)) | payload;
    }
    if exp == 0 && man == 0 {
        return tsign;
    }
    // The value is sig * 2^e.
    let (sig, e) = if exp == 0 {
        (man, 1 - fbias - from.mant as i64)
    } else {
        (man | (1u64 << from.mant), exp - fbias - from.mant as i64)
    };
    let top = 63 - sig.leading_zeros() as i64;
    let t = (e + top).max(1 - tbias) - to.mant as i64;
    let shift = t - e;
    let q = if shift <= 0 {
        sig << (-shift)
    } else if shift >= 64 {
        0
    } else {
        let q = sig >> shift;
        let rem = sig & ((1u64 << shift) - 1);
        let half = 1u64 << (shift - 1);
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    let biased = t + to.mant as i64 + tbias - 1;
    if biased >= (1i64 << to.exp) - 1 {
        return tsign | tinf;
    }
    let out = ((biased as u64) << to.mant) + q;
    tsign | out.min(tinf)
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// Parallel tasks: `(cost, (input chunk, output chunk))`.
type Tasks<'a, A, B> = Vec<(u64, (&'a [A], &'a mut [B]))>;

fn pack<T: Copy + Send + Sync>(
    be: &CpuBackend,
    src: &[T],
    wire: &mut [u16],
    bits: impl Fn(T) -> u64 + Sync,
    from: Format,
    to: Format,
) {
    let (head, pad) = wire.split_at_mut(src.len());
    pad.fill(0);
    let tasks: Tasks<'_, T, u16> = src
        .chunks(CHUNK)
        .zip(head.chunks_mut(CHUNK))
        .map(|t| (t.0.len() as u64, t))
        .collect();
    be.run(
        tasks,
        |(s, w)| {
            for (o, &x) in w.iter_mut().zip(s) {
                *o = convert(bits(x), from, to) as u16;
            }
        },
        Vec::<(u64, ())>::new(),
        |()| {},
    );
}

fn unpack<T: Copy + Send + Sync>(
    be: &CpuBackend,
    wire: &[u16],
    dst: &mut [T],
    value: impl Fn(u64) -> T + Sync,
    from: Format,
    to: Format,
) {
    let tasks: Tasks<'_, u16, T> = wire[..dst.len()]
        .chunks(CHUNK)
        .zip(dst.chunks_mut(CHUNK))
        .map(|t| (t.0.len() as u64, t))
        .collect();
    be.run(
        tasks,
        |(w, d)| {
            for (o, &x) in d.iter_mut().zip(w) {
                *o = value(convert(u64::from(x), from, to));
            }
        },
        Vec::<(u64, ())>::new(),
        |()| {},
    );
}

/// Checks that a wire view of `wire_len` elements holds `n` 16-bit values.
pub(crate) fn check_wire(
    dtype: crate::DType,
    wire_dtype: crate::DType,
    wire_len: usize,
    n: usize,
) -> Result<()> {
    if wire_dtype != dtype {
        return Err(Error::backend(
            "wire",
            format!("wire buffer is {wire_dtype}, the values are {dtype}"),
        ));
    }
    let need = wire16_len(dtype, n);
    if wire_len < need {
        return Err(Error::backend(
            "wire",
            format!(
                "wire buffer of {wire_len} {dtype} elements for {n} 16-bit values (needs {need})"
            ),
        ));
    }
    Ok(())
}

pub(super) fn wire(be: &CpuBackend, jobs: &mut [WireJob<'_, CpuBackend>]) -> Result<()> {
    for job in jobs.iter_mut() {
        match job {
            WireJob::Pack { src, wire, format } => {
                check_wire(src.dtype(), wire.dtype(), wire.len(), src.len())?;
                let to = format.format();
                match (*src, super::take_mut(wire)) {
                    (HostView::F32(s), HostViewMut::F32(w)) => {
                        let w: &mut [u16] = bytemuck::cast_slice_mut(w);
                        pack(be, s, w, |x: f32| u64::from(x.to_bits()), F32, to);
                    }
                    (HostView::F64(s), HostViewMut::F64(w)) => {
                        let w: &mut [u16] = bytemuck::cast_slice_mut(w);
                        pack(be, s, w, f64::to_bits, F64, to);
                    }
                    _ => unreachable!("dtypes checked"),
                }
            }
            WireJob::Unpack { wire, dst, format } => {
                check_wire(dst.dtype(), wire.dtype(), wire.len(), dst.len())?;
                let from = format.format();
                match (*wire, super::take_mut(dst)) {
                    (HostView::F32(w), HostViewMut::F32(d)) => {
                        let w: &[u16] = bytemuck::cast_slice(w);
                        unpack(be, w, d, |b| f32::from_bits(b as u32), from, F32);
                    }
                    (HostView::F64(w), HostViewMut::F64(d)) => {
                        let w: &[u16] = bytemuck::cast_slice(w);
                        unpack(be, w, d, f64::from_bits, from, F64);
                    }
                    _ => unreachable!("dtypes checked"),
                }
            }
        }
    }
    Ok(())
}

/// Also used by the tests of the CUDA kernels (compiled for the host), which
/// compare the kernels bit for bit against this job.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use half::{bf16, f16};

    /// Every value of a 16-bit format, as f64 (NaNs excluded), ascending.
    fn table(f: Format) -> Vec<(f64, u16)> {
        let mut v: Vec<(f64, u16)> = (0..=u16::MAX)
            .map(|b| (f64::from_bits(convert(u64::from(b), f, F64)), b))
            // Magnitudes decide; -0 would tie with +0.
            .filter(|(x, b)| !x.is_nan() && *b != 1u16 << (f.mant + f.exp))
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        v
    }

    /// Round to nearest, ties to even, by search over every finite value:
    /// an oracle independent of `convert`'s arithmetic (apart from exact
    /// widening, which the f32 cases check against `half`).
    fn oracle(x: f64, f: Format, t: &[(f64, u16)]) -> u16 {
        let max = t.iter().rev().find(|v| v.0.is_finite()).unwrap();
        let sign_bit = 1u16 << (f.mant + f.exp);
        if x == 0.0 {
            return if x.is_sign_negative() { sign_bit } else { 0 };
        }
        if x.is_infinite() {
            return if x > 0.0 { t.last().unwrap().1 } else { t[0].1 };
        }
        let a = x.abs();
        // The overflow threshold: max + half an ulp of max, ties to even
        // (max's mantissa is odd, so the tie goes up to infinity).
        let ulp = max.0 - f64::from_bits(convert(u64::from(max.1 - 1), f, F64));
        let r = if a >= max.0 + ulp / 2.0 {
            ((1u16 << f.exp) - 1) << f.mant
        } else {
            let i = t.partition_point(|v| v.0 <= a);
            let (lo, hi) = (t[i - 1], t[i]);
            let (dl, dh) = (a - lo.0, hi.0 - a);
            if dl < dh || (dl == dh && lo.1 & 1 == 0) {
                lo.1
            } else {
                hi.1
            }
        };
        if x < 0.0 { r | sign_bit } else { r }
    }

    fn samples() -> Vec<f64> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            3.4e38,
            f64::MAX,
            f64::MIN_POSITIVE,
            5.96e-8,
            2.98e-8,
            2f64.powi(-25), // half of f16's smallest subnormal
            2f64.powi(-25) * (1.0 + 1e-12),
            9.2e-41,
            1.0 + 2f64.powi(-8),
            1.0 + 2f64.powi(-8) + 2f64.powi(-40),
            1.0 + 2f64.powi(-11),
            1.0 + 2f64.powi(-11) + 2f64.powi(-45),
            1.0 + 3.0 * 2f64.powi(-11),
        ];
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Exponents across both formats' ranges and beyond.
            let e = (x % 200) as i32 - 140;
            let m = 1.0 + (x >> 12) as f64 / (1u64 << 52) as f64;
            let s = if x & 1 == 1 { -1.0 } else { 1.0 };
            v.push(s * m * 2f64.powi(e));
        }
        v
    }

    #[test]
    fn f64_rounding_equals_an_exhaustive_nearest_even_search() {
        for (f, name) in [(BF16, "bf16"), (F16, "f16")] {
            let t = table(f);
            for x in samples() {
                let got = convert(x.to_bits(), F64, f) as u16;
                let want = oracle(x, f, &t);
                assert_eq!(got, want, "{name}: {x:e}");
            }
        }
    }

    #[test]
    fn f32_rounding_and_widening_equal_the_half_crate() {
        let mut xs: Vec<f32> = samples().iter().map(|&x| x as f32).collect();
        xs.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        xs.push(f32::from_bits(0x7f80_0001)); // signalling NaN
        xs.push(f32::from_bits(0xffc1_2345));
        for x in xs {
            let b = u64::from(x.to_bits());
            assert_eq!(
                convert(b, F32, BF16) as u16,
                bf16::from_f32(x).to_bits(),
                "bf16 {x:e} ({:#x})",
                x.to_bits()
            );
            assert_eq!(
                convert(b, F32, F16) as u16,
                f16::from_f32(x).to_bits(),
                "f16 {x:e} ({:#x})",
                x.to_bits()
            );
        }
        for h in 0..=u16::MAX {
            let w = u64::from(h);
            assert_eq!(
                convert(w, BF16, F32) as u32,
                bf16::from_bits(h).to_f32().to_bits(),
                "bf16 {h:#x} -> f32"
            );
            assert_eq!(
                convert(w, F16, F32) as u32,
                f16::from_bits(h).to_f32().to_bits(),
                "f16 {h:#x} -> f32"
            );
            let (b64, f64_) = (convert(w, BF16, F64), convert(w, F16, F64));
            let (b32, f32_) = (convert(w, BF16, F32), convert(w, F16, F32));
            // Widening to f64 is the same value as widening to f32.
            for (wide, narrow) in [(b64, b32), (f64_, f32_)] {
                let (wide, narrow) = (f64::from_bits(wide), f32::from_bits(narrow as u32));
                assert_eq!(wide.is_nan(), narrow.is_nan(), "{h:#x}");
                if !wide.is_nan() {
                    assert_eq!(wide.to_bits(), f64::from(narrow).to_bits(), "{h:#x}");
                }
            }
            // Round trips are exact (NaNs come back quiet).
            let quiet = |f: Format| {
                let nan = (w >> f.mant) & ((1 << f.exp) - 1) == (1 << f.exp) - 1
                    && w & ((1 << f.mant) - 1) != 0;
                if nan { w | 1 << (f.mant - 1) } else { w }
            };
            assert_eq!(convert(b64, F64, BF16), quiet(BF16), "{h:#x}");
            assert_eq!(convert(f64_, F64, F16), quiet(F16), "{h:#x}");
        }
    }

    #[test]
    fn the_job_packs_pads_with_zeros_and_unpacks() {
        let be = CpuBackend::new(2).unwrap();
        let src: Vec<f32> = (0..7).map(|i| 0.3 * i as f32 - 1.0).collect();
        // 7 values in 5 f32 elements: 3 spare 16-bit slots, set to zero.
        let mut w = vec![f32::from_bits(u32::MAX); 5];
        be.wire(&mut [WireJob::Pack {
            src: HostView::F32(&src),
            wire: HostViewMut::F32(&mut w),
            format: WireFormat::Bf16,
        }])
        .unwrap();
        let halves: &[u16] = bytemuck::cast_slice(&w);
        for (i, &x) in src.iter().enumerate() {
            assert_eq!(halves[i], bf16::from_f32(x).to_bits());
        }
        assert_eq!(&halves[7..], &[0, 0, 0]);
        let mut back = vec![0f32; 7];
        be.wire(&mut [WireJob::Unpack {
            wire: HostView::F32(&w),
            dst: HostViewMut::F32(&mut back),
            format: WireFormat::Bf16,
        }])
        .unwrap();
        for (b, &x) in back.iter().zip(&src) {
            assert_eq!(*b, bf16::from_f32(x).to_f32());
        }
        let err = be
            .wire(&mut [WireJob::Pack {
                src: HostView::F32(&src),
                wire: HostViewMut::F32(&mut w[..3]),
                format: WireFormat::F16,
            }])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend error in wire: wire buffer of 3 f32 elements for 7 16-bit values (needs 4)"
        );
    }
}
