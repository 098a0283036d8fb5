//! Image bytes to the model's input pixels: decode, resize the shorter side (antialiased
//! bilinear) and center-crop, exactly as torchvision's `Resize(resize) -> CenterCrop(crop)` does
//! on a PIL image. Scaling to [0, 1] and normalising with the model's mean and std
//! (`ToTensor() -> Normalize(mean, std)`) happen on the whole batch in the model
//! ([`crate::model`]), so a queued image is 8-bit RGB: a quarter of the memory of floats.
//!
//! Pure functions with no I/O and no libtorch: the output is a plain `Vec<u8>` in HWC order
//! (the natural order of decoded pixels), which the model turns into NCHW or channels-last.
//! This room owns the [`Preprocessor`] the server calls (its settings, the header probe and the
//! memory a decode takes, the choice between a scaled and a full decode); [`decode`] turns
//! bytes into RGB pixels, [`resize`] turns those into the model's crop.

mod decode;
mod resize;

use image::{DynamicImage, ImageDecoder, ImageFormat, Limits};

use crate::metadata::ModelMetadata;
pub use decode::{SUPPORTED_FORMATS, decode_oriented, decode_rgb, jpeg_is_complete, sniff_format};
use decode::{decode_jpeg_scaled, format_name, probe, reader, scalable, scaled_decode_bytes};
pub use resize::{MAX_ASPECT_RATIO, center_crop_offset, resize_crop, resized_size};

/// Why an image could not be turned into the model's input. Each is the client's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image is empty")]
    Empty,
    #[error("{0}")]
    UnsupportedFormat(String),
    #[error("the image could not be decoded: {0}")]
    Undecodable(String),
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error(
        "decoding an image of {width}x{height} pixels takes {needed} bytes, more than the decoding memory budget of {budget} bytes (--decode-memory-bytes)"
    )]
    OverBudget {
        width: u32,
        height: u32,
        needed: u64,
        budget: u64,
    },
    #[error(
        "an image of {width}x{height} pixels is too long and thin to classify: its sides' ratio is over {max}:1"
    )]
    AspectRatio { width: u32, height: u32, max: u32 },
}

/// Whether the EXIF orientation tag of a photo is applied before resizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExifOrientation {
    /// Turn the photo upright, as phones and viewers show it.
    #[default]
    Apply,
    /// Use the pixels as stored, as PIL and torchvision do.
    Ignore,
}

/// Whether a large JPEG is decoded at a reduced scale inside its inverse DCT (1/2, 1/4 or 1/8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JpegScaledDecode {
    /// The smallest scale that keeps the short side at least [`SCALED_DECODE_MARGIN`] times
    /// the resize size (by libjpeg-turbo); smaller photos are decoded in full.
    Auto,
    /// Always decode in full (pixel parity with PIL and torchvision).
    #[default]
    Off,
}

/// With scaled JPEG decoding, the decoded short side stays at least this many times the
/// model's resize size, so the antialiased resize still does the last, smooth step (chosen by
/// measurement: BENCHMARKS.md, "Scaled JPEG decoding"; at 2 the top-1 answers of the pretrained
/// model agree with the full decode's but for near ties).
pub const SCALED_DECODE_MARGIN: f64 = 2.0;

/// Geometry of a model's input, and the limits on what is decoded.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub resize_size: u32,
    pub crop_size: u32,
    pub max_pixels: u64,
    pub exif: ExifOrientation,
    /// The short side a JPEG must keep when decoded at a reduced scale (None: full decode).
    pub jpeg_min_short_side: Option<u32>,
}

/// What an image's header says, before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// An upper bound of the memory decoding it takes: the decoded image in its own pixel
    /// format, the RGB copy, and the copy an orientation needs.
    pub decode_bytes: u64,
    /// What decoding it at a reduced scale takes, when the preprocessor will try that first
    /// (a large JPEG under scaled decoding); `decode_bytes` is then what the full decode it
    /// falls back to takes.
    pub scaled_decode_bytes: Option<u64>,
}

/// A preprocessed image: `crop_size * crop_size * 3` RGB bytes in HWC order.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub format: &'static str,
}

impl Preprocessor {
    pub fn new(resize_size: u32, crop_size: u32, max_pixels: u64) -> Self {
        Self {
            resize_size,
            crop_size,
            max_pixels,
            exif: ExifOrientation::default(),
            jpeg_min_short_side: None,
        }
    }

    pub fn for_model(meta: &ModelMetadata, max_pixels: u64) -> Self {
        Self::new(meta.resize_size, meta.input_size, max_pixels)
    }

    pub fn with_exif(mut self, exif: ExifOrientation) -> Self {
        self.exif = exif;
        self
    }

    /// Scaled JPEG decoding as `mode` says, with [`SCALED_DECODE_MARGIN`].
    pub fn with_jpeg_scaling(self, mode: JpegScaledDecode) -> Self {
        match mode {
            JpegScaledDecode::Auto => self.with_jpeg_margin(Some(SCALED_DECODE_MARGIN)),
            JpegScaledDecode::Off => self.with_jpeg_margin(None),
        }
    }

    /// Scaled JPEG decoding keeping the short side at least `margin` times the resize size
    /// (None: full decode).
    pub fn with_jpeg_margin(mut self, margin: Option<f64>) -> Self {
        self.jpeg_min_short_side = margin.map(|m| (f64::from(self.resize_size) * m).ceil() as u32);
        self
    }

    /// Reads the header only: the format, the dimensions (checked against the pixel limit and
    /// the aspect ratio) and what decoding will take. Never panics.
    pub fn probe(&self, bytes: &[u8]) -> Result<Probe, PreprocessError> {
        std::panic::catch_unwind(|| {
            let mut p = probe(bytes, self.max_pixels)?;
            p.scaled_decode_bytes = self.scaled_plan(bytes, &p);
            Ok(p)
        })
        .unwrap_or_else(|_| {
            Err(PreprocessError::Undecodable(
                "the decoder failed on this image's header".into(),
            ))
        })
    }

    /// What a scaled decode of this image takes, when [`Self::run_scaled_only`] will try one.
    fn scaled_plan(&self, bytes: &[u8], probe: &Probe) -> Option<u64> {
        let min_short = self.jpeg_min_short_side?;
        if probe.format != ImageFormat::Jpeg
            || probe.width.min(probe.height) < min_short.saturating_mul(2)
        {
            return None;
        }
        let header = turbojpeg::Decompressor::new()
            .ok()?
            .read_header(bytes)
            .ok()?;
        if !scalable(&header, probe) {
            return None;
        }
        scaled_decode_bytes(&header, min_short)
    }

    /// The scaled decode alone (see [`Self::run`]): `None` when the image takes the full
    /// decode ([`Self::run_full`]) instead.
    pub fn run_scaled_only(&self, bytes: &[u8]) -> Result<Option<Preprocessed>, PreprocessError> {
        let Some(min_short) = self.jpeg_min_short_side else {
            return Ok(None);
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_scaled(bytes, min_short)
        }))
        .unwrap_or_else(|_| {
            Err(PreprocessError::Undecodable(
                "the decoder failed on this image".into(),
            ))
        })
    }

    /// The full decode alone, whatever the scaled-decoding setting.
    pub fn run_full(&self, bytes: &[u8]) -> Result<Preprocessed, PreprocessError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_full_unguarded(bytes)
        }))
        .unwrap_or_else(|_| {
            Err(PreprocessError::Undecodable(
                "the decoder failed on this image".into(),
            ))
        })
    }

    /// Bytes of an encoded image to the cropped HWC pixels. Never panics: a decoder that panics
    /// on hostile input (it happens) gives an `Undecodable` error instead.
    pub fn run(&self, bytes: &[u8]) -> Result<Preprocessed, PreprocessError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_unguarded(bytes)))
            .unwrap_or_else(|_| {
                Err(PreprocessError::Undecodable(
                    "the decoder failed on this image".into(),
                ))
            })
    }

    fn run_unguarded(&self, bytes: &[u8]) -> Result<Preprocessed, PreprocessError> {
        if let Some(min_short) = self.jpeg_min_short_side
            && let Some(out) = self.run_scaled(bytes, min_short)?
        {
            return Ok(out);
        }
        self.run_full_unguarded(bytes)
    }

    fn run_full_unguarded(&self, bytes: &[u8]) -> Result<Preprocessed, PreprocessError> {
        let (rgb, format) = decode_oriented(bytes, self.max_pixels, self.exif)?;
        let (width, height) = rgb.dimensions();
        let pixels = self.crop_rgb(rgb.as_raw(), width, height)?;
        Ok(Preprocessed {
            pixels,
            width,
            height,
            format,
        })
    }

    /// A JPEG whose short side is at least twice `min_short`, decoded at the smallest DCT scale
    /// (1/2, 1/4, 1/8) that keeps its short side at least `min_short` (see
    /// [`decode_jpeg_scaled`]), then oriented, resized and cropped as usual; the reported size
    /// is the image's own. `None` for anything else (other formats, smaller photos, JPEGs that
    /// libjpeg-turbo does not decode to RGB cleanly): those take the full decode.
    fn run_scaled(
        &self,
        bytes: &[u8],
        min_short: u32,
    ) -> Result<Option<Preprocessed>, PreprocessError> {
        let probe = probe(bytes, self.max_pixels)?;
        let short = probe.width.min(probe.height);
        if probe.format != ImageFormat::Jpeg || short < min_short.saturating_mul(2) {
            return Ok(None);
        }
        if !jpeg_is_complete(bytes) {
            return Err(PreprocessError::Undecodable(
                "truncated JPEG: the data ends before the end-of-image marker".into(),
            ));
        }
        let Some(rgb) = decode_jpeg_scaled(bytes, &probe, min_short) else {
            return Ok(None);
        };
        let w = rgb.width();
        let mut img = DynamicImage::ImageRgb8(rgb);
        if self.exif == ExifOrientation::Apply
            && let Ok(mut d) = reader(bytes, probe.format, Limits::default()).into_decoder()
            && let Ok(o) = d.orientation()
        {
            img.apply_orientation(o);
        }
        let (width, height) = match img {
            // The image's own size, oriented, as the full decode reports it.
            ref i if i.width() == w => (probe.width, probe.height),
            _ => (probe.height, probe.width),
        };
        let rgb = img.into_rgb8();
        let (sw, sh) = rgb.dimensions();
        let pixels = self.crop_rgb(rgb.as_raw(), sw, sh)?;
        Ok(Some(Preprocessed {
            pixels,
            width,
            height,
            format: format_name(probe.format),
        }))
    }

    /// Interleaved RGB8 pixels to the resized, center-cropped HWC pixels.
    pub fn crop_rgb(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
    ) -> Result<Vec<u8>, PreprocessError> {
        resize::resize_crop(rgb, width, height, self.resize_size, self.crop_size)
    }
}

/// HWC RGB bytes to normalised HWC floats, `(v / 255 - mean[c]) / std[c]` in f32 as
/// torchvision's `ToTensor()` then `Normalize(mean, std)` compute it. The model does the same
/// on the batch; this is for clients of the library that want the floats themselves.
pub fn normalize(pixels: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    pixels
        .chunks_exact(3)
        .flat_map(|px| (0..3).map(move |c| (f32::from(px[c]) / 255.0 - mean[c]) / std[c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    use image::{ImageBuffer, Rgb, Rgba};
    use std::io::Cursor;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn a_scaled_decode_is_budgeted_at_its_scale() {
        let auto = pre().with_jpeg_scaling(JpegScaledDecode::Auto);
        let phone = encode(&gradient(4032, 3024), ImageFormat::Jpeg);
        let p = auto.probe(&phone).unwrap();
        let scaled = p
            .scaled_decode_bytes
            .expect("a phone photo is decoded at a scale");
        // 1/4 scale: 1008x756 RGB, its orientation copy and slack: about a tenth of the full.
        assert!(scaled >= 2 * 3 * 1008 * 756, "{scaled}");
        assert!(
            scaled * 8 < p.decode_bytes,
            "{scaled} of {}",
            p.decode_bytes
        );
        // Off, small, or not a JPEG: only the full decode.
        let off = pre().with_jpeg_scaling(JpegScaledDecode::Off);
        assert_eq!(off.probe(&phone).unwrap().scaled_decode_bytes, None);
        let small = encode(&gradient(1300, 1000), ImageFormat::Jpeg);
        assert_eq!(auto.probe(&small).unwrap().scaled_decode_bytes, None);
        let png = encode(&gradient(1600, 1200), ImageFormat::Png);
        assert_eq!(auto.probe(&png).unwrap().scaled_decode_bytes, None);
        // A progressive JPEG holds every coefficient of the full image, whatever the scale.
        let mut header = turbojpeg::Decompressor::new()
            .unwrap()
            .read_header(&phone)
            .unwrap();
        header.is_progressive = true;
        let progressive = scaled_decode_bytes(&header, 512).unwrap();
        assert!(progressive >= scaled + 3 * 4032 * 3024, "{progressive}");
        // The scaled decode alone, and the full decode alone.
        assert!(auto.run_scaled_only(&phone).unwrap().is_some());
        assert!(auto.run_scaled_only(&small).unwrap().is_none());
        assert!(off.run_scaled_only(&phone).unwrap().is_none());
        assert_eq!(
            auto.run_full(&phone).unwrap().pixels,
            off.run(&phone).unwrap().pixels
        );
    }

    #[test]
    fn scaled_jpeg_decoding_is_close_to_the_full_decode_and_only_for_large_jpegs() {
        let auto = pre().with_jpeg_scaling(JpegScaledDecode::Auto);
        let off = pre().with_jpeg_scaling(JpegScaledDecode::Off);
        assert_eq!(auto.jpeg_min_short_side, Some(512));
        assert_eq!(off.jpeg_min_short_side, None);
        // Short side 1200: decoded at 1/2 (600 >= 512). Same reported size, close pixels.
        let big = encode(&gradient(1600, 1200), ImageFormat::Jpeg);
        assert!(auto.run_scaled(&big, 512).unwrap().is_some());
        let (a, b) = (auto.run(&big).unwrap(), off.run(&big).unwrap());
        assert_eq!((a.width, a.height, a.format), (1600, 1200, "jpeg"));
        assert_eq!((b.width, b.height), (1600, 1200));
        let d = mean_abs_diff(&a.pixels, &b.pixels);
        assert!(d < 2.0, "mean difference {d}");
        // The smallest of 1/8, 1/4, 1/2 that keeps the short side at 512 or more.
        let probe_of = |b: &[u8]| probe(b, u64::MAX).unwrap();
        let scaled = decode_jpeg_scaled(&big, &probe_of(&big), 512).unwrap();
        assert_eq!(scaled.dimensions(), (800, 600));
        let phone = encode(&gradient(4032, 3024), ImageFormat::Jpeg);
        let scaled = decode_jpeg_scaled(&phone, &probe_of(&phone), 512).unwrap();
        assert_eq!(scaled.dimensions(), (1008, 756));
        assert!(decode_jpeg_scaled(&phone, &probe_of(&phone), 3025).is_none());
        // Grayscale JPEGs too.
        let gray = encode(
            &DynamicImage::ImageLuma8(gradient(1600, 1200).to_luma8()),
            ImageFormat::Jpeg,
        );
        assert!(auto.run_scaled(&gray, 512).unwrap().is_some());
        let d = mean_abs_diff(
            &auto.run(&gray).unwrap().pixels,
            &off.run(&gray).unwrap().pixels,
        );
        assert!(d < 2.0, "mean difference {d}");
        // Short side under twice the margin, or not a JPEG: the full decode, the same pixels.
        for small in [
            encode(&gradient(1300, 1000), ImageFormat::Jpeg),
            encode(&gradient(1600, 1200), ImageFormat::Png),
        ] {
            assert!(auto.run_scaled(&small, 512).unwrap().is_none());
            assert_eq!(
                auto.run(&small).unwrap().pixels,
                off.run(&small).unwrap().pixels
            );
        }
        // A truncated large JPEG is still refused.
        assert!(matches!(
            auto.run(&big[..big.len() / 2]),
            Err(PreprocessError::Undecodable(_))
        ));
    }

    fn pre() -> Preprocessor {
        Preprocessor::new(256, 224, 50_000_000)
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ])
        }))
    }

    #[test]
    fn resize_keeps_aspect_and_truncates() {
        assert_eq!(resized_size(640, 480, 256), Some((341, 256)));
        assert_eq!(resized_size(480, 640, 256), Some((256, 341)));
        assert_eq!(resized_size(300, 451, 256), Some((256, 384))); // 384.85 truncated
        assert_eq!(resized_size(100, 100, 256), Some((256, 256)));
        assert_eq!(resized_size(1, 10_000, 256), Some((256, 2_560_000)));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        // Python: int(round((341 - 224) / 2.0)) == int(round(58.5)) == 58
        assert_eq!(center_crop_offset(341, 224), 58);
        // int(round(59.5)) == 60
        assert_eq!(center_crop_offset(343, 224), 60);
        assert_eq!(center_crop_offset(256, 224), 16);
        assert_eq!(center_crop_offset(224, 224), 0);
    }

    #[test]
    fn window_resize_equals_full_resize_then_crop() {
        let p = pre();
        for (w, h) in [(640, 480), (333, 517), (224, 224), (1000, 300), (257, 256)] {
            let img = gradient(w, h).to_rgb8();
            let fast = p.crop_rgb(img.as_raw(), w, h).unwrap();
            // Reference: resize the whole image, then crop.
            let (nw, nh) = resized_size(w, h, 256).unwrap();
            let src = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3).unwrap();
            let mut full = Image::new(nw, nh, PixelType::U8x3);
            Resizer::new()
                .resize(
                    &src,
                    &mut full,
                    &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
                )
                .unwrap();
            let (l, t) = (center_crop_offset(nw, 224), center_crop_offset(nh, 224));
            let mut cropped = Vec::new();
            for y in t..t + 224 {
                let row = (y * nw + l) as usize * 3;
                cropped.extend_from_slice(&full.buffer()[row..row + 224 * 3]);
            }
            let worst = fast
                .iter()
                .zip(&cropped)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 1, "{w}x{h}: differs by {worst} levels");
        }
    }

    #[test]
    fn normalises_with_mean_and_std() {
        let p = pre();
        let white =
            DynamicImage::ImageRgb8(ImageBuffer::from_pixel(300, 300, Rgb([255, 255, 255])));
        let out = p.run(&encode(&white, ImageFormat::Png)).unwrap();
        assert_eq!(out.pixels.len(), 224 * 224 * 3);
        assert!(out.pixels.iter().all(|&v| v == 255));
        let floats = normalize(&out.pixels, MEAN, STD);
        assert_eq!(floats.len(), out.pixels.len());
        for c in 0..3 {
            let expect = (1.0 - MEAN[c]) / STD[c];
            assert!((floats[c] - expect).abs() < 1e-6);
            assert!((floats[floats.len() - 3 + c] - expect).abs() < 1e-6);
        }
        let black = normalize(&[0, 0, 0], MEAN, STD);
        for c in 0..3 {
            assert!((black[c] + MEAN[c] / STD[c]).abs() < 1e-6);
        }
    }

    #[test]
    fn decodes_every_supported_format() {
        let img = gradient(320, 240);
        for (format, name) in [
            (ImageFormat::Png, "png"),
            (ImageFormat::Jpeg, "jpeg"),
            (ImageFormat::WebP, "webp"),
            (ImageFormat::Bmp, "bmp"),
            (ImageFormat::Gif, "gif"),
        ] {
            let bytes = encode(
                &DynamicImage::ImageRgba8(img.to_rgba8()).into_rgb8().into(),
                format,
            );
            let out = pre().run(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((out.width, out.height, out.format), (320, 240, name));
        }
    }

    #[test]
    fn grayscale_and_alpha_become_rgb() {
        let gray = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(50, 40, image::Luma([100u8])));
        let (rgb, _) = decode_rgb(&encode(&gray, ImageFormat::Png), 1 << 30).unwrap();
        assert_eq!(rgb.get_pixel(3, 3), &Rgb([100, 100, 100]));
        // PIL's convert("RGB") drops alpha without compositing.
        let rgba =
            DynamicImage::ImageRgba8(ImageBuffer::from_pixel(50, 40, Rgba([10u8, 20, 30, 0])));
        let (rgb, _) = decode_rgb(&encode(&rgba, ImageFormat::Png), 1 << 30).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([10, 20, 30]));
        let gray16 =
            DynamicImage::ImageLuma16(ImageBuffer::from_pixel(8, 8, image::Luma([65535u16])));
        let (rgb, _) = decode_rgb(&encode(&gray16, ImageFormat::Png), 1 << 30).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
    }

    #[test]
    fn rejects_bad_input_with_the_right_error() {
        let p = pre();
        assert!(matches!(p.run(b""), Err(PreprocessError::Empty)));
        assert!(matches!(
            p.run(b"hello world, not an image"),
            Err(PreprocessError::UnsupportedFormat(_))
        ));
        // A TIFF header: a real format, but not one we serve.
        assert!(matches!(
            p.run(b"II*\0\x08\0\0\0"),
            Err(PreprocessError::UnsupportedFormat(_))
        ));
        let png = encode(&gradient(64, 64), ImageFormat::Png);
        assert!(matches!(
            p.run(&png[..png.len() / 2]),
            Err(PreprocessError::Undecodable(_))
        ));
        assert!(matches!(
            p.run(&png[..20]),
            Err(PreprocessError::Undecodable(_))
        ));
        let jpeg = encode(&gradient(64, 64), ImageFormat::Jpeg);
        assert!(jpeg_is_complete(&jpeg));
        for cut in [jpeg.len() / 3, jpeg.len() / 2, jpeg.len() - 1] {
            assert!(!jpeg_is_complete(&jpeg[..cut]));
            assert!(
                matches!(p.run(&jpeg[..cut]), Err(PreprocessError::Undecodable(_))),
                "cut at {cut}"
            );
        }
        // Trailing bytes after the end-of-image marker are tolerated, as decoders do.
        let mut trailer = jpeg.clone();
        trailer.extend_from_slice(b"camera trailer");
        assert!(p.run(&trailer).is_ok());
    }

    #[test]
    fn declared_dimensions_are_checked_before_decoding() {
        let small = Preprocessor::new(256, 224, 100 * 100);
        let img = encode(&gradient(101, 100), ImageFormat::Png);
        match small.run(&img) {
            Err(PreprocessError::TooLarge { width, height, .. }) => {
                assert_eq!((width, height), (101, 100))
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        // A PNG header declaring 100000 x 100000 pixels with no data behind it: refused from
        // the header alone.
        let mut bomb = encode(&gradient(1, 1), ImageFormat::Png);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        match pre().run(&bomb) {
            Err(PreprocessError::TooLarge { width, height, .. }) => {
                assert_eq!((width, height), (100_000, 100_000))
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
    }

    /// Android and Pixel "motion photos" append an MP4 after the JPEG's end-of-image marker;
    /// its bytes hold FF DA and FF D9 pairs anywhere. The JPEG is complete: it decodes.
    #[test]
    fn motion_photos_with_a_video_after_the_jpeg_decode() {
        let jpeg = encode(&gradient(160, 120), ImageFormat::Jpeg);
        let mut motion = jpeg.clone();
        motion.extend_from_slice(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom");
        let mut state = 0x2545_f491_u32;
        for i in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            motion.push((state >> 24) as u8);
            if i % 50_000 == 7 {
                // A start-of-scan pair after the image's end, as video data may hold.
                motion.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x0C]);
            }
        }
        let out = pre()
            .run(&motion)
            .expect("a JPEG followed by a video decodes");
        assert_eq!((out.width, out.height), (160, 120));
        assert_eq!(out.pixels, pre().run(&jpeg).unwrap().pixels);
        // Truncated for real, it is still refused, trailer or not.
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        assert!(matches!(
            pre().run(cut),
            Err(PreprocessError::Undecodable(_))
        ));
    }

    /// A 16,777,216 x 1 PNG (49 KB, within the pixel limit): its resized width would overflow.
    /// Refused with a clear error instead of an answer computed from nonsense.
    #[test]
    fn extreme_aspect_ratios_are_refused() {
        let wide = DynamicImage::ImageLuma8(ImageBuffer::new(16_777_216, 1));
        let bytes = encode(&wide, ImageFormat::Png);
        assert!(bytes.len() < 100_000);
        match Preprocessor::new(256, 224, 50_000_000).run(&bytes) {
            Err(PreprocessError::AspectRatio { width, height, .. }) => {
                assert_eq!((width, height), (16_777_216, 1))
            }
            other => panic!(
                "expected an aspect-ratio refusal, got {:?}",
                other.map(|o| o.width)
            ),
        }
        let tall = encode(&gradient(2, 1200), ImageFormat::Png);
        assert!(matches!(
            pre().run(&tall),
            Err(PreprocessError::AspectRatio { .. })
        ));
        // Long but sensible shapes are served.
        let panorama = encode(&gradient(3000, 300), ImageFormat::Png);
        assert_eq!(pre().run(&panorama).unwrap().pixels.len(), 224 * 224 * 3);
        assert_eq!(resized_size(16_777_216, 1, 256), None);
    }

    #[test]
    fn tiny_images_are_upscaled() {
        let out = pre()
            .run(&encode(&gradient(1, 1), ImageFormat::Png))
            .unwrap();
        assert_eq!(out.pixels.len(), 224 * 224 * 3);
        let out = pre()
            .run(&encode(&gradient(5, 400), ImageFormat::Png))
            .unwrap();
        assert_eq!(out.pixels.len(), 224 * 224 * 3);
    }
}
