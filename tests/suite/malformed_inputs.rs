//! A corpus of malformed, hostile and unusual images, built in code (plus one tiny fixture),
//! sent through the router on the fake classifier. Every case has its expected status and
//! error code; afterwards the server still answers a normal request.
//!
//! Covered: truncations of every format, empty bodies, wrong magic bytes, decompression bombs
//! (PNG, GIF, WebP, BMP and JPEG headers declaring huge images, a real zlib bomb), colour
//! types (CMYK JPEG, 16-bit, grayscale, grayscale + alpha, RGBA, palette), an EXIF-rotated
//! JPEG, 1x1 images and extreme aspect ratios. Then hostile HTTP requests over a real socket
//! (stalled and endless uploads, missing or wrong API keys, conflicting lengths, broken chunks,
//! slowloris), each with its expected answer.

use std::io::Cursor;
use std::time::Duration;

use crate::common::*;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

/// The pixel limit of the server under test: small, so that bombs are cheap to build.
const MAX_PIXELS: u32 = 1_000_000;

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    }))
}

fn rgba(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgba8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgba([
            (x * 9 % 256) as u8,
            (y * 3 % 256) as u8,
            200,
            ((x + y) % 256) as u8,
        ])
    }))
}

// ------------------------------------------------------------------ PNG ---

/// A PNG from its parts: IHDR fields, an optional palette, the zlib stream of the scanlines.
fn png_file(w: u32, h: u32, depth: u8, color: u8, plte: Option<&[u8]>, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
    out.extend(png_chunk(b"IHDR", &ihdr));
    if let Some(p) = plte {
        out.extend(png_chunk(b"PLTE", p));
    }
    out.extend(png_chunk(b"IDAT", idat));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// An 8-bit palette PNG whose pixels are `index(x, y)`, with a 4-colour palette.
fn palette_png(w: u32, h: u32, index: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let plte = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0); // filter: none
        raw.extend((0..w).map(|x| index(x, y)));
    }
    png_file(w, h, 8, 3, Some(&plte), &zlib_stored(&raw))
}

/// `png` with its IHDR dimensions replaced (CRC recomputed).
fn png_with_size(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

// ------------------------------------------------------------------ GIF ---

/// Offset of the first image descriptor (0x2C) of a GIF, walking its blocks.
fn gif_image_descriptor(gif: &[u8]) -> usize {
    let packed = gif[10];
    let mut at = 13;
    if packed & 0x80 != 0 {
        at += 3 * (1 << ((packed & 7) + 1));
    }
    while gif[at] == 0x21 {
        at += 2; // introducer, label
        while gif[at] != 0 {
            at += gif[at] as usize + 1;
        }
        at += 1;
    }
    assert_eq!(gif[at], 0x2C, "no image descriptor found");
    at
}

fn gif_with_screen(gif: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = gif.to_vec();
    out[6..8].copy_from_slice(&w.to_le_bytes());
    out[8..10].copy_from_slice(&h.to_le_bytes());
    out
}

fn gif_with_frame(gif: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = gif.to_vec();
    let at = gif_image_descriptor(gif);
    out[at + 5..at + 7].copy_from_slice(&w.to_le_bytes());
    out[at + 7..at + 9].copy_from_slice(&h.to_le_bytes());
    out
}

// ----------------------------------------------------------------- WebP ---

/// An extended (VP8X) WebP declaring a `w` x `h` canvas around the image chunks of `webp`
/// (a simple-format file: RIFF, size, WEBP, one VP8/VP8L chunk).
fn webp_with_canvas(webp: &[u8], w: u32, h: u32) -> Vec<u8> {
    let image_chunk = &webp[12..];
    let mut vp8x = vec![0u8; 4];
    vp8x.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend_from_slice(b"VP8X");
    body.extend_from_slice(&10u32.to_le_bytes());
    body.extend_from_slice(&vp8x);
    body.extend_from_slice(image_chunk);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

// ------------------------------------------------------------------ BMP ---

/// `bmp` with its BITMAPINFOHEADER width and height replaced (negative height: top-down).
fn bmp_with_size(bmp: &[u8], w: i32, h: i32) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[18..22].copy_from_slice(&w.to_le_bytes());
    out[22..26].copy_from_slice(&h.to_le_bytes());
    out
}

fn bmp_with_header_size(bmp: &[u8], size: u32) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[14..18].copy_from_slice(&size.to_le_bytes());
    out
}

// ----------------------------------------------------------------- JPEG ---

/// Offset of the first start-of-frame segment (SOF0..SOF2) of a JPEG.
fn jpeg_sof(jpeg: &[u8]) -> usize {
    let mut at = 2;
    loop {
        assert_eq!(jpeg[at], 0xFF, "lost in the JPEG's segments at {at}");
        let marker = jpeg[at + 1];
        if (0xC0..=0xC2).contains(&marker) {
            return at;
        }
        at += 2 + u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
    }
}

fn jpeg_with_size(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = jpeg_sof(jpeg);
    out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    out
}

/// `jpeg` with an APP1 Exif segment carrying the given Orientation tag, right after SOI.
fn jpeg_with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec(); // big endian, first IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

// ---------------------------------------------------------------- cases ---

/// What a case must get: 200 with the decoded size, or an error status and code.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Ok { width: u32, height: u32 },
    Err(u16, &'static str),
}

use Expect::{Err as E, Ok as Fine};

fn fine(width: u32, height: u32) -> Expect {
    Fine { width, height }
}

fn corpus() -> Vec<(String, Vec<u8>, Expect)> {
    let mut cases: Vec<(String, Vec<u8>, Expect)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, expect: Expect| {
        cases.push((name.to_string(), bytes, expect));
    };
    let photo = rgb(64, 48);
    let jpeg = encode(&photo, ImageFormat::Jpeg);
    let png = encode(&photo, ImageFormat::Png);
    let webp = encode(&photo, ImageFormat::WebP);
    let gif = encode(&photo, ImageFormat::Gif);
    let bmp = encode(&photo, ImageFormat::Bmp);

    // Sanity: the intact files decode.
    for (name, bytes) in [
        ("jpeg", &jpeg),
        ("png", &png),
        ("webp", &webp),
        ("gif", &gif),
        ("bmp", &bmp),
    ] {
        add(&format!("intact {name}"), bytes.clone(), fine(64, 48));
    }

    // --- truncations. Cut to their magic bytes, to 30 bytes or in half, the files fail to
    // decode (422). A JPEG without its end-of-image marker is refused as truncated (PIL refuses
    // it too; the JPEG decoder alone would fill the missing scan with grey). Other files
    // missing only their last byte (PNG's IEND CRC, GIF's trailer, the end of WebP's last
    // chunk) have all their pixels, and decode. BMP's last byte is a pixel.
    // WebP's magic number is "RIFF", a size, then "WEBP": 8 bytes are not recognisable (415).
    let undecodable = E(422, "undecodable_image");
    for (name, bytes, magic, half, last) in [
        ("png", &png, undecodable, undecodable, fine(64, 48)),
        (
            "webp",
            &webp,
            E(415, "unsupported_media_type"),
            undecodable,
            fine(64, 48),
        ),
        ("gif", &gif, undecodable, undecodable, fine(64, 48)),
        ("bmp", &bmp, undecodable, undecodable, undecodable),
        ("jpeg", &jpeg, undecodable, undecodable, undecodable),
    ] {
        add(
            &format!("{name} cut to its magic bytes"),
            bytes[..8].to_vec(),
            magic,
        );
        add(
            &format!("{name} cut to 30 bytes"),
            bytes[..30].to_vec(),
            undecodable,
        );
        add(
            &format!("{name} cut in half"),
            bytes[..bytes.len() / 2].to_vec(),
            half,
        );
        add(
            &format!("{name} missing its last byte"),
            bytes[..bytes.len() - 1].to_vec(),
            last,
        );
    }
    add(
        "jpeg cut right after its headers",
        jpeg[..jpeg_sof(&jpeg) + 40].to_vec(),
        E(422, "undecodable_image"),
    );

    // --- empty and foreign content.
    add("zero length", Vec::new(), E(400, "missing_file"));
    add("one byte", vec![0xFF], E(415, "unsupported_media_type"));
    add(
        "png with a wrong first byte",
        [&[0x88][..], &png[1..]].concat(),
        E(415, "unsupported_media_type"),
    );
    add(
        "jpeg with a wrong SOI",
        [&[0xFF, 0xD9][..], &jpeg[2..]].concat(),
        E(415, "unsupported_media_type"),
    );
    add(
        "RIFF but not WEBP",
        [b"RIFF\x10\0\0\0WAVEfmt ".as_slice(), &[0; 8]].concat(),
        E(415, "unsupported_media_type"),
    );
    add(
        "TIFF",
        b"II*\0\x08\0\0\0\0\0".to_vec(),
        E(415, "unsupported_media_type"),
    );
    add(
        "PDF",
        b"%PDF-1.7\n1 0 obj\n".to_vec(),
        E(415, "unsupported_media_type"),
    );
    add(
        "HTML",
        b"<!doctype html><html></html>".to_vec(),
        E(415, "unsupported_media_type"),
    );
    add(
        "random bytes",
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        E(415, "unsupported_media_type"),
    );
    add(
        "png signature then garbage",
        [&png[..8], &[0x42; 200][..]].concat(),
        E(422, "undecodable_image"),
    );
    add(
        "png with a bad IHDR CRC",
        {
            let mut p = png.clone();
            p[29] ^= 0xFF;
            p
        },
        E(422, "undecodable_image"),
    );

    // --- decompression bombs: huge declared sizes, refused from the header (413), or, under
    // the limit, failing on the missing data (422) without allocating beyond the limit. Some
    // sizes trip a decoder's own limit before the server's pixel check sees them, and are
    // answered 422: image's default 512 MiB allocation cap while reading a PNG header, the BMP
    // decoder's 65535-pixel side limit, image-webp's canvas size check.
    add(
        "png IHDR 100000x100000 (valid CRC)",
        png_with_size(&encode(&rgb(1, 1), ImageFormat::Png), 100_000, 100_000),
        E(413, "image_too_large"),
    );
    add(
        "png IHDR 2^31-1 x 1",
        png_with_size(&encode(&rgb(1, 1), ImageFormat::Png), i32::MAX as u32, 1),
        E(422, "undecodable_image"),
    );
    add(
        "png IHDR at the pixel limit with 1 pixel of data",
        png_with_size(&encode(&rgb(1, 1), ImageFormat::Png), 1000, 1000),
        E(422, "undecodable_image"),
    );
    add(
        "png zlib bomb 4000x4000 (valid, all zero)",
        encode(
            &DynamicImage::ImageLuma8(ImageBuffer::new(4000, 4000)),
            ImageFormat::Png,
        ),
        E(413, "image_too_large"),
    );
    add(
        "png 1000x1000 all zero (compresses 1000:1, within the limit)",
        encode(
            &DynamicImage::ImageLuma8(ImageBuffer::new(1000, 1000)),
            ImageFormat::Png,
        ),
        fine(1000, 1000),
    );
    let gif1 = encode(&rgb(1, 1), ImageFormat::Gif);
    add(
        "gif logical screen 65535x65535",
        gif_with_screen(&gif1, 65_535, 65_535),
        E(413, "image_too_large"),
    );
    add(
        "gif 1x1 screen, frame 65535x65535",
        gif_with_frame(&gif1, 65_535, 65_535),
        E(422, "undecodable_image"),
    );
    add(
        "gif 1000x1000 screen, frame 65535x65535",
        gif_with_frame(&gif_with_screen(&gif1, 1000, 1000), 65_535, 65_535),
        E(422, "undecodable_image"),
    );
    add(
        "gif screen 0x0",
        gif_with_screen(&gif1, 0, 0),
        E(422, "undecodable_image"),
    );
    add(
        "webp VP8X canvas 16777216x16777216",
        webp_with_canvas(&webp, 1 << 24, 1 << 24),
        E(422, "undecodable_image"),
    );
    add(
        "webp VP8X canvas 2000x2000 around a 64x48 image",
        webp_with_canvas(&webp, 2000, 2000),
        E(413, "image_too_large"),
    );
    add(
        "webp VP8X canvas 1000x1000 around a 64x48 image",
        webp_with_canvas(&webp, 1000, 1000),
        E(422, "undecodable_image"),
    );
    add(
        "webp VP8X canvas matching its 64x48 image",
        webp_with_canvas(&webp, 64, 48),
        fine(64, 48),
    );
    add(
        "bmp header 100000x100000",
        bmp_with_size(&bmp, 100_000, 100_000),
        E(422, "undecodable_image"),
    );
    add(
        "bmp header 100000 x -100000 (top-down)",
        bmp_with_size(&bmp, 100_000, -100_000),
        E(422, "undecodable_image"),
    );
    add(
        "bmp header 2000x2000",
        bmp_with_size(&bmp, 2000, 2000),
        E(413, "image_too_large"),
    );
    add(
        "bmp header 2000 x -2000 (top-down)",
        bmp_with_size(&bmp, 2000, -2000),
        E(413, "image_too_large"),
    );
    add(
        "bmp header i32::MAX x i32::MIN",
        bmp_with_size(&bmp, i32::MAX, i32::MIN),
        E(422, "undecodable_image"),
    );
    add(
        "bmp header 1000x1000 over 64x48 pixels",
        bmp_with_size(&bmp, 1000, 1000),
        E(422, "undecodable_image"),
    );
    add(
        "bmp with a 4 GB info header",
        bmp_with_header_size(&bmp, u32::MAX),
        E(422, "undecodable_image"),
    );
    add(
        "jpeg SOF 65535x65535",
        jpeg_with_size(&jpeg, 65_535, 65_535),
        E(413, "image_too_large"),
    );
    // Lenient, as for truncations: the missing scan data is grey.
    add(
        "jpeg SOF 1000x1000 over 64x48 of scan data",
        jpeg_with_size(&jpeg, 1000, 1000),
        fine(1000, 1000),
    );
    add(
        "jpeg SOF height 0",
        jpeg_with_size(&jpeg, 64, 0),
        E(422, "undecodable_image"),
    );

    // --- colour types and layouts that must classify.
    let cmyk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cmyk.jpg"
    ))
    .expect("tests/fixtures/cmyk.jpg");
    add("cmyk jpeg (fixture)", cmyk, fine(16, 12));
    add(
        "png 16-bit rgb",
        encode(
            &DynamicImage::ImageRgb16(rgb(40, 30).to_rgb16()),
            ImageFormat::Png,
        ),
        fine(40, 30),
    );
    add(
        "png 16-bit rgba",
        encode(
            &DynamicImage::ImageRgba16(rgba(40, 30).to_rgba16()),
            ImageFormat::Png,
        ),
        fine(40, 30),
    );
    add(
        "png 16-bit grayscale",
        encode(
            &DynamicImage::ImageLuma16(ImageBuffer::from_fn(40, 30, |x, _| {
                Luma([x as u16 * 1500])
            })),
            ImageFormat::Png,
        ),
        fine(40, 30),
    );
    add(
        "png grayscale",
        encode(
            &DynamicImage::ImageLuma8(ImageBuffer::from_fn(40, 30, |x, y| Luma([(x * y) as u8]))),
            ImageFormat::Png,
        ),
        fine(40, 30),
    );
    add(
        "png grayscale + alpha",
        encode(
            &DynamicImage::ImageLumaA8(ImageBuffer::from_fn(40, 30, |x, y| {
                LumaA([(x * 6) as u8, (y * 8) as u8])
            })),
            ImageFormat::Png,
        ),
        fine(40, 30),
    );
    add(
        "png rgba",
        encode(&rgba(40, 30), ImageFormat::Png),
        fine(40, 30),
    );
    add(
        "png palette (8-bit indices)",
        palette_png(40, 30, |x, y| ((x + y) % 4) as u8),
        fine(40, 30),
    );
    add(
        "png palette index beyond the palette",
        palette_png(8, 6, |x, _| if x == 3 { 9 } else { 1 }),
        fine(8, 6),
    );
    add(
        "png palette without PLTE",
        png_file(8, 6, 8, 3, None, &zlib_stored(&[0u8; 9 * 6])),
        E(422, "undecodable_image"),
    );
    add(
        "png with an invalid colour type",
        png_file(8, 6, 8, 5, None, &zlib_stored(&[0u8; 25 * 6])),
        E(422, "undecodable_image"),
    );
    add(
        "png with bad scanline filter bytes",
        png_file(8, 6, 8, 2, None, &zlib_stored(&[7u8; 25 * 6])),
        E(422, "undecodable_image"),
    );
    add(
        "webp rgba",
        encode(&rgba(40, 30), ImageFormat::WebP),
        fine(40, 30),
    );
    add(
        "gif rgba",
        encode(&rgba(40, 30), ImageFormat::Gif),
        fine(40, 30),
    );
    add(
        "bmp rgba",
        encode(&rgba(40, 30), ImageFormat::Bmp),
        fine(40, 30),
    );
    add(
        "jpeg grayscale",
        encode(
            &DynamicImage::ImageLuma8(ImageBuffer::from_fn(40, 30, |x, y| Luma([(x * y) as u8]))),
            ImageFormat::Jpeg,
        ),
        fine(40, 30),
    );
    // EXIF Orientation is applied (--exif-orientation apply, the default): the photo is
    // classified upright and reported with its upright size; 6 and 8 turn it a quarter.
    for (orientation, (w, h)) in [(1, (64, 48)), (3, (64, 48)), (6, (48, 64)), (8, (48, 64))] {
        add(
            &format!("jpeg with EXIF orientation {orientation}"),
            jpeg_with_orientation(&jpeg, orientation),
            fine(w, h),
        );
    }
    add(
        "jpeg with EXIF orientation 65535 (invalid)",
        jpeg_with_orientation(&jpeg, 65_535),
        fine(64, 48),
    );

    // --- extreme geometry.
    for (name, format) in [
        ("png", ImageFormat::Png),
        ("jpeg", ImageFormat::Jpeg),
        ("webp", ImageFormat::WebP),
        ("gif", ImageFormat::Gif),
        ("bmp", ImageFormat::Bmp),
    ] {
        add(
            &format!("{name} 1x1"),
            encode(&rgb(1, 1), format),
            fine(1, 1),
        );
        // Sides up to 100:1 are served; beyond, the image is refused with a clear 422.
        add(
            &format!("{name} 3x300 (100:1)"),
            encode(&rgb(3, 300), format),
            fine(3, 300),
        );
        add(
            &format!("{name} 1x5000"),
            encode(&rgb(1, 5000), format),
            E(422, "unsupported_aspect_ratio"),
        );
        add(
            &format!("{name} 5000x1"),
            encode(&rgb(5000, 1), format),
            E(422, "unsupported_aspect_ratio"),
        );
    }
    add(
        "png 3x301 (just over 100:1)",
        encode(&rgb(3, 301), ImageFormat::Png),
        E(422, "unsupported_aspect_ratio"),
    );
    add(
        "png 1x1000000 (at the pixel limit, 1000000:1)",
        encode(
            &DynamicImage::ImageLuma8(ImageBuffer::new(1, MAX_PIXELS)),
            ImageFormat::Png,
        ),
        E(422, "unsupported_aspect_ratio"),
    );
    add(
        "png 16777216x1 declared (its resized width would overflow 32 bits)",
        png_with_size(&encode(&rgb(1, 1), ImageFormat::Png), 16_777_216, 1),
        E(413, "image_too_large"),
    );
    // A "motion photo": a complete JPEG, then a video (with marker-like bytes) after its end.
    let mut motion = jpeg.clone();
    motion.extend_from_slice(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom");
    motion.extend((0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    motion.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0xFF, 0xD8]);
    add(
        "jpeg followed by an MP4 (motion photo)",
        motion,
        fine(64, 48),
    );
    add(
        "png 1x1000001 (one pixel over)",
        png_with_size(&encode(&rgb(1, 1), ImageFormat::Png), 1, MAX_PIXELS + 1),
        E(413, "image_too_large"),
    );
    cases
}

#[tokio::test]
async fn malformed_and_unusual_images_get_the_expected_answer() {
    let limit = MAX_PIXELS.to_string();
    let server = fake_server(&["--max-image-pixels", &limit], Duration::ZERO).await;
    let cases = corpus();
    let mut mismatches = Vec::new();
    for (name, bytes, expect) in &cases {
        // Raw bodies for all; the multipart path is exercised on every tenth case too.
        let (resp, body) = send(
            &server,
            predict_raw("/predict", "application/octet-stream", bytes.clone()),
        )
        .await;
        let status = resp.status().as_u16();
        let got = if status == 200 {
            let r = &body["results"][0];
            format!("200 {}x{}", r["width"], r["height"])
        } else {
            let code = body["code"].as_str().unwrap_or("?");
            assert_error(&resp, &body, status, code);
            format!("{status} {code}")
        };
        println!("{name:<58} {:>8} bytes  {got}", bytes.len());
        let want = match expect {
            Fine { width, height } => format!("200 {width}x{height}"),
            E(s, c) => format!("{s} {c}"),
        };
        if got != want {
            mismatches.push(format!("{name}: expected {want}, got {got} ({body})"));
        }
    }
    // A few through multipart as well: the same answers.
    for (name, bytes, expect) in cases.iter().step_by(10) {
        if bytes.is_empty() {
            continue;
        }
        let (resp, body) = send(
            &server,
            predict_multipart("/predict", &[("file", "x", bytes)]),
        )
        .await;
        let status = resp.status().as_u16();
        let want = match expect {
            Fine { .. } => 200,
            E(s, _) => *s,
        };
        if status != want {
            mismatches.push(format!(
                "{name} (multipart): expected {want}, got {status} ({body})"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    // None of that hurt the server.
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(7))).await;
    assert_eq!(resp.status(), 200, "{body}");
    let (resp, _) = send(
        &server,
        axum::http::Request::get("/health")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    println!("MALFORMED: {} cases, all as expected", cases.len());
}

/// The real decode path of the model's geometry (resize 256, crop 224) on the same corpus:
/// every answer is a normalised 224x224x3 tensor or a client error, never a panic.
#[test]
fn preprocessor_gives_a_tensor_or_a_client_error_for_every_case() {
    let pre = tch_serve::preprocess::Preprocessor::new(256, 224, u64::from(MAX_PIXELS));
    for (name, bytes, expect) in corpus() {
        match (pre.run(&bytes), expect) {
            (Ok(out), Fine { width, height }) => {
                assert_eq!((out.width, out.height), (width, height), "{name}");
                assert_eq!(out.pixels.len(), 224 * 224 * 3, "{name}");
            }
            (Err(e), E(status, code)) => {
                let e = tch_serve::error::ApiError::from(e);
                assert_eq!(
                    (e.status().as_u16(), e.code()),
                    (status, code),
                    "{name}: {e}"
                )
            }
            (got, want) => panic!(
                "{name}: expected {want:?}, got {:?}",
                got.map(|o| (o.width, o.height, o.format))
            ),
        }
    }
}

/// `--exif-orientation apply` turns a photo upright before resizing (the same pixels as turning
/// the decoded image by hand); `ignore` uses the pixels as stored, as PIL's `open()` does.
#[test]
fn exif_orientation_is_applied_or_ignored_as_configured() {
    use tch_serve::preprocess::{ExifOrientation, Preprocessor, decode_rgb};
    let stored = encode(&rgb(64, 48), ImageFormat::Jpeg);
    let tagged = jpeg_with_orientation(&stored, 6);
    let (raw, _) = decode_rgb(&stored, u64::MAX).unwrap();
    let upright = image::imageops::rotate90(&raw);
    let apply = Preprocessor::new(256, 224, u64::MAX).with_exif(ExifOrientation::Apply);
    let ignore = Preprocessor::new(256, 224, u64::MAX).with_exif(ExifOrientation::Ignore);
    let a = apply.run(&tagged).unwrap();
    assert_eq!((a.width, a.height), (48, 64));
    assert_eq!(a.pixels, apply.crop_rgb(upright.as_raw(), 48, 64).unwrap());
    let i = ignore.run(&tagged).unwrap();
    assert_eq!((i.width, i.height), (64, 48));
    assert_eq!(i.pixels, ignore.run(&stored).unwrap().pixels);
    assert_ne!(a.pixels, i.pixels);
}

/// The server applies `--exif-orientation` (the reported size is the upright one with
/// `apply`, the stored one with `ignore`), and the scaled decode of a large JPEG turns it
/// upright the same way as the full decode.
#[tokio::test]
async fn the_server_follows_exif_orientation_and_scaled_decoding_keeps_it() {
    use tch_serve::preprocess::{ExifOrientation, JpegScaledDecode, Preprocessor};
    let stored = encode(&rgb(64, 48), ImageFormat::Jpeg);
    let tagged = jpeg_with_orientation(&stored, 6);
    for (setting, want) in [("apply", (48, 64)), ("ignore", (64, 48))] {
        let server = fake_server(&["--exif-orientation", setting], Duration::ZERO).await;
        let (resp, body) = send(
            &server,
            predict_raw("/predict", "image/jpeg", tagged.clone()),
        )
        .await;
        assert_eq!(resp.status(), 200, "{body}");
        let r = &body["results"][0];
        assert_eq!(
            (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap()),
            want,
            "--exif-orientation {setting}"
        );
    }
    let smooth = DynamicImage::ImageRgb8(ImageBuffer::from_fn(1600, 1200, |x, y| {
        Rgb([(x / 7) as u8, (y / 5) as u8, ((x + y) / 11) as u8])
    }));
    let big = jpeg_with_orientation(&encode(&smooth, ImageFormat::Jpeg), 6);
    let pre = |mode| {
        Preprocessor::new(256, 224, u64::MAX)
            .with_exif(ExifOrientation::Apply)
            .with_jpeg_scaling(mode)
    };
    let (a, b) = (
        pre(JpegScaledDecode::Auto).run(&big).unwrap(),
        pre(JpegScaledDecode::Off).run(&big).unwrap(),
    );
    assert_eq!((a.width, a.height), (1200, 1600));
    assert_eq!((b.width, b.height), (1200, 1600));
    let diff = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.pixels.len() as f64;
    assert!(
        diff < 3.0,
        "scaled and full decodes differ by {diff} on average"
    );
}

// ------------------------------------------------------- hostile requests ---

/// What a hostile request gets over a real socket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// A JSON answer with this status and code (200: "").
    Json(u16, String),
    /// hyper's own bodiless answer from its HTTP/1 parser, before the router.
    Bare(u16),
    /// The connection closed without an answer (a timeout the client earned).
    Closed,
}

fn json(status: u16, code: &str) -> Answer {
    Answer::Json(status, code.to_owned())
}

const HOSTILE_KEY: &str = "hostile-corpus.0123456789abcdef";

/// Requests that the bugs of hostile clients were found with, and the HTTP framing oddities
/// around them, sent as raw bytes over a socket (the router cannot express most of them),
/// each with its expected answer. The server has an API key, a 1 s header timeout and a 1 s
/// upload grace; afterwards it serves a normal request.
fn hostile_requests() -> Vec<(&'static str, Vec<u8>, Answer)> {
    let img = png(5);
    let auth = format!("Authorization: Bearer {HOSTILE_KEY}\r\n");
    let post = |headers: &str, body: &[u8]| {
        let mut r = format!(
            "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n{headers}\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let with_length = |extra: &str, body: &[u8]| {
        post(
            &format!("{auth}{extra}Content-Length: {}\r\n", body.len()),
            body,
        )
    };
    let mut chunked = format!("{:x}\r\n", img.len()).into_bytes();
    chunked.extend_from_slice(&img);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    vec![
        (
            "the image, with the key",
            with_length("", &img),
            json(200, ""),
        ),
        (
            "the image, chunked, with the key",
            post(&format!("{auth}Transfer-Encoding: chunked\r\n"), &chunked),
            json(200, ""),
        ),
        (
            "no Authorization",
            post(&format!("Content-Length: {}\r\n", img.len()), &img),
            json(401, "unauthorized"),
        ),
        (
            "a wrong key",
            post(
                &format!(
                    "Authorization: Bearer nope\r\nContent-Length: {}\r\n",
                    img.len()
                ),
                &img,
            ),
            json(401, "unauthorized"),
        ),
        (
            "the key as Basic credentials",
            post(
                &format!(
                    "Authorization: Basic {HOSTILE_KEY}\r\nContent-Length: {}\r\n",
                    img.len()
                ),
                &img,
            ),
            json(401, "unauthorized"),
        ),
        (
            "Expect: 100-continue without the key (answered without asking for the body)",
            post(
                &format!("Expect: 100-continue\r\nContent-Length: {}\r\n", img.len()),
                b"",
            ),
            json(401, "unauthorized"),
        ),
        (
            "a body that stalls after 10 of 1000 declared bytes",
            post(&format!("{auth}Content-Length: 1000\r\n"), &img[..10]),
            json(408, "request_timeout"),
        ),
        (
            "a chunked body that stalls mid-chunk",
            post(
                &format!("{auth}Transfer-Encoding: chunked\r\n"),
                b"3e8\r\n0123456789",
            ),
            json(408, "request_timeout"),
        ),
        (
            "a declared length over --max-body-bytes",
            post(&format!("{auth}Content-Length: 200000\r\n"), &img[..100]),
            json(413, "payload_too_large"),
        ),
        (
            "a chunk size that is not hexadecimal",
            post(
                &format!("{auth}Transfer-Encoding: chunked\r\n"),
                b"zz\r\nabc\r\n0\r\n\r\n",
            ),
            json(400, "bad_request"),
        ),
        (
            "Content-Length and Transfer-Encoding together (request smuggling)",
            post(
                &format!("{auth}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
                &chunked,
            ),
            // hyper drops the Content-Length, reads the body by Transfer-Encoding alone and
            // closes the connection after the answer, as RFC 9112 section 6.1 allows (and
            // requires the close): nothing is left on the connection to smuggle.
            json(200, ""),
        ),
        (
            "two different Content-Lengths",
            post(
                &format!("{auth}Content-Length: 5\r\nContent-Length: 6\r\n"),
                b"123456",
            ),
            Answer::Bare(400),
        ),
        (
            "Transfer-Encoding without chunked last",
            post(
                &format!("{auth}Transfer-Encoding: chunked, gzip\r\n"),
                &chunked,
            ),
            Answer::Bare(400),
        ),
        (
            "a folded header line (obs-fold)",
            with_length("X-Folded: a\r\n b\r\n", &img),
            Answer::Bare(400),
        ),
        (
            "a NUL byte in a header value",
            with_length("X-Nul: a\0b\r\n", &img),
            Answer::Bare(400),
        ),
        (
            "a 1 MB header",
            with_length(&format!("X-Big: {}\r\n", "a".repeat(1 << 20)), &img),
            Answer::Bare(431),
        ),
        (
            "half a request line, then nothing (slowloris)",
            b"POST /predict HT".to_vec(),
            Answer::Closed,
        ),
        (
            "headers that never end",
            format!("POST /predict HTTP/1.1\r\nHost: x\r\n{auth}X-Slow: a").into_bytes(),
            Answer::Closed,
        ),
    ]
}

/// Sends `request` (without closing the sending side: a half-closed connection is a client
/// that left) and reads the answer until the server closes or 10 s pass.
fn answer_of(addr: std::net::SocketAddr, request: &[u8]) -> (Answer, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // One whole answer is enough (the connection may be kept alive).
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    });
                    if !head.starts_with("HTTP/1.1 100") && length.is_some_and(|n| body.len() >= n)
                    {
                        break;
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    if text.is_empty() {
        return (Answer::Closed, text);
    }
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if body.is_empty() {
        return (Answer::Bare(status), text);
    }
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let code = match json["code"].as_str() {
        _ if status == 200 => "",
        Some(c) => c,
        None => "not JSON",
    };
    (Answer::Json(status, code.to_owned()), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_the_expected_answer() {
    let server = fake_server(
        &[
            "--api-key",
            HOSTILE_KEY,
            "--header-read-timeout-secs",
            "1",
            "--upload-rate-grace-secs",
            "1",
            "--max-body-bytes",
            "100000",
        ],
        Duration::ZERO,
    )
    .await;
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let cases = hostile_requests();
    let outcomes = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(name, request, want)| {
                let t0 = std::time::Instant::now();
                let (got, text) = answer_of(addr, &request);
                (name, want, got, text, t0.elapsed())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let mut mismatches = Vec::new();
    for (name, want, got, text, took) in &outcomes {
        println!(
            "{name:<72} {got:?} in {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        if got != want {
            let text: String = text.chars().take(300).collect();
            mismatches.push(format!("{name}: expected {want:?}, got {got:?}: {text}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ:\n{}",
        mismatches.len(),
        outcomes.len(),
        mismatches.join("\n")
    );
    // None of that hurt the server.
    let (got, text) = tokio::task::spawn_blocking(move || {
        let img = png(6);
        let mut r = format!(
            "POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HOSTILE_KEY}\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
            img.len()
        )
        .into_bytes();
        r.extend_from_slice(&img);
        answer_of(addr, &r)
    })
    .await
    .unwrap();
    assert_eq!(got, json(200, ""), "{text}");
    println!("HOSTILE: {} requests, all as expected", outcomes.len());
    stop.cancel();
    serving.await.unwrap().unwrap();
}
