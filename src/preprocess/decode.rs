//! Encoded bytes to RGB8 pixels: the format from the magic bytes, the header's dimensions
//! checked before any pixel is decoded (pixel limit, aspect ratio, the memory the decode takes),
//! the decode itself with the decoders' own allocation caps, the EXIF orientation, truncated
//! JPEGs refused, and large JPEGs decoded at a reduced DCT scale by libjpeg-turbo.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::resize::check_aspect;
use super::{ExifOrientation, PreprocessError, Probe};

/// The formats the server decodes; anything else is refused with 415.
pub const SUPPORTED_FORMATS: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Gif,
];

/// Progressive scans libjpeg-turbo reads before it gives up on a JPEG: a crafted progressive
/// JPEG with thousands of tiny scans would otherwise cost seconds of CPU (real photos have at
/// most a few dozen). Such a JPEG then takes the full decode, as every JPEG does with `off`.
const MAX_PROGRESSIVE_SCANS: u32 = 500;

/// A JPEG decoded by libjpeg-turbo at the smallest DCT scale of 1/8, 1/4 and 1/2 that keeps its
/// short side at least `min_short`, as RGB (grayscale expanded). `None` when that cannot be
/// done (no such scale, CMYK or lossless JPEG, a header that disagrees with `probe`, or any
/// error or warning from libjpeg-turbo): the full decode then decides, and reports what is
/// wrong the same way for every path.
pub(super) fn decode_jpeg_scaled(
    bytes: &[u8],
    probe: &Probe,
    min_short: u32,
) -> Option<image::RgbImage> {
    use turbojpeg::{Decompressor, Image, PixelFormat};
    let mut d = Decompressor::new().ok()?;
    let header = d.read_header(bytes).ok()?;
    if !scalable(&header, probe) {
        return None;
    }
    let factor = scaling_for(header.width.min(header.height), min_short)?;
    d.set_scaling_factor(factor).ok()?;
    d.set_scan_limit(MAX_PROGRESSIVE_SCANS).ok()?;
    let scaled = header.scaled(factor);
    let mut pixels = vec![0u8; 3 * scaled.width * scaled.height];
    let out = Image {
        pixels: &mut pixels[..],
        width: scaled.width,
        pitch: 3 * scaled.width,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    d.decompress(bytes, out).ok()?;
    image::RgbImage::from_raw(
        u32::try_from(scaled.width).ok()?,
        u32::try_from(scaled.height).ok()?,
        pixels,
    )
}

/// The smallest DCT scale of 1/8, 1/4 and 1/2 that keeps a short side of `short` at least
/// `min_short`.
pub(super) fn scaling_for(short: usize, min_short: u32) -> Option<turbojpeg::ScalingFactor> {
    use turbojpeg::ScalingFactor;
    [
        ScalingFactor::ONE_EIGHTH,
        ScalingFactor::ONE_QUARTER,
        ScalingFactor::ONE_HALF,
    ]
    .into_iter()
    .find(|f| f.scale(short) >= min_short as usize)
}

/// Whether libjpeg-turbo decodes this JPEG to RGB at a reduced scale: the header agrees with
/// the probe, and it is a YCbCr, grayscale or RGB JPEG that is not lossless.
pub(super) fn scalable(header: &turbojpeg::DecompressHeader, probe: &Probe) -> bool {
    use turbojpeg::Colorspace;
    (header.width, header.height) == (probe.width as usize, probe.height as usize)
        && !header.is_lossless
        && matches!(
            header.colorspace,
            Colorspace::YCbCr | Colorspace::Gray | Colorspace::RGB
        )
}

/// An upper bound of the memory a scaled decode takes: libjpeg-turbo's RGB output at the
/// scale, the copy an orientation needs, slack for the resize's intermediate rows, and for a
/// progressive JPEG the coefficients of the whole image (two bytes each, at full resolution,
/// whatever the scale).
pub(super) fn scaled_decode_bytes(
    header: &turbojpeg::DecompressHeader,
    min_short: u32,
) -> Option<u64> {
    use turbojpeg::Subsamp;
    let factor = scaling_for(header.width.min(header.height), min_short)?;
    let scaled = header.scaled(factor);
    let (w, h) = (header.width as u64, header.height as u64);
    let out = 3 * scaled.width as u64 * scaled.height as u64;
    let coefficients = if header.is_progressive {
        // Bytes per full-resolution pixel: 2 per coefficient, times the components' share of
        // the pixels (luma 1, each chroma plane 1 / its subsampling).
        let per_pixel = match header.subsamp {
            Subsamp::Gray => 2,
            Subsamp::Sub2x2 | Subsamp::Sub4x1 => 3,
            Subsamp::Sub2x1 | Subsamp::Sub1x2 => 4,
            _ => 6,
        };
        per_pixel * w * h
    } else {
        0
    };
    Some(2 * out + out / 2 + coefficients + 64 * w.max(h))
}

/// The header's facts and limits: format (from the magic bytes), dimensions (not zero, within
/// the pixel limit and the aspect ratio), and the memory decoding takes.
pub(super) fn probe(bytes: &[u8], max_pixels: u64) -> Result<Probe, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let format = sniff_format(bytes)?;
    let decoder = reader(bytes, format, Limits::default())
        .into_decoder()
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::Undecodable("image has no pixels".into()));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            limit: max_pixels,
        });
    }
    check_aspect(width, height)?;
    let decoded = decoder.total_bytes();
    Ok(Probe {
        format,
        width,
        height,
        decode_bytes: decoded + 2 * pixels * 3,
        scaled_decode_bytes: None,
    })
}

/// Sniffs the format from the magic bytes, checks the declared dimensions against `max_pixels`
/// before any pixel is decoded, then decodes (the first frame of a GIF) and converts to RGB8
/// (grayscale is replicated, alpha dropped, 16-bit scaled), as PIL's `convert("RGB")` does.
/// The EXIF orientation is not applied (see [`decode_oriented`]).
pub fn decode_rgb(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<(image::RgbImage, &'static str), PreprocessError> {
    decode_oriented(bytes, max_pixels, ExifOrientation::Ignore)
}

/// [`decode_rgb`], turning the photo upright by its EXIF orientation when asked to.
pub fn decode_oriented(
    bytes: &[u8],
    max_pixels: u64,
    exif: ExifOrientation,
) -> Result<(image::RgbImage, &'static str), PreprocessError> {
    let Probe {
        format,
        width,
        height,
        ..
    } = probe(bytes, max_pixels)?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a truncated scan with grey; PIL refuses such files, and so do we.
        return Err(PreprocessError::Undecodable(
            "truncated JPEG: the data ends before the end-of-image marker".into(),
        ));
    }
    // The decoder's own allocation cap: the RGBA16 worst case of the declared size, plus slack.
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 8 + (16 << 20));
    let mut decoder = reader(bytes, format, limits)
        .into_decoder()
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    let orientation = match exif {
        ExifOrientation::Apply => decoder.orientation().ok(),
        ExifOrientation::Ignore => None,
    };
    let mut decoded = DynamicImage::from_decoder(decoder)
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    if let Some(o) = orientation {
        decoded.apply_orientation(o);
    }
    let rgb = match decoded {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    Ok((rgb, format_name(format)))
}

/// A JPEG is complete when its segments, walked from the start, reach an end-of-image marker
/// (FF D9). Whatever follows it is ignored, as decoders and PIL do: Android and Pixel "motion
/// photos" append a video there. Inside entropy-coded data every FF byte is followed by 00 (a
/// stuffed byte) or a restart marker, so the walk skips scans by looking for the next marker.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        // A marker: FF, any number of FF fill bytes, then its code.
        if bytes.get(i) != Some(&0xFF) {
            return false;
        }
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match code {
            0xD9 => return true,
            // Markers without a length: restarts, TEM, a stray SOI.
            0xD0..=0xD8 | 0x01 => continue,
            _ => {}
        }
        let Some(len) = bytes
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return false;
        };
        if len < 2 {
            return false;
        }
        i += len;
        if code == 0xDA {
            // Entropy-coded data up to the next marker that is neither stuffing nor a restart.
            loop {
                let Some(p) = bytes
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
                else {
                    return false;
                };
                i += p;
                match bytes.get(i + 1) {
                    None => return false,
                    Some(0x00) | Some(0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

pub(super) fn reader(
    bytes: &[u8],
    format: ImageFormat,
    limits: Limits,
) -> ImageReader<Cursor<&[u8]>> {
    let mut r = ImageReader::with_format(Cursor::new(bytes), format);
    r.limits(limits);
    r
}

/// The image format named by the content's magic bytes (never by a client's Content-Type).
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
    match image::guess_format(bytes) {
        Ok(f) if SUPPORTED_FORMATS.contains(&f) => Ok(f),
        Ok(f) => Err(PreprocessError::UnsupportedFormat(format!(
            "{} images are not supported; send JPEG, PNG, WebP, BMP or GIF",
            f.extensions_str().first().unwrap_or(&"this kind of")
        ))),
        Err(_) => Err(PreprocessError::UnsupportedFormat(
            "not a recognised image (JPEG, PNG, WebP, BMP or GIF)".into(),
        )),
    }
}

pub(super) fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Gif => "gif",
        _ => "other",
    }
}
