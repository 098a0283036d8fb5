//! Property-based fuzzing (proptest) of what a client controls: the decode-and-preprocess path
//! (`Preprocessor::run` on arbitrary bytes) and the request side (multipart bodies, content
//! types and query strings through the router, `top_k` ranking).
//!
//! The properties: preprocessing never panics and returns either exactly 224*224*3 finite
//! floats or an error whose status is 4xx; the router never answers 5xx.
//!
//! Inputs: random bytes, random bytes behind real magic numbers, PNGs of random chunks with
//! valid CRCs, mutations (bit flips, overwrites with boundary values, truncations, insertions,
//! splices) of the seed corpus in tests/fuzz-corpus/, and random valid small images of every
//! format and colour type.
//!
//! Cases per property: `PROPTEST_CASES` (default: each property's own count, about a minute
//! for all in release mode). `FUZZ_SEED=<u64>` makes a run reproducible; otherwise every run
//! explores new inputs. Each property prints its case count and time (`--nocapture`).

use crate::common::{png_chunk, zlib_stored};

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use image::{DynamicImage, ImageBuffer, ImageFormat};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tch_serve::error::ApiError;
use tch_serve::preprocess::Preprocessor;

const SEEDS: [(&str, &[u8]); 9] = [
    ("chelsea.jpg", include_bytes!("../fuzz-corpus/chelsea.jpg")),
    (
        "chelsea-progressive.jpg",
        include_bytes!("../fuzz-corpus/chelsea-progressive.jpg"),
    ),
    ("coffee.png", include_bytes!("../fuzz-corpus/coffee.png")),
    (
        "camera-gray.png",
        include_bytes!("../fuzz-corpus/camera-gray.png"),
    ),
    (
        "astronaut-rgba.png",
        include_bytes!("../fuzz-corpus/astronaut-rgba.png"),
    ),
    (
        "astronaut.webp",
        include_bytes!("../fuzz-corpus/astronaut.webp"),
    ),
    (
        "astronaut-lossless.webp",
        include_bytes!("../fuzz-corpus/astronaut-lossless.webp"),
    ),
    ("coffee.gif", include_bytes!("../fuzz-corpus/coffee.gif")),
    ("chelsea.bmp", include_bytes!("../fuzz-corpus/chelsea.bmp")),
];

const MAGICS: [&[u8]; 9] = [
    b"\xFF\xD8\xFF",
    b"\xFF\xD8\xFF\xE0\x00\x10JFIF\x00",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
];

const MAX_PIXELS: u64 = 4_000_000;
const OUT_LEN: usize = 224 * 224 * 3;

fn preprocessor() -> Preprocessor {
    Preprocessor::new(256, 224, MAX_PIXELS)
}

/// Shrinking a failing case stops after this many steps (decoding one input is fast).
const MAX_SHRINK_ITERS: u32 = 2000;

/// Runs `property` over `strategy`, tallying the outcomes it reports (see crate::common::fuzzing).
fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<&'static str, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    crate::common::fuzzing::fuzz(name, default_cases, MAX_SHRINK_ITERS, strategy, property);
}

/// The property of the preprocessing path for one input.
fn preprocess_property(pre: &Preprocessor, bytes: &[u8]) -> Result<&'static str, TestCaseError> {
    match pre.run(bytes) {
        Ok(out) => {
            prop_assert_eq!(out.pixels.len(), OUT_LEN);
            prop_assert!(out.width > 0 && out.height > 0);
            prop_assert!(u64::from(out.width) * u64::from(out.height) <= MAX_PIXELS);
            Ok("ok")
        }
        Err(e) => {
            let e = ApiError::from(e);
            prop_assert!(
                e.status().is_client_error(),
                "{e:?} answered {}",
                e.status()
            );
            Ok(e.code())
        }
    }
}

// ------------------------------------------------------------ mutations ---

/// Where a mutation applies: anywhere, or in the first 64 bytes (the headers).
#[derive(Debug, Clone)]
enum Pos {
    Any(Index),
    Head(u8),
}

impl Pos {
    fn at(&self, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        match self {
            Pos::Any(i) => i.index(len),
            Pos::Head(h) => usize::from(*h % 64).min(len - 1),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Pos, u8),
    SetByte(Pos, u8),
    /// Overwrites 2 or 4 bytes with a boundary value (0, 1, 0x7F.., 0xFF..), big or little
    /// endian: the sizes and lengths of headers.
    Boundary(Pos, u32, bool, bool),
    Truncate(Pos),
    Insert(Pos, Vec<u8>),
    Remove(Pos, u16),
    /// The first part of this input, then another seed from a position on.
    Splice(Pos, usize, Index),
    Duplicate(Pos, u16),
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        any::<Index>().prop_map(Pos::Any),
        any::<u8>().prop_map(Pos::Head)
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7F),
        Just(0xFF),
        Just(0x7FFF),
        Just(0xFFFF),
        Just(0x10000),
        Just(0x7FFF_FFFF),
        Just(0x8000_0000),
        Just(0xFFFF_FFFF),
        any::<u32>()
    ];
    prop_oneof![
        4 => (pos(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        3 => (pos(), any::<u8>()).prop_map(|(p, v)| Mutation::SetByte(p, v)),
        3 => (pos(), boundary, any::<bool>(), any::<bool>())
            .prop_map(|(p, v, wide, be)| Mutation::Boundary(p, v, wide, be)),
        2 => pos().prop_map(Mutation::Truncate),
        1 => (pos(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (pos(), 1u16..512).prop_map(|(p, n)| Mutation::Remove(p, n)),
        1 => (pos(), 0..SEEDS.len(), any::<Index>())
            .prop_map(|(p, s, from)| Mutation::Splice(p, s, from)),
        1 => (pos(), 1u16..256).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len();
        match m {
            Mutation::FlipBit(p, bit) if len > 0 => data[p.at(len)] ^= 1 << bit,
            Mutation::SetByte(p, v) if len > 0 => data[p.at(len)] = *v,
            Mutation::Boundary(p, v, wide, big_endian) => {
                let bytes: Vec<u8> = match (wide, big_endian) {
                    (true, true) => v.to_be_bytes().to_vec(),
                    (true, false) => v.to_le_bytes().to_vec(),
                    (false, true) => (*v as u16).to_be_bytes().to_vec(),
                    (false, false) => (*v as u16).to_le_bytes().to_vec(),
                };
                let at = p.at(len);
                for (i, b) in bytes.into_iter().enumerate() {
                    if let Some(slot) = data.get_mut(at + i) {
                        *slot = b;
                    }
                }
            }
            Mutation::Truncate(p) => data.truncate(p.at(len)),
            Mutation::Insert(p, bytes) => {
                let at = p.at(len + 1).min(len);
                data.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(p, n) if len > 0 => {
                let at = p.at(len);
                let end = (at + usize::from(*n)).min(len);
                data.drain(at..end);
            }
            Mutation::Splice(p, seed, from) => {
                let other = SEEDS[*seed].1;
                data.truncate(p.at(len));
                data.extend_from_slice(&other[from.index(other.len())..]);
            }
            Mutation::Duplicate(p, n) if len > 0 => {
                let at = p.at(len);
                let end = (at + usize::from(*n)).min(len);
                let copy = data[at..end].to_vec();
                data.splice(end..end, copy);
            }
            _ => {}
        }
    }
    data
}

fn mutated_seed() -> impl Strategy<Value = (usize, Vec<Mutation>)> {
    (0..SEEDS.len(), prop::collection::vec(mutation(), 1..6))
}

// ------------------------------------------------------- generated inputs ---

#[derive(Debug, Clone)]
struct PngSpec {
    width: u32,
    height: u32,
    depth: u8,
    color: u8,
    interlace: u8,
    /// (chunk type, data, compress IDAT data with zlib)
    chunks: Vec<([u8; 4], Vec<u8>, bool)>,
    iend: bool,
}

fn dimension() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 1u32..80,
        1 => Just(0u32),
        1 => 1000u32..5000,
        1 => any::<u32>(),
    ]
}

fn png_spec() -> impl Strategy<Value = PngSpec> {
    let depth = prop_oneof![Just(1u8), Just(2), Just(4), Just(8), Just(16), any::<u8>()];
    let color = prop_oneof![Just(0u8), Just(2), Just(3), Just(4), Just(6), any::<u8>()];
    let kind = prop_oneof![
        4 => Just(*b"IDAT"),
        2 => Just(*b"PLTE"),
        1 => Just(*b"tRNS"),
        1 => Just(*b"gAMA"),
        1 => Just(*b"iCCP"),
        1 => Just(*b"acTL"),
        1 => Just(*b"fcTL"),
        1 => Just(*b"fdAT"),
        1 => Just(*b"IEND"),
        1 => any::<[u8; 4]>(),
    ];
    let chunk = (
        kind,
        prop::collection::vec(any::<u8>(), 0..600),
        any::<bool>(),
    );
    (
        dimension(),
        dimension(),
        depth,
        color,
        0u8..3,
        prop::collection::vec(chunk, 0..5),
        any::<bool>(),
    )
        .prop_map(
            |(width, height, depth, color, interlace, chunks, iend)| PngSpec {
                width,
                height,
                depth,
                color,
                interlace,
                chunks,
                iend,
            },
        )
}

fn build_png(spec: &PngSpec) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&spec.width.to_be_bytes());
    ihdr.extend_from_slice(&spec.height.to_be_bytes());
    ihdr.extend_from_slice(&[spec.depth, spec.color, 0, 0, spec.interlace]);
    out.extend(png_chunk(b"IHDR", &ihdr));
    for (kind, data, compress) in &spec.chunks {
        if kind == b"IDAT" && *compress {
            out.extend(png_chunk(kind, &zlib_stored(data)));
        } else {
            out.extend(png_chunk(kind, data));
        }
    }
    if spec.iend {
        out.extend(png_chunk(b"IEND", &[]));
    }
    out
}

#[derive(Debug, Clone)]
struct ImageSpec {
    width: u32,
    height: u32,
    /// 0 L8, 1 La8, 2 Rgb8, 3 Rgba8, 4 L16, 5 Rgb16, 6 Rgba16, 7 La16
    color: u8,
    format: usize,
    seed: u32,
}

const FORMATS: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

fn image_spec() -> impl Strategy<Value = ImageSpec> {
    (1u32..=96, 1u32..=96, 0u8..8, 0..FORMATS.len(), any::<u32>()).prop_map(
        |(width, height, color, format, seed)| ImageSpec {
            width,
            height,
            color,
            format,
            seed,
        },
    )
}

fn build_image(spec: &ImageSpec) -> Vec<u8> {
    let s = spec.seed;
    let rgba = ImageBuffer::from_fn(spec.width, spec.height, |x, y| {
        let h = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ s)
            .wrapping_mul(2_654_435_761);
        image::Rgba([(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8, h as u8])
    });
    let base = DynamicImage::ImageRgba8(rgba);
    let img = match spec.color {
        0 => DynamicImage::ImageLuma8(base.to_luma8()),
        1 => DynamicImage::ImageLumaA8(base.to_luma_alpha8()),
        2 => DynamicImage::ImageRgb8(base.to_rgb8()),
        3 => base,
        4 => DynamicImage::ImageLuma16(base.to_luma16()),
        5 => DynamicImage::ImageRgb16(base.to_rgb16()),
        6 => DynamicImage::ImageRgba16(base.to_rgba16()),
        _ => DynamicImage::ImageLumaA16(base.to_luma_alpha16()),
    };
    let format = FORMATS[spec.format];
    let mut out = Cursor::new(Vec::new());
    if img.write_to(&mut out, format).is_err() {
        // A colour type this encoder does not take: its 8-bit RGB(A) version.
        out = Cursor::new(Vec::new());
        let fallback = if img.color().has_alpha() && format != ImageFormat::Jpeg {
            DynamicImage::ImageRgba8(img.to_rgba8())
        } else {
            DynamicImage::ImageRgb8(img.to_rgb8())
        };
        fallback.write_to(&mut out, format).unwrap();
    }
    out.into_inner()
}

// -------------------------------------------------- preprocessing properties ---

#[test]
fn fuzz_random_bytes() {
    let pre = preprocessor();
    fuzz(
        "random bytes",
        50_000,
        prop::collection::vec(any::<u8>(), 0..2048),
        |bytes| preprocess_property(&pre, &bytes),
    );
}

#[test]
fn fuzz_random_bytes_behind_magic_numbers() {
    let pre = preprocessor();
    fuzz(
        "magic number + random bytes",
        150_000,
        (0..MAGICS.len(), prop::collection::vec(any::<u8>(), 0..2048)),
        |(magic, tail)| {
            let bytes = [MAGICS[magic], &tail[..]].concat();
            preprocess_property(&pre, &bytes)
        },
    );
}

#[test]
fn fuzz_png_chunks_with_valid_crcs() {
    let pre = preprocessor();
    fuzz("png of random chunks", 150_000, png_spec(), |spec| {
        preprocess_property(&pre, &build_png(&spec))
    });
}

#[test]
fn fuzz_mutated_seed_corpus() {
    let pre = preprocessor();
    // The seeds themselves decode.
    for (name, bytes) in SEEDS {
        let out = pre
            .run(bytes)
            .unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert_eq!(out.pixels.len(), OUT_LEN, "{name}");
    }
    fuzz(
        "mutated seeds",
        100_000,
        mutated_seed(),
        |(seed, mutations)| {
            let bytes = apply(SEEDS[seed].1.to_vec(), &mutations);
            preprocess_property(&pre, &bytes)
        },
    );
}

#[test]
fn fuzz_valid_small_images_decode() {
    let pre = preprocessor();
    fuzz("valid small images", 10_000, image_spec(), |spec| {
        let bytes = build_image(&spec);
        let out = pre
            .run(&bytes)
            .map_err(|e| TestCaseError::fail(format!("a valid image was refused: {e}")))?;
        prop_assert_eq!((out.width, out.height), (spec.width, spec.height));
        prop_assert_eq!(out.pixels.len(), OUT_LEN);
        Ok(out.format)
    });
}

// ------------------------------------------------------ request properties ---

#[test]
fn fuzz_top_k_ranking() {
    let probs = prop::collection::vec(
        prop_oneof![
            8 => 0f32..1.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(0.5f32),
        ],
        0..64,
    );
    fuzz(
        "top_k",
        50_000,
        (probs, 0usize..200, 0usize..64),
        |(probs, k, n_labels)| {
            let labels: Vec<String> = (0..n_labels).map(|i| format!("l{i}")).collect();
            let top = tch_serve::api::top_k(&probs, k, &labels);
            prop_assert_eq!(top.len(), k.min(probs.len()));
            let mut seen = std::collections::HashSet::new();
            for p in &top {
                prop_assert!(p.index < probs.len());
                prop_assert!(seen.insert(p.index), "index {} twice", p.index);
                prop_assert_eq!(p.probability.to_bits(), probs[p.index].to_bits());
                let want = labels
                    .get(p.index)
                    .cloned()
                    .unwrap_or_else(|| p.index.to_string());
                prop_assert_eq!(&p.label, &want);
            }
            for w in top.windows(2) {
                prop_assert!(w[0].probability.total_cmp(&w[1].probability).is_ge());
            }
            Ok(if top.is_empty() { "empty" } else { "ranked" })
        },
    );
}

#[derive(Debug, Clone)]
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    body: PartBody,
}

#[derive(Debug, Clone)]
enum PartBody {
    Seed(usize),
    Mutated(usize, Vec<Mutation>),
    Random(Vec<u8>),
    Empty,
}

impl PartBody {
    fn bytes(&self) -> Vec<u8> {
        match self {
            PartBody::Seed(s) => SEEDS[*s].1.to_vec(),
            PartBody::Mutated(s, m) => apply(SEEDS[*s].1.to_vec(), m),
            PartBody::Random(b) => b.clone(),
            PartBody::Empty => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct FormSpec {
    query: String,
    boundary: String,
    content_type: u8,
    raw_content_type: String,
    parts: Vec<Part>,
    /// (truncate at, flip a byte at)
    damage: Option<(Index, Option<Index>)>,
    /// The body is one image, not a form.
    raw: bool,
}

fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("image/png".to_string()),
        Just("application/octet-stream".to_string()),
        Just("text/plain; charset=\u{e9}".to_string()),
        "[ -~]{0,40}",
        ".{0,10}",
    ]
}

fn part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        6 => Just("file".to_string()),
        1 => Just("image".to_string()),
        1 => Just(String::new()),
        1 => "[ -~]{0,12}",
        1 => ".{0,8}",
    ];
    let body = prop_oneof![
        3 => (0..SEEDS.len()).prop_map(PartBody::Seed),
        3 => mutated_seed().prop_map(|(s, m)| PartBody::Mutated(s, m)),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(PartBody::Random),
        1 => Just(PartBody::Empty),
    ];
    (
        name,
        prop::option::of("[ -~]{0,20}"),
        prop::option::of(header_text()),
        body,
    )
        .prop_map(|(name, filename, content_type, body)| Part {
            name,
            filename,
            content_type,
            body,
        })
}

fn form_spec() -> impl Strategy<Value = FormSpec> {
    let query = prop_oneof![
        Just(String::new()),
        (0usize..300).prop_map(|k| format!("top_k={k}")),
        "top_k=[ -~]{0,6}",
        "[a-z_=&0-9%]{0,20}",
    ];
    let boundary = prop_oneof![
        3 => Just("XyZ-boundary-1234".to_string()),
        1 => "[A-Za-z0-9'()+_,./:=? -]{1,70}",
        1 => "[ -~]{0,80}",
    ];
    (
        query,
        boundary,
        0u8..6,
        header_text(),
        prop::collection::vec(part(), 0..5),
        prop::option::weighted(0.25, (any::<Index>(), prop::option::of(any::<Index>()))),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(query, boundary, content_type, raw_content_type, parts, damage, raw)| FormSpec {
                query,
                boundary,
                content_type,
                raw_content_type,
                parts,
                damage,
                raw,
            },
        )
}

/// The request of a spec, or None when it is not expressible in HTTP at all (a URI or a header
/// value that `http` refuses).
fn build_request(spec: &FormSpec) -> Option<(Request<Body>, usize)> {
    let b = &spec.boundary;
    let mut body = Vec::new();
    let mut files = 0;
    let content_type = if spec.raw {
        body = spec
            .parts
            .first()
            .map(|p| p.body.bytes())
            .unwrap_or_default();
        files = usize::from(!body.is_empty());
        spec.raw_content_type.clone()
    } else {
        for p in &spec.parts {
            body.extend_from_slice(format!("--{b}\r\n").as_bytes());
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{}\"", p.name).as_bytes(),
            );
            if let Some(f) = &p.filename {
                body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            if let Some(ct) = &p.content_type {
                body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(&p.body.bytes());
            body.extend_from_slice(b"\r\n");
            if p.name == "file" {
                files += 1;
            }
        }
        body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        match spec.content_type {
            0 | 1 => format!("multipart/form-data; boundary={b}"),
            2 => format!("multipart/form-data; boundary=\"{b}\""),
            3 => "multipart/form-data".to_string(),
            4 => format!("multipart/mixed; boundary={b}"),
            _ => spec.raw_content_type.clone(),
        }
    };
    if let Some((cut, flip)) = &spec.damage {
        if let Some(f) = flip.as_ref().filter(|_| !body.is_empty()) {
            let at = f.index(body.len());
            body[at] ^= 0x20;
        }
        body.truncate(cut.index(body.len() + 1));
    }
    let uri = if spec.query.is_empty() {
        "/predict".to_string()
    } else {
        format!("/predict?{}", spec.query)
    };
    let req = Request::post(uri)
        .header("content-type", content_type)
        .body(Body::from(body))
        .ok()?;
    Some((req, files))
}

#[test]
fn fuzz_requests_through_the_router() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(crate::common::fake_server(
        &[
            "--max-image-pixels",
            "4000000",
            "--max-body-bytes",
            "200000",
            "--max-images-per-request",
            "3",
            "--warmup-iterations",
            "0",
        ],
        Duration::ZERO,
    ));
    let statuses = RefCell::new(BTreeMap::<u16, u32>::new());
    fuzz("requests through the router", 20_000, form_spec(), |spec| {
        let Some((req, files)) = build_request(&spec) else {
            return Ok("not expressible in HTTP");
        };
        let (resp, body) = rt.block_on(crate::common::send(&server, req));
        let status = resp.status().as_u16();
        *statuses.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(status < 500, "answered {status}: {body}");
        if status == 200 {
            let results = body["results"].as_array().map(Vec::len).unwrap_or(0);
            prop_assert!(
                (1..=files.max(1)).contains(&results),
                "{results} results: {body}"
            );
            Ok("200")
        } else {
            prop_assert!(body["code"].is_string(), "no error code: {body}");
            prop_assert!(resp.headers()["content-type"] == "application/json");
            Ok("refused")
        }
    });
    println!("FUZZ: router statuses {:?}", statuses.borrow());
    // Still healthy.
    let (resp, _) = rt.block_on(crate::common::send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    ));
    assert_eq!(resp.status(), 200);
}

// ------------------------------------------------------------ regressions ---
// Inputs that once broke a property, kept as plain tests.

/// A palette PNG whose PLTE chunk is `plte_len` bytes long (valid CRCs, one pixel of index 0).
fn png_with_plte(plte_len: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    out.extend(png_chunk(b"IHDR", &ihdr));
    let plte: Vec<u8> = (0..plte_len).map(|i| (i * 37 % 256) as u8).collect();
    out.extend(png_chunk(b"PLTE", &plte));
    out.extend(png_chunk(b"IDAT", &zlib_stored(&[0, 0])));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// Found by `fuzz_png_chunks_with_valid_crcs`: a palette PNG whose PLTE length is not a
/// multiple of 3 makes the png crate (0.18.1, decoder/transform/palette.rs:74) panic with
/// "range end index 3 out of range for slice of length 1". In the server the decoding runs on
/// the rayon preprocessing pool, where a panic aborts the whole process: one 83-byte request
/// (the 4-byte PLTE case below) kills the server. Every one of these must be a client error.
#[test]
fn regression_png_palette_length_not_a_multiple_of_three() {
    let pre = preprocessor();
    let mut panicked = Vec::new();
    for len in [
        1usize, 2, 3, 4, 5, 7, 8, 300, 766, 767, 768, 769, 770, 771, 772,
    ] {
        let png = png_with_plte(len);
        match std::panic::catch_unwind(|| pre.run(&png)) {
            Ok(Ok(out)) => assert_eq!(out.pixels.len(), OUT_LEN, "PLTE of {len} bytes"),
            Ok(Err(e)) => assert!(
                ApiError::from(e.clone()).status().is_client_error(),
                "PLTE of {len} bytes: {e:?}"
            ),
            Err(_) => panicked.push(len),
        }
    }
    assert!(
        panicked.is_empty(),
        "Preprocessor::run panicked on palette PNGs with PLTE chunks of {panicked:?} bytes \
         (the preprocessing pool aborts the server on a panic)"
    );
}
