//! Crops, resizes and flips, written straight into a batch slice.
//!
//! Resizing is fast_image_resize's convolution with the bilinear (triangle)
//! filter widened by the downscaling factor: antialiased, as PIL and
//! torchvision (`antialias=True`) resize. Training crops are cut first and
//! resized on their own (the filter never reads outside the crop, as in
//! torchvision's `RandomResizedCrop`); validation images are resized whole
//! and centre-cropped in the same pass (only the kept pixels are computed).

use crate::rng::SplitMix64;
use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

/// A rectangle of an image: left, top, width, height in pixels.
pub type CropBox = (u32, u32, u32, u32);

/// torchvision's `RandomResizedCrop` box: scale `[0.08, 1]`, aspect ratio
/// `[3/4, 4/3]` (log-uniform), ten tries, then a centre square crop.
pub fn random_resized_crop(width: u32, height: u32, rng: &mut SplitMix64) -> CropBox {
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

/// The size an image of `width x height` is resized to before a centre crop
/// of `side`: the shorter side becomes `short`, the longer one keeps the
/// aspect ratio (at least `side`).
pub fn resize_shorter_side(width: u32, height: u32, short: u32, side: u32) -> (u32, u32) {
    if width <= height {
        let h = (height as f64 * short as f64 / width as f64).round() as u32;
        (short, h.max(side))
    } else {
        let w = (width as f64 * short as f64 / height as f64).round() as u32;
        (w.max(side), short)
    }
}

fn pixel_type(channels: usize) -> PixelType {
    match channels {
        1 => PixelType::U8,
        3 => PixelType::U8x3,
        4 => PixelType::U8x4,
        c => panic!("{c} channels: only 1, 3 or 4 are supported"),
    }
}

fn bilinear() -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
}

/// Resizes the box `crop` of `src` (`width x height`, `channels` bytes a
/// pixel) to `side x side` into `out`.
pub fn resized_crop(
    resizer: &mut Resizer,
    src: &[u8],
    (width, height): (u32, u32),
    channels: usize,
    crop: CropBox,
    side: u32,
    out: &mut [u8],
) -> Result<(), String> {
    let pt = pixel_type(channels);
    let src = ImageRef::new(width, height, src, pt).map_err(|e| e.to_string())?;
    let (x, y, w, h) = crop;
    let cropped = CroppedImage::new(&src, x, y, w, h).map_err(|e| e.to_string())?;
    let mut dst = Image::from_slice_u8(side, side, out, pt).map_err(|e| e.to_string())?;
    resizer
        .resize(&cropped, &mut dst, &bilinear())
        .map_err(|e| e.to_string())
}

/// Resizes `src` so that its shorter side is `short` pixels and writes the
/// centre `side x side` square of the result into `out` (the crop offset is
/// rounded down to whole pixels of the resized image).
pub fn resized_center_crop(
    resizer: &mut Resizer,
    src: &[u8],
    (width, height): (u32, u32),
    channels: usize,
    short: u32,
    side: u32,
    out: &mut [u8],
) -> Result<(), String> {
    let pt = pixel_type(channels);
    let (nw, nh) = resize_shorter_side(width, height, short, side);
    let (sx, sy) = (width as f64 / nw as f64, height as f64 / nh as f64);
    let (ox, oy) = ((nw - side) / 2, (nh - side) / 2);
    let src = ImageRef::new(width, height, src, pt).map_err(|e| e.to_string())?;
    let mut dst = Image::from_slice_u8(side, side, out, pt).map_err(|e| e.to_string())?;
    // Resizing the box [ox, ox + side) of the `nw`-wide result is resizing
    // the source span [ox * sx, (ox + side) * sx) with the same scale: the
    // filter taps are those of the whole resize, clamped to the image.
    let opts = bilinear().crop(
        ox as f64 * sx,
        oy as f64 * sy,
        side as f64 * sx,
        side as f64 * sy,
    );
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| e.to_string())
}

/// Mirrors an HWC image of `width` pixels of `channels` bytes left to right,
/// in place.
pub fn flip_horizontal(pixels: &mut [u8], width: usize, channels: usize) {
    fn flip<const C: usize>(pixels: &mut [u8], width: usize) {
        let (px, _) = pixels.as_chunks_mut::<C>();
        for row in px.chunks_exact_mut(width) {
            row.reverse();
        }
    }
    match channels {
        1 => flip::<1>(pixels, width),
        3 => flip::<3>(pixels, width),
        4 => flip::<4>(pixels, width),
        c => panic!("{c} channels: only 1, 3 or 4 are supported"),
    }
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

    #[test]
    fn flip_mirrors_every_row() {
        let mut px: Vec<u8> = (0..2 * 3 * 3).map(|v| v as u8).collect();
        flip_horizontal(&mut px, 3, 3);
        assert_eq!(
            px,
            [6, 7, 8, 3, 4, 5, 0, 1, 2, 15, 16, 17, 12, 13, 14, 9, 10, 11]
        );
        let mut grey: Vec<u8> = (0..8).collect();
        flip_horizontal(&mut grey, 4, 1);
        assert_eq!(grey, [3, 2, 1, 0, 7, 6, 5, 4]);
    }

    /// A smooth gradient image, RGB.
    fn gradient(w: u32, h: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                v.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]);
            }
        }
        v
    }

    #[test]
    fn center_crop_in_one_pass_matches_resize_then_crop() {
        let (w, h, short, side) = (50u32, 37u32, 18u32, 16u32);
        let src = gradient(w, h);
        let mut r = Resizer::new();
        let mut one = vec![0u8; (side * side * 3) as usize];
        resized_center_crop(&mut r, &src, (w, h), 3, short, side, &mut one).unwrap();

        let (nw, nh) = resize_shorter_side(w, h, short, side);
        let mut full = vec![0u8; (nw * nh * 3) as usize];
        let img = ImageRef::new(w, h, &src, PixelType::U8x3).unwrap();
        let mut dst = Image::from_slice_u8(nw, nh, &mut full, PixelType::U8x3).unwrap();
        r.resize(&img, &mut dst, &bilinear()).unwrap();
        let (ox, oy) = ((nw - side) / 2, (nh - side) / 2);
        let mut two = Vec::new();
        for y in oy..oy + side {
            let s = ((y * nw + ox) * 3) as usize;
            two.extend_from_slice(&full[s..s + (side * 3) as usize]);
        }
        assert_eq!(one, two);
    }

    #[test]
    fn crop_of_the_whole_image_at_its_size_is_a_copy() {
        let src = gradient(20, 20);
        let mut out = vec![0u8; src.len()];
        resized_crop(
            &mut Resizer::new(),
            &src,
            (20, 20),
            3,
            (0, 0, 20, 20),
            20,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, src);
    }
}
