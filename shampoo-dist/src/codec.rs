//! Packing directions and parameter blocks into the all-gather's wire
//! format, and back.
//!
//! - Full precision: the parameters' own bytes (little-endian host order).
//! - 16-bit: each element rounded to nearest (ties to even) bf16 or f16.
//!
//! Rank slots are padded with zeros to the longest slot.

use half::{bf16, f16};
use shampoo_core::layout::Layout;
use shampoo_core::{HostView, HostViewMut};

use crate::comm::CommDType;
use crate::optimizer::HostVec;

fn raw(v: HostView<'_>) -> &[u8] {
    match v {
        HostView::F32(x) => bytemuck::cast_slice(x),
        HostView::F64(x) => bytemuck::cast_slice(x),
    }
}

/// `send = bytes of dirs`, zero-padded.
pub(crate) fn pack_full(dirs: HostView<'_>, send: &mut [u8]) {
    let b = raw(dirs);
    send[..b.len()].copy_from_slice(b);
    send[b.len()..].fill(0);
}

/// Rounds one value to the 16-bit wire type.
pub(crate) fn encode(x: f64, c: CommDType) -> u16 {
    match c {
        CommDType::Bf16 => bf16::from_f64(x).to_bits(),
        CommDType::F16 | CommDType::F32 => f16::from_f64(x).to_bits(),
    }
}

fn encode32(x: f32, c: CommDType) -> u16 {
    match c {
        CommDType::Bf16 => bf16::from_f32(x).to_bits(),
        CommDType::F16 | CommDType::F32 => f16::from_f32(x).to_bits(),
    }
}

/// Widens one 16-bit wire value.
pub(crate) fn decode(b: u16, c: CommDType) -> f64 {
    match c {
        CommDType::Bf16 => bf16::from_bits(b).to_f64(),
        CommDType::F16 | CommDType::F32 => f16::from_bits(b).to_f64(),
    }
}

fn decode32(b: u16, c: CommDType) -> f32 {
    match c {
        CommDType::Bf16 => bf16::from_bits(b).to_f32(),
        CommDType::F16 | CommDType::F32 => f16::from_bits(b).to_f32(),
    }
}

/// `send` = dirs rounded to 16 bits (little-endian), zero-padded.
pub(crate) fn pack_16(dirs: HostView<'_>, c: CommDType, send: &mut [u8]) {
    let mut out = send.chunks_exact_mut(2);
    match dirs {
        HostView::F32(x) => {
            for (&v, o) in x.iter().zip(&mut out) {
                o.copy_from_slice(&encode32(v, c).to_le_bytes());
            }
        }
        HostView::F64(x) => {
            for (&v, o) in x.iter().zip(&mut out) {
                o.copy_from_slice(&encode(v, c).to_le_bytes());
            }
        }
    }
    for o in out {
        o.fill(0);
    }
}

/// `dst[start + i] = decode(src[i])`. The wire's byte order is little-endian;
/// `src` was filled with the received bytes.
pub(crate) fn unpack_16(src: &[u16], c: CommDType, dst: &mut HostVec, start: usize) {
    match dst {
        HostVec::F32(d) => {
            for (o, &b) in d[start..start + src.len()].iter_mut().zip(src) {
                *o = decode32(u16::from_le(b), c);
            }
        }
        HostVec::F64(d) => {
            for (o, &b) in d[start..start + src.len()].iter_mut().zip(src) {
                *o = decode(u16::from_le(b), c);
            }
        }
    }
}

/// Copies `src` to the start of `dst` (same dtype).
pub(crate) fn copy_into(src: HostView<'_>, dst: &mut HostVec) {
    match (src, dst) {
        (HostView::F32(s), HostVec::F32(d)) => d[..s.len()].copy_from_slice(s),
        (HostView::F64(s), HostVec::F64(d)) => d[..s.len()].copy_from_slice(s),
        _ => unreachable!("the optimizer's buffers share the parameters' dtype"),
    }
}

/// Packs the parameter values of `blocks` into `send` at `offsets` (in
/// elements), in the parameters' dtype.
pub(crate) fn pack_blocks(
    params: &mut [HostViewMut<'_>],
    layout: &Layout,
    blocks: &[usize],
    offsets: &[Option<usize>],
    send: &mut [u8],
) {
    for &id in blocks {
        let b = &layout.blocks[id];
        let base = offsets[id].expect("own block has an offset");
        let src = raw(params[b.param].as_view());
        let size = params[b.param].as_view().dtype().size();
        b.for_each_run(|src_off, dst_off, len| {
            let d = (base + dst_off) * size;
            send[d..d + len * size].copy_from_slice(&src[src_off * size..(src_off + len) * size]);
        });
    }
}

/// Copies every block's parameter values from `gathered` at `offsets` into
/// `params`.
pub(crate) fn unpack_blocks(
    gathered: HostView<'_>,
    layout: &Layout,
    offsets: &[usize],
    params: &mut [HostViewMut<'_>],
) {
    for (id, b) in layout.blocks.iter().enumerate() {
        let base = offsets[id];
        match (gathered, params[b.param].reborrow()) {
            (HostView::F32(g), HostViewMut::F32(p)) => b.for_each_run(|s, d, len| {
                p[s..s + len].copy_from_slice(&g[base + d..base + d + len]);
            }),
            (HostView::F64(g), HostViewMut::F64(p)) => b.for_each_run(|s, d, len| {
                p[s..s + len].copy_from_slice(&g[base + d..base + d + len]);
            }),
            _ => unreachable!("parameters were checked against the optimizer's dtype"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_within_half_an_ulp() {
        for &x in &[1.0f32, -2.5e-2, 1e-3, 6.5e4, -2.0e-7] {
            let y = decode32(encode32(x, CommDType::Bf16), CommDType::Bf16);
            assert!(((y - x) / x).abs() <= 2f32.powi(-8), "{x} -> {y}");
        }
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: ties go to even (1).
        let tie = 1.0 + 2f32.powi(-8);
        assert_eq!(
            decode32(encode32(tie, CommDType::Bf16), CommDType::Bf16),
            1.0
        );
    }

    #[test]
    fn f16_error_is_within_2_pow_minus_11_in_its_normal_range() {
        for &x in &[1.0f64, -2.5e-2, 1e-3, 6.5e4, 7e-5] {
            let y = decode(encode(x, CommDType::F16), CommDType::F16);
            assert!(((y - x) / x).abs() <= 2f64.powi(-11), "{x} -> {y}");
        }
        assert!(decode(encode(1e6, CommDType::F16), CommDType::F16).is_infinite());
    }
}
