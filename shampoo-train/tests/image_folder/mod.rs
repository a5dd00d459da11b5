//! Generated ImageNet-layout folders for the tests: small JPEGs tinted by
//! class, and the odd files ImageNet holds (CMYK and greyscale JPEGs, a PNG
//! named `.JPEG`) and a corrupt one.
#![allow(dead_code)]

use shampoo_train::rng::SplitMix64;
use std::path::{Path, PathBuf};

/// Class folder names.
pub const CLASSES: [&str; 3] = ["n01_red", "n02_green", "n03_blue"];

/// `root/{train,val}/<class>/*.jpg`: `per_class` training images and 2
/// validation images per class, of varying sizes, tinted by class.
pub fn make_folder(root: &Path, per_class: usize) {
    let mut rng = SplitMix64::new(11);
    for (split, n) in [("train", per_class), ("val", 2)] {
        for (c, name) in CLASSES.iter().enumerate() {
            let dir = root.join(split).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let (w, h) = (36 + rng.below(20) as u32, 30 + rng.below(20) as u32);
                let mut img = image::RgbImage::new(w, h);
                for px in img.pixels_mut() {
                    let mut v = [rng.below(90) as u8; 3];
                    v[c] = 150 + rng.below(100) as u8;
                    *px = image::Rgb(v);
                }
                img.save(dir.join(format!("img{i}.jpg"))).unwrap();
            }
        }
    }
}

/// The odd files of [`add_odd_files`].
#[derive(Debug, Clone)]
pub struct OddFiles {
    /// Adobe CMYK JPEG (inverted, APP14 transform 0), uniform red.
    pub cmyk: PathBuf,
    /// Adobe YCCK JPEG (APP14 transform 2), uniform red.
    pub ycck: PathBuf,
    /// One-component (greyscale) JPEG.
    pub grey: PathBuf,
    /// A PNG named `.JPEG`, and its pixels.
    pub png: PathBuf,
    /// The PNG's pixels (lossless).
    pub png_pixels: image::RgbImage,
}

/// Writes a CMYK (or YCCK) JPEG of `w x h` pixels of one ink colour.
pub fn write_cmyk(path: &Path, w: u16, h: u16, ink: [u8; 4], ycck: bool) {
    let data: Vec<u8> = (0..w as usize * h as usize).flat_map(|_| ink).collect();
    let color = if ycck {
        jpeg_encoder::ColorType::CmykAsYcck
    } else {
        jpeg_encoder::ColorType::Cmyk
    };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&data, w, h, color)
        .unwrap();
    std::fs::write(path, out).unwrap();
}

/// Adds the odd files to `root/train/<class>` (the class a file's colour
/// suggests does not matter): red CMYK and YCCK JPEGs in the red class, a
/// greyscale JPEG in the green class, a PNG named `.JPEG` in the blue class.
/// Their names sort after the generated `img*.jpg`.
pub fn add_odd_files(root: &Path) -> OddFiles {
    let train = root.join("train");
    let red = [0, 255, 255, 0]; // C, M, Y, K ink
    let cmyk = train.join(CLASSES[0]).join("x_cmyk.JPEG");
    write_cmyk(&cmyk, 45, 40, red, false);
    let ycck = train.join(CLASSES[0]).join("y_ycck.JPEG");
    write_cmyk(&ycck, 41, 44, red, true);

    let grey = train.join(CLASSES[1]).join("x_grey.JPEG");
    let g = image::GrayImage::from_fn(50, 38, |x, y| image::Luma([(x * 4 + y) as u8]));
    g.save_with_format(&grey, image::ImageFormat::Jpeg).unwrap();

    let png = train.join(CLASSES[2]).join("x_png.JPEG");
    let png_pixels = image::RgbImage::from_fn(44, 36, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
    });
    png_pixels
        .save_with_format(&png, image::ImageFormat::Png)
        .unwrap();
    OddFiles {
        cmyk,
        ycck,
        grey,
        png,
        png_pixels,
    }
}

/// Writes a file that starts like a JPEG and then is not one.
pub fn write_corrupt(path: &Path) {
    std::fs::write(path, b"\xff\xd8\xff\xe0 this is not a JPEG").unwrap();
}

/// Threads of this process now.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits (up to 5 s) until the process has `n` threads; returns the count.
pub fn settle_threads(n: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = thread_count();
        if now == n || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
