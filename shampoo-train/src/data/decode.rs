//! Image files to RGB8 pixels.
//!
//! JPEGs are decoded with zune-jpeg (SIMD IDCT and colour conversion, one
//! thread, into a buffer the caller reuses). Files zune-jpeg refuses, and
//! files that are not JPEGs at all whatever their name (ImageNet's training
//! set holds a PNG named `.JPEG`), go to the `image` crate, which also reads
//! PNG. Greyscale and CMYK JPEGs (ImageNet holds both) come out as RGB from
//! zune-jpeg directly.

use std::io::Read;
use std::path::Path;
use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// Which decoder produced an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// zune-jpeg.
    ZuneJpeg,
    /// The `image` crate (the fallback).
    Image,
}

/// A decoded image: `width * height * 3` bytes of RGB8 at the start of the
/// caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The decoder that read it.
    pub decoder: Decoder,
}

/// Reads the file at `path` into `buf` (cleared first; its capacity is
/// reused).
pub fn read_file(path: &Path, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    let mut f = std::fs::File::open(path)?;
    if let Ok(meta) = f.metadata() {
        buf.reserve(meta.len() as usize);
    }
    f.read_to_end(buf)?;
    Ok(())
}

/// Decodes an encoded image into RGB8 in `pixels` (resized to fit; its
/// capacity is reused). The error says why neither decoder could read it.
pub fn decode_rgb(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<Decoded, String> {
    let zune_err = if bytes.starts_with(&[0xff, 0xd8]) {
        match decode_jpeg(bytes, pixels) {
            Ok(d) => return Ok(d),
            Err(e) => Some(e),
        }
    } else {
        None
    };
    match image::load_from_memory(bytes) {
        Ok(img) => {
            let rgb = img.to_rgb8();
            let (width, height) = rgb.dimensions();
            pixels.clear();
            pixels.extend_from_slice(rgb.as_raw());
            Ok(Decoded {
                width,
                height,
                decoder: Decoder::Image,
            })
        }
        Err(e) => Err(match zune_err {
            Some(z) => format!("zune-jpeg: {z}; image: {e}"),
            None => e.to_string(),
        }),
    }
}

fn decode_jpeg(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<Decoded, String> {
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = JpegDecoder::new_with_options(bytes, options);
    dec.decode_headers().map_err(|e| e.to_string())?;
    let (w, h) = dec.dimensions().ok_or("no dimensions after the headers")?;
    // zune-jpeg 0.4 decodes one-component (greyscale) JPEGs to one channel
    // whatever the output colour space asked for; they are widened below.
    let channels = dec
        .get_output_colorspace()
        .map_or(0, |c| c.num_components());
    if channels != 3 && channels != 1 {
        return Err(format!("zune-jpeg would give {channels} channels"));
    }
    let size = w * h * 3;
    // Only grows: a buffer that held a larger image is reused as is.
    if pixels.len() < size {
        pixels.resize(size, 0);
    }
    dec.decode_into(&mut pixels[..w * h * channels])
        .map_err(|e| e.to_string())?;
    if channels == 1 {
        grey_to_rgb_in_place(&mut pixels[..size]);
    }
    Ok(Decoded {
        width: w as u32,
        height: h as u32,
        decoder: Decoder::ZuneJpeg,
    })
}

/// Widens `n` grey bytes at the start of a `3 n`-byte buffer to RGB, from
/// the end backwards so that nothing is overwritten before it is read.
fn grey_to_rgb_in_place(px: &mut [u8]) {
    let n = px.len() / 3;
    for i in (0..n).rev() {
        let v = px[i];
        px[3 * i..3 * i + 3].fill(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_widens_to_rgb_in_place() {
        let mut px = vec![1, 2, 3, 0, 0, 0, 0, 0, 0];
        grey_to_rgb_in_place(&mut px);
        assert_eq!(px, [1, 1, 1, 2, 2, 2, 3, 3, 3]);
    }
}
