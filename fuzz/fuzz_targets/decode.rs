//! libFuzzer target of the image decode path: arbitrary bytes through `Preprocessor::probe`
//! then `Preprocessor::run`, as the server's pipeline calls them (src/pipeline/mod.rs: the
//! header is probed and its decode memory taken from the budget, then the image is decoded,
//! resized and cropped), with the server's default geometry (the model metadata's defaults,
//! resize 256 and crop 224) and a pixel limit of 4,000,000 (the server's default is 40,000,000;
//! a smaller one keeps each input fast).
//!
//! JPEGs take the scaled decoding (`--jpeg-scaled-decode auto`: a JPEG whose short side is at
//! least 1024 pixels is decoded at a reduced scale by the jpeg-decoder crate), so that its
//! decoder is fuzzed too; smaller ones take the full decode, as with `off`.
//!
//! Each input is run with both EXIF settings (`apply`, the server's default, and `ignore`), so
//! that the seed images stay valid images. The invariants, checked after every input:
//!
//! - no panic in the server's own code (src/preprocess/, src/metadata.rs), even one that
//!   `Preprocessor::run` would catch; a panic inside a decoder (a dependency: the png crate
//!   has one on a palette whose length is not a multiple of 3, see RELIABILITY.md) must be
//!   caught by `probe` and `run` and answered with `Undecodable`, as the server does;
//! - `probe` and `run` agree: a refused header is refused by `run` with the same error;
//! - Ok: exactly crop * crop * 3 bytes, sides that are not zero, within the pixel limit and the
//!   aspect ratio, the probed format, and the probed sides (swapped by an EXIF rotation);
//! - Err: the typed error, whose fields are consistent with the input (`Empty` for no bytes
//!   only, `TooLarge` over the limit only, and so on);
//! - an image decodes with both EXIF settings or with neither;
//! - memory: the header's estimate fits in the smallest decode budget the server accepts for
//!   this pixel limit (14 bytes a pixel, src/config/mod.rs); no single allocation is larger than
//!   that budget; and the memory live at once while decoding stays under the header's estimate
//!   plus a fixed allowance for the decoders' tables, the resizer and the crop. The counting
//!   allocator below does this without a sanitizer (libFuzzer's -malloc_limit_mb needs one).

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use libfuzzer_sys::fuzz_target;
use tch_serve_fuzz::metadata::ModelMetadata;
use tch_serve_fuzz::preprocess::{
    ExifOrientation, JpegScaledDecode, MAX_ASPECT_RATIO, PreprocessError, Preprocessed,
    Preprocessor, Probe,
};

const MAX_PIXELS: u64 = 4_000_000;
/// The smallest `--decode-memory-bytes` the server accepts with this pixel limit.
const BUDGET: u64 = MAX_PIXELS * 14;
/// What decoding may take beyond the header's estimate: Huffman and quantisation tables,
/// zlib and LZW state, row buffers, the resizer's buffers and the crop itself.
const ALLOWANCE: usize = 16 << 20;

/// Counts the bytes live at once (and the peak) and refuses any single allocation over the
/// decode budget while armed: the allocation fails, and Rust aborts with "memory allocation of
/// N bytes failed", which libFuzzer reports as a crash.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn admit(size: usize) -> bool {
        if ARMED.load(Relaxed) && size as u64 > BUDGET {
            REFUSED.store(size, Relaxed);
            return false;
        }
        true
    }
    fn grew(size: usize) {
        let live = LIVE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(live, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::admit(new_size) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The preprocessor as the server builds it for a model whose metadata gives no geometry.
fn preprocessor(exif: ExifOrientation) -> Preprocessor {
    let meta: ModelMetadata =
        serde_json::from_str(r#"{"name":"fuzz","labels":["a"]}"#).expect("minimal metadata parses");
    meta.validate().expect("minimal metadata is valid");
    Preprocessor::for_model(&meta, MAX_PIXELS)
        .with_exif(exif)
        .with_jpeg_scaling(JpegScaledDecode::Auto)
}

/// Panics inside the decoders (dependencies) during the last `caught` call.
static DECODER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` (a call that catches panics, as the server's `probe` and `run` do) with a panic
/// hook that lets a panic inside a dependency unwind to that catch, and aborts, as libFuzzer's
/// own hook does, on a panic in the server's code or in this target. Returns how many panics
/// were caught.
fn caught<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let libfuzzer_hook = std::panic::take_hook();
    DECODER_PANICS.store(0, Relaxed);
    std::panic::set_hook(Box::new(|info| {
        let file = info.location().map(|l| l.file()).unwrap_or("");
        // Dependencies live under $CARGO_HOME/registry/src (or git/checkouts), wherever
        // CARGO_HOME is; the standard library under /rustc/.
        let dependency = ["/registry/src/", "/git/checkouts/", "/rustc/"]
            .iter()
            .any(|d| file.contains(d));
        let ours = !dependency;
        if ours || file.is_empty() {
            eprintln!("{info}");
            std::process::abort();
        }
        DECODER_PANICS.fetch_add(1, Relaxed);
    }));
    let out = f();
    std::panic::set_hook(libfuzzer_hook);
    (out, DECODER_PANICS.load(Relaxed))
}

/// A panic caught by the server is answered as an image that cannot be decoded.
fn check_caught<T>(out: &Result<T, PreprocessError>, panics: usize) {
    if panics > 0 {
        assert!(
            matches!(out, Err(PreprocessError::Undecodable(m)) if m.starts_with("the decoder failed")),
            "a decoder panicked and the answer is not Undecodable"
        );
    }
}

/// `run` under the allocation checks: the result and the most bytes live at once beyond what
/// was live before.
fn run_counted(p: &Preprocessor, data: &[u8]) -> (Result<Preprocessed, PreprocessError>, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    REFUSED.store(0, Relaxed);
    ARMED.store(true, Relaxed);
    let (out, panics) = caught(|| p.run(data));
    ARMED.store(false, Relaxed);
    check_caught(&out, panics);
    let refused = REFUSED.load(Relaxed);
    assert_eq!(
        refused, 0,
        "an allocation of {refused} bytes, over the decode budget of {BUDGET}, was refused"
    );
    (out, PEAK.load(Relaxed).saturating_sub(base))
}

/// A header refused because its decoder panicked (`probe` says so in its own words).
fn panics_in(e: &PreprocessError) -> bool {
    matches!(e, PreprocessError::Undecodable(m) if m.starts_with("the decoder failed"))
}

fn check_error(e: &PreprocessError, data: &[u8]) {
    assert!(
        !e.to_string().is_empty(),
        "an error without a message: {e:?}"
    );
    match *e {
        PreprocessError::Empty => assert!(data.is_empty(), "Empty for {} bytes", data.len()),
        PreprocessError::TooLarge {
            width,
            height,
            limit,
        } => {
            assert_eq!(limit, MAX_PIXELS);
            assert!(u64::from(width) * u64::from(height) > limit, "{e}");
        }
        PreprocessError::AspectRatio { width, height, max } => {
            assert_eq!(max, MAX_ASPECT_RATIO);
            let (short, long) = (width.min(height), width.max(height));
            assert!(u64::from(long) > u64::from(short) * u64::from(max), "{e}");
        }
        PreprocessError::OverBudget { .. } => panic!("run() never checks the budget: {e}"),
        PreprocessError::UnsupportedFormat(_) | PreprocessError::Undecodable(_) => {}
    }
    assert!(!data.is_empty() || *e == PreprocessError::Empty);
}

fn check(p: &Preprocessor, data: &[u8], probe: &Result<Probe, PreprocessError>) -> bool {
    let (out, peak) = run_counted(p, data);
    match (&out, probe) {
        (Ok(img), Ok(probe)) => {
            let crop = p.crop_size as usize;
            assert_eq!(img.pixels.len(), crop * crop * 3, "crop of the wrong size");
            assert!(img.width > 0 && img.height > 0);
            assert!(u64::from(img.width) * u64::from(img.height) <= MAX_PIXELS);
            let (short, long) = (img.width.min(img.height), img.width.max(img.height));
            assert!(u64::from(long) <= u64::from(short) * u64::from(MAX_ASPECT_RATIO));
            let probed = (probe.width, probe.height);
            let got = (img.width, img.height);
            assert!(
                got == probed || (p.exif == ExifOrientation::Apply && got == (probed.1, probed.0)),
                "decoded {got:?}, the header said {probed:?}"
            );
            assert_eq!(
                img.format,
                format!("{:?}", probe.format).to_lowercase(),
                "format"
            );
            let allowed = probe.decode_bytes as usize + data.len() + ALLOWANCE;
            assert!(
                peak <= allowed,
                "decoding {}x{} {} took {peak} bytes at once, the header's estimate is {} (+ {} allowed)",
                img.width,
                img.height,
                img.format,
                probe.decode_bytes,
                allowed - probe.decode_bytes as usize
            );
        }
        (Ok(_), Err(e)) => panic!("run() decoded an image whose header probe() refused: {e}"),
        (Err(e), Err(pe)) if panics_in(pe) => assert!(matches!(e, PreprocessError::Undecodable(_))),
        (Err(e), Err(pe)) => assert_eq!(e, pe, "run() and probe() refuse differently"),
        (Err(_), Ok(_)) => {}
    }
    if let Err(e) = &out {
        check_error(e, data);
    }
    out.is_ok()
}

fuzz_target!(|data: &[u8]| {
    let apply = preprocessor(ExifOrientation::Apply);
    let (probe, panics) = caught(|| apply.probe(data));
    check_caught(&probe, panics);
    match &probe {
        Ok(probe) => {
            let pixels = u64::from(probe.width) * u64::from(probe.height);
            assert!(probe.width > 0 && probe.height > 0 && pixels <= MAX_PIXELS);
            assert!(
                probe.decode_bytes <= pixels * 14 && probe.decode_bytes <= BUDGET,
                "the header's estimate ({} bytes for {pixels} pixels) is over the budget",
                probe.decode_bytes
            );
        }
        Err(e) => check_error(e, data),
    }
    let applied = check(&apply, data, &probe);
    let ignored = check(&preprocessor(ExifOrientation::Ignore), data, &probe);
    assert_eq!(
        applied, ignored,
        "the EXIF setting changed whether the image decodes"
    );
});
