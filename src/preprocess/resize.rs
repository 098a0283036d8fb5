//! RGB8 pixels to the model's input crop, with the geometry torchvision computes: the shorter
//! side resized (antialiased bilinear, fast_image_resize), the longer one truncated, the crop
//! offset rounded half to even; and the aspect ratio beyond which an image is refused.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::PreprocessError;

/// The longest side may be at most this many times the shortest: beyond, resizing the short
/// side to the model's size makes a strip that the center crop sees almost nothing of (and the
/// sizes overflow long before the ratios of real photos, which stay under 15:1).
pub const MAX_ASPECT_RATIO: u32 = 100;

/// Interleaved RGB8 pixels of `width` x `height` to `crop` x `crop` HWC pixels: the shorter side
/// resized to `resize` (antialiased bilinear), then center-cropped, as torchvision's
/// `Resize(resize) -> CenterCrop(crop)` does on a PIL image.
pub fn resize_crop(
    rgb: &[u8],
    width: u32,
    height: u32,
    resize: u32,
    crop: u32,
) -> Result<Vec<u8>, PreprocessError> {
    check_aspect(width, height)?;
    let (new_w, new_h) =
        resized_size(width, height, resize).ok_or(PreprocessError::AspectRatio {
            width,
            height,
            max: MAX_ASPECT_RATIO,
        })?;
    let left = center_crop_offset(new_w, crop);
    let top = center_crop_offset(new_h, crop);
    // Resizing only the window that the center crop keeps gives the same pixels as resizing
    // the whole image and cropping afterwards: each output pixel maps to the same source
    // position with the same filter scale, and the filter is clipped at the image's edges,
    // not the window's.
    let sx = width as f64 / new_w as f64;
    let sy = height as f64 / new_h as f64;
    let src = ImageRef::new(width, height, rgb, PixelType::U8x3)
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    let mut dst = Image::new(crop, crop, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(
            left as f64 * sx,
            top as f64 * sy,
            crop as f64 * sx,
            crop as f64 * sy,
        );
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    Ok(dst.into_vec())
}

pub(super) fn check_aspect(width: u32, height: u32) -> Result<(), PreprocessError> {
    let (short, long) = (width.min(height), width.max(height));
    if u64::from(long) > u64::from(short) * u64::from(MAX_ASPECT_RATIO) {
        return Err(PreprocessError::AspectRatio {
            width,
            height,
            max: MAX_ASPECT_RATIO,
        });
    }
    Ok(())
}

/// torchvision's `Resize(size)` with one int: the shorter side becomes `size`, the longer one
/// keeps the aspect ratio, truncated (`int(size * long / short)`). `None` when the longer side
/// would not fit in 32 bits (or a side is zero).
pub fn resized_size(width: u32, height: u32, size: u32) -> Option<(u32, u32)> {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == 0 {
        return None;
    }
    let new_long = u32::try_from(u64::from(size) * u64::from(long) / u64::from(short)).ok()?;
    Some(if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    })
}

/// torchvision's `CenterCrop` offset: `int(round((len - crop) / 2.0))`, Python's round
/// halves to even.
pub fn center_crop_offset(len: u32, crop: u32) -> u32 {
    let d = len.saturating_sub(crop);
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}
