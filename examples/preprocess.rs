//! Decode-and-resize cost per image through the server's own preprocessing code, one thread:
//! the CPU work each request adds to the forward pass.
//!
//!     cargo run --release --example preprocess -- --model-dir models/resnet18 --seconds 2 photo.jpg ...
//!
//! Prints one JSON line per file: {"file", "width", "height", "ms", "ms_scaled", "ms_decode"}:
//! the whole preprocessing with the full decode (`--jpeg-scaled-decode off`) and with scaled
//! JPEG decoding (`auto`), and the full decode alone.

use std::time::{Duration, Instant};

use tch_serve::metadata::ModelMetadata;
use tch_serve::preprocess::{JpegScaledDecode, Preprocessor, decode_rgb};

fn time_per_call(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs_f64(seconds) || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut seconds, mut files) = ("models/resnet18".to_string(), 1.0, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model-dir" => dir = args.next().unwrap_or(dir),
            "--seconds" => seconds = args.next().unwrap_or_default().parse()?,
            _ => files.push(a),
        }
    }
    let meta = ModelMetadata::load(std::path::Path::new(&dir))?;
    let pre = Preprocessor::for_model(&meta, u64::MAX).with_jpeg_scaling(JpegScaledDecode::Off);
    let scaled = Preprocessor::for_model(&meta, u64::MAX).with_jpeg_scaling(JpegScaledDecode::Auto);
    for file in files {
        let bytes = std::fs::read(&file)?;
        let out = pre
            .run(&bytes)
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let ms = time_per_call(seconds, || {
            pre.run(&bytes).expect("decoded once already");
        });
        let ms_scaled = time_per_call(seconds, || {
            scaled.run(&bytes).expect("decoded once already");
        });
        let ms_decode = time_per_call(seconds, || {
            decode_rgb(&bytes, u64::MAX).expect("decoded once already");
        });
        println!(
            "{{\"file\":{:?},\"width\":{},\"height\":{},\"ms\":{ms:.3},\"ms_scaled\":{ms_scaled:.3},\"ms_decode\":{ms_decode:.3}}}",
            file, out.width, out.height
        );
    }
    Ok(())
}
