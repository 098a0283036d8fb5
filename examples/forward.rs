//! Raw forward-pass throughput through the project's own model code, no HTTP, no decoding:
//! the reference that end-to-end throughput is compared with. The input is a batch of 8-bit
//! crops, as the server queues them; scaling and normalising them on the batch is part of the
//! pass, as it is in the server.
//!
//!     cargo run --release --example forward -- --model-dir models/resnet18 --precision fp32 --batches 1,2,4,8,16,32 --seconds 3
//!
//! `--memory-format contiguous|channels-last` compares layouts; `--gap-ms N` sleeps N ms before
//! each timed pass (only the passes are timed), to see what an idle server's first pass costs.
//!
//! Prints one JSON line per batch size: {"precision", "batch", "images_per_s", "ms_per_batch"}.

use std::time::{Duration, Instant};

use tch_serve::config::{MemoryFormat, Precision};
use tch_serve::metadata::ModelMetadata;
use tch_serve::model::{Classifier, TorchClassifier};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(arg("--model-dir", "models/resnet18"));
    let precision = match arg("--precision", "fp32").as_str() {
        "bf16" => Precision::Bf16,
        "fp16" => Precision::Fp16,
        _ => Precision::Fp32,
    };
    let memory_format = match arg("--memory-format", "auto").as_str() {
        "contiguous" => MemoryFormat::Contiguous,
        "channels-last" => MemoryFormat::ChannelsLast,
        _ => MemoryFormat::Auto,
    };
    let device = match arg("--device", "cpu").as_str() {
        "cpu" => tch::Device::Cpu,
        d => tch::Device::Cuda(
            d.strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        ),
    };
    let threads: i32 = arg("--threads", "0").parse()?;
    let seconds: f64 = arg("--seconds", "3").parse()?;
    let gap = Duration::from_secs_f64(arg("--gap-ms", "0").parse::<f64>()? / 1000.0);
    let batches: Vec<usize> = arg("--batches", "1,2,4,8,16,32")
        .split(',')
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let _guard = tch::no_grad_guard();
    let meta = ModelMetadata::load(&dir)?;
    let mut model = TorchClassifier::load(&dir, &meta, device, precision, memory_format)?;
    let per = (meta.input_size as usize).pow(2) * 3;
    for &b in &batches {
        let input: Vec<u8> = (0..b * per).map(|i| (i % 251) as u8).collect();
        let warm = Instant::now();
        for _ in 0..3 {
            model.forward(&input, b)?;
        }
        let warm_ms = warm.elapsed().as_secs_f64() * 1000.0 / 3.0;
        let start = Instant::now();
        let mut n = 0usize;
        let mut busy = Duration::ZERO;
        while start.elapsed() < Duration::from_secs_f64(seconds) || n < 3 {
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let t = Instant::now();
            model.forward(&input, b)?;
            busy += t.elapsed();
            n += 1;
        }
        let dt = busy.as_secs_f64();
        println!(
            "{{\"precision\":\"{:?}\",\"batch\":{b},\"images_per_s\":{:.2},\"ms_per_batch\":{:.3},\"warmup_ms_per_batch\":{:.1}}}",
            precision,
            (n * b) as f64 / dt,
            dt * 1000.0 / n as f64,
            warm_ms
        );
    }
    Ok(())
}
