//! The real TorchScript model exported by `models/export.py` (the setup step does it), against
//! the Python reference answers written by `tests/python/reference.py`.

use std::time::Duration;

use crate::common::*;
use tch_serve::config::{MemoryFormat, Precision};
use tch_serve::metadata::ModelMetadata;
use tch_serve::model::{Classifier, TorchClassifier};
use tch_serve::preprocess::Preprocessor;

struct Reference {
    file: String,
    logits: Vec<f32>,
    top5: Vec<usize>,
    /// Python's top-5 probabilities, where the reference has them.
    top5_probabilities: Vec<f32>,
}

fn references() -> Vec<Reference> {
    references_in(&test_data_dir().join("reference.json"))
}

fn references_in(path: &std::path::Path) -> Vec<Reference> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `make test-data` (the test command does)",
            path.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Reference {
            file: r["file"].as_str().unwrap().to_owned(),
            logits: r["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
            top5: r["top5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            top5_probabilities: r["top5_probabilities"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_f64().unwrap() as f32).collect())
                .unwrap_or_default(),
        })
        .collect()
}

fn load(precision: Precision) -> (TorchClassifier, ModelMetadata) {
    load_as(precision, MemoryFormat::Auto)
}

fn load_as(precision: Precision, format: MemoryFormat) -> (TorchClassifier, ModelMetadata) {
    load_dir(&model_dir(), precision, format)
}

fn load_dir(
    dir: &std::path::Path,
    precision: Precision,
    format: MemoryFormat,
) -> (TorchClassifier, ModelMetadata) {
    let dir = dir.to_path_buf();
    let meta =
        ModelMetadata::load(&dir).expect("the setup step exports models/resnet18 (`make model`)");
    let _guard = tch::no_grad_guard();
    let model = TorchClassifier::load(&dir, &meta, tch::Device::Cpu, precision, format).unwrap();
    (model, meta)
}

#[test]
fn channels_last_weights_by_default_and_same_answers_as_nchw() {
    let refs = references();
    let mut answers = Vec::new();
    for (format, channels_last) in [
        (MemoryFormat::Auto, true),
        (MemoryFormat::ChannelsLast, true),
        (MemoryFormat::Contiguous, false),
    ] {
        for precision in [Precision::Fp32, Precision::Bf16] {
            let (mut model, meta) = load_as(precision, format);
            assert_eq!(
                model.weights_channels_last().unwrap(),
                channels_last,
                "{format:?} {precision:?}"
            );
            if precision == Precision::Fp32 {
                let pre = Preprocessor::for_model(&meta, 100_000_000);
                let bytes = std::fs::read(test_data_dir().join(&refs[0].file)).unwrap();
                answers.push(model.forward(&pre.run(&bytes).unwrap().pixels, 1).unwrap());
            }
        }
    }
    let (cl, nchw) = (&answers[0], &answers[2]);
    let diff = cl
        .iter()
        .zip(nchw)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "channels-last and NCHW differ by {diff}");
    assert_eq!(top5(cl), top5(nchw));
}

fn logits_from_probs(probs: &[f32]) -> Vec<f32> {
    // log-softmax is logits minus a constant; compare centred values.
    let logs: Vec<f32> = probs
        .iter()
        .map(|p| p.max(f32::MIN_POSITIVE).ln())
        .collect();
    let mean = logs.iter().sum::<f32>() / logs.len() as f32;
    logs.iter().map(|l| l - mean).collect()
}

fn centred(v: &[f32]) -> Vec<f32> {
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    v.iter().map(|x| x - mean).collect()
}

fn top5(probs: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
    idx.truncate(5);
    idx
}

/// Rust decode + resize + normalise + libtorch forward against PIL + torchvision + the same
/// model in Python, on real photos. Tolerances: lossless files (PNG, WebP lossless, BMP, GIF)
/// decode to identical pixels, so only resize rounding (at most 1 level of 255 per channel)
/// and float summation order remain: centred logits within 0.02. JPEG decoders (libjpeg-turbo
/// in PIL, zune-jpeg here) may differ by a level here and there: within 0.05.
#[test]
fn parity_with_torchvision_on_real_photos() {
    let refs = references();
    let (top1_same, top5_same) = parity(&model_dir(), &refs, "resnet18");
    assert_eq!(top1_same, refs.len(), "top-1 must agree on every photo");
    assert!(
        top5_same + 1 >= refs.len(),
        "top-5 must agree on all photos but at most one near-tie"
    );
}

/// The same on the ImageNet-pretrained EfficientNet-Lite0, with its own mean and std, on the
/// photos above and the accuracy set. Its answers are confident, so a top-1 class may differ
/// only where Python's first two classes are within 0.02 of each other.
#[test]
fn parity_of_the_pretrained_model_with_torchvision() {
    let dir = model_dir().parent().unwrap().join("efficientnet_lite0");
    let refs = references_in(&test_data_dir().join("efficientnet_lite0/reference.json"));
    assert!(refs.len() >= 40, "expected the photos and the accuracy set");
    let (top1_same, _) = parity(&dir, &refs, "efficientnet_lite0");
    let near_ties = refs
        .iter()
        .filter(|r| r.top5_probabilities.len() >= 2)
        .filter(|r| r.top5_probabilities[0] - r.top5_probabilities[1] < 0.02)
        .count();
    assert!(
        top1_same + near_ties >= refs.len(),
        "top-1 agrees on {top1_same}/{} with {near_ties} near-ties",
        refs.len()
    );
}

/// Rust decode + resize + normalise + libtorch forward against PIL + torchvision + the same
/// model in Python, on real photos. Tolerances: lossless files (PNG, WebP lossless, BMP, GIF)
/// decode to identical pixels, so only resize rounding (at most 1 level of 255 per channel)
/// and float summation order remain: centred logits within 0.02. JPEG decoders (libjpeg-turbo
/// in PIL, zune-jpeg here) may differ by a level here and there: within 0.05. A trained network
/// amplifies those one-level differences (its logits span tens, not tenths): within 0.2
/// (lossless) and 0.3 (JPEG).
/// Returns how many photos agree on the top-1 class and on the top-5 in order.
fn parity(dir: &std::path::Path, refs: &[Reference], name: &str) -> (usize, usize) {
    let (mut model, meta) = load_dir(dir, Precision::Fp32, MemoryFormat::Auto);
    let pre = Preprocessor::for_model(&meta, 100_000_000);
    assert!(refs.len() >= 20, "expected at least 20 reference photos");
    let (lossless_tolerance, jpeg_tolerance) = if meta.trained {
        (0.2, 0.3)
    } else {
        (0.02, 0.05)
    };
    let mut worst_lossless = 0f32;
    let mut worst_jpeg = 0f32;
    let mut top5_same = 0;
    let mut top1_same = 0;
    for r in refs {
        let bytes = std::fs::read(test_data_dir().join(&r.file)).unwrap();
        let input = pre.run(&bytes).unwrap();
        let probs = model.forward(&input.pixels, 1).unwrap();
        let ours = logits_from_probs(&probs);
        let theirs = centred(&r.logits);
        let diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let ours_top5 = top5(&probs);
        let jpeg = r.file.ends_with(".jpg");
        if jpeg {
            worst_jpeg = worst_jpeg.max(diff);
        } else {
            worst_lossless = worst_lossless.max(diff);
        }
        if ours_top5 == r.top5 {
            top5_same += 1;
        }
        if ours_top5[0] == r.top5[0] {
            top1_same += 1;
        }
        println!(
            "{:32} max|dlogit| {diff:.5}  top5 {:?} vs {:?}",
            r.file, ours_top5, r.top5
        );
        assert!(
            diff < if jpeg {
                jpeg_tolerance
            } else {
                lossless_tolerance
            },
            "{}: logits differ by {diff}",
            r.file
        );
    }
    println!(
        "PARITY: {name}: {} photos; largest logit difference {worst_lossless:.5} (lossless), {worst_jpeg:.5} (JPEG); top-1 agrees on {top1_same}/{n}, top-5 (same order) on {top5_same}/{n}",
        refs.len(),
        n = refs.len()
    );
    (top1_same, top5_same)
}

/// The model's answer for a batch equals its answers for each image alone (batching does not
/// mix images up), and bf16 agrees with fp32 on the top-1 class.
#[test]
fn batched_forward_matches_single_and_bf16_agrees() {
    let (mut model, meta) = load(Precision::Fp32);
    let pre = Preprocessor::for_model(&meta, 100_000_000);
    let refs = references();
    let inputs: Vec<Vec<u8>> = refs
        .iter()
        .take(6)
        .map(|r| {
            pre.run(&std::fs::read(test_data_dir().join(&r.file)).unwrap())
                .unwrap()
                .pixels
        })
        .collect();
    let singles: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| model.forward(x, 1).unwrap())
        .collect();
    let batch: Vec<u8> = inputs.concat();
    let batched = model.forward(&batch, inputs.len()).unwrap();
    let classes = model.num_classes();
    for (i, single) in singles.iter().enumerate() {
        let b = &batched[i * classes..(i + 1) * classes];
        let diff = single
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "image {i}: batched and single probabilities differ by {diff}"
        );
        assert_eq!(top5(single), top5(b));
    }
    let (mut bf16, _) = load(Precision::Bf16);
    let mut agree = 0;
    for (x, single) in inputs.iter().zip(&singles) {
        let p = bf16.forward(x, 1).unwrap();
        if top5(&p)[0] == top5(single)[0] {
            agree += 1;
        }
    }
    assert!(
        agree + 1 >= inputs.len(),
        "bf16 top-1 agreed on only {agree}/{}",
        inputs.len()
    );
}

/// Concurrent clients over a real socket with the real model: each gets its own photo's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_photos_each_get_their_own_answer() {
    let dir = model_dir();
    let cfg = config(&[
        "--max-batch-size",
        "8",
        "--max-batch-delay-ms",
        "10",
        "--warmup-iterations",
        "1",
        "--queue-capacity",
        "64",
        "--model-dir",
        dir.to_str().unwrap(),
    ]);
    let mut server =
        tch_serve::Server::start(cfg, std::sync::Arc::new(tch_serve::model::TorchBackend)).unwrap();
    server.wait_ready().await.unwrap();
    let photos: Vec<Vec<u8>> = references()
        .iter()
        .map(|r| std::fs::read(test_data_dir().join(&r.file)).unwrap())
        .collect();
    let mut solo = Vec::new();
    for p in &photos {
        let (resp, body) = send(
            &server,
            predict_raw("/predict", "application/octet-stream", p.clone()),
        )
        .await;
        assert_eq!(resp.status(), 200, "{body}");
        solo.push(ranking(&body["results"][0]));
    }
    // The photos must be told apart by their answers, or a mix-up could not be seen.
    let bases: Vec<String> = references()
        .iter()
        .map(|r| r.file.split(['.', '_']).next().unwrap().to_owned())
        .collect();
    for i in 0..solo.len() {
        for j in 0..i {
            let same = solo[i]
                .iter()
                .zip(&solo[j])
                .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-4);
            let dup = bases[i] == bases[j];
            assert!(!same || dup, "photos {i} and {j} have the same answer");
        }
    }
    let (addr, stop, serving) = serve_on_socket(server).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for round in 0..2 {
        for (i, p) in photos.iter().enumerate() {
            let (client, p) = (client.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let resp = client
                    .post(format!("http://{addr}/predict?round={round}"))
                    .body(p)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let body: serde_json::Value = resp.json().await.unwrap();
                (i, body)
            }));
        }
    }
    let mut max_batch = 0;
    for t in tasks {
        let (i, body) = t.await.unwrap();
        let got = ranking(&body["results"][0]);
        let want = &solo[i];
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "photo {i}"
        );
        for (g, w) in got.iter().zip(want) {
            assert!((g.1 - w.1).abs() < 1e-5, "photo {i}: {g:?} vs {w:?}");
        }
        max_batch = max_batch.max(body["results"][0]["batch_size"].as_u64().unwrap());
    }
    assert!(max_batch > 1, "concurrent requests were never batched");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A normalised tensor sent as such (the protocol's FP32 input) gets the same answer as the
/// image's bytes normalised by the model, in both memory formats.
#[test]
fn tensor_input_matches_pixel_input() {
    let refs = references();
    for format in [MemoryFormat::ChannelsLast, MemoryFormat::Contiguous] {
        let (mut model, meta) = load_as(Precision::Fp32, format);
        let pre = Preprocessor::for_model(&meta, 100_000_000);
        let pixels = pre
            .run(&std::fs::read(test_data_dir().join(&refs[0].file)).unwrap())
            .unwrap()
            .pixels;
        let hwc = tch_serve::preprocess::normalize(&pixels, meta.mean, meta.std);
        let plane = (meta.input_size as usize).pow(2);
        let mut chw = vec![0f32; hwc.len()];
        for (i, px) in hwc.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * plane + i] = px[c];
            }
        }
        let a = model.forward(&pixels, 1).unwrap();
        let b = model.forward_tensor(&chw, 1).unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{format:?}: tensor and pixel inputs differ by {diff}"
        );
        assert!(model.forward_tensor(&chw[1..], 1).is_err());
    }
}
