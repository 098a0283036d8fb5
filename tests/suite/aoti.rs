//! AOTInductor packages (`.pt2`): the pretrained EfficientNet-Lite0 that the setup step exports
//! both as TorchScript (`models/efficientnet_lite0`) and as a package
//! (`models/efficientnet_lite0_aoti`, `models/export.py --format aoti`), against each other and
//! against torchvision in Python (tests/python/reference.py); every batch size its dynamic batch
//! dimension takes; the int8 package (`--format aoti --quantize int8`) against the fp32 one;
//! packages that cannot run here refused at load with the reason; and a broken new version of a
//! served package leaving the old one serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use tch_serve::Server;
use tch_serve::config::{MemoryFormat, Precision};
use tch_serve::metadata::{ModelFormat, ModelMetadata};
use tch_serve::model::{Backend, Classifier, ModelSpec, TorchBackend, TorchClassifier};
use tch_serve::preprocess::Preprocessor;

fn models() -> PathBuf {
    model_dir().parent().unwrap().to_path_buf()
}

fn package_dir() -> PathBuf {
    models().join("efficientnet_lite0_aoti")
}

fn int8_package_dir() -> PathBuf {
    models().join("efficientnet_lite0_aoti_int8")
}

fn load(dir: &Path) -> (TorchClassifier, ModelMetadata) {
    let meta = ModelMetadata::load(dir).unwrap_or_else(|e| {
        panic!("{e:#}: the setup step exports it (`make model`)");
    });
    let _guard = tch::no_grad_guard();
    let model = TorchClassifier::load(
        dir,
        &meta,
        tch::Device::Cpu,
        Precision::Fp32,
        MemoryFormat::Auto,
    )
    .unwrap();
    (model, meta)
}

/// The photos of the reference set, decoded and cropped as the server does.
fn photos(meta: &ModelMetadata) -> Vec<(String, Vec<u8>, Vec<f32>)> {
    let path = test_data_dir().join("efficientnet_lite0/reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make test-data`", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pre = Preprocessor::for_model(meta, 100_000_000);
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let file = r["file"].as_str().unwrap().to_owned();
            let pixels = pre
                .run(&std::fs::read(test_data_dir().join(&file)).unwrap())
                .unwrap()
                .pixels;
            let logits = r["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            (file, pixels, logits)
        })
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The package against the TorchScript model in this process (same decoded pixels): the top-1
/// class agrees on at least 99% of the photos. Against torchvision with the TorchScript model in
/// Python (PIL decoding): as often as the TorchScript model does. The largest probability
/// differences are reported.
#[test]
fn the_package_agrees_with_torchscript_and_torchvision_on_real_photos() {
    let (mut package, meta) = load(&package_dir());
    assert_eq!(meta.format, ModelFormat::Aoti);
    let (mut script, script_meta) = load(&models().join("efficientnet_lite0"));
    assert_eq!(script_meta.format, ModelFormat::Torchscript);
    let photos = photos(&meta);
    assert!(
        photos.len() >= 40,
        "expected the photos and the accuracy set"
    );
    let (mut same_as_script, mut same_as_python, mut script_as_python) = (0, 0, 0);
    let (mut worst_script, mut worst_python) = (0f32, 0f32);
    for (file, pixels, logits) in &photos {
        let ours = package.forward(pixels, 1).unwrap();
        let theirs = script.forward(pixels, 1).unwrap();
        let python = softmax(logits);
        let d_script = largest_difference(&ours, &theirs);
        let d_python = largest_difference(&ours, &python);
        worst_script = worst_script.max(d_script);
        worst_python = worst_python.max(d_python);
        same_as_script += usize::from(argmax(&ours) == argmax(&theirs));
        same_as_python += usize::from(argmax(&ours) == argmax(&python));
        script_as_python += usize::from(argmax(&theirs) == argmax(&python));
        println!("{file:32} |dp| vs TorchScript {d_script:.2e}, vs torchvision {d_python:.2e}");
    }
    let n = photos.len();
    println!(
        "PARITY: efficientnet_lite0 .pt2 on {n} photos: top-1 agrees with TorchScript on {same_as_script}/{n} \
         (largest probability difference {worst_script:.2e}), with torchvision on {same_as_python}/{n} ({worst_python:.2e}; \
         TorchScript: {script_as_python}/{n})"
    );
    assert!(same_as_script * 100 >= n * 99, "{same_as_script}/{n}");
    // Against torchvision, the decoders differ (PIL's libjpeg and resize against ours): the
    // package agrees with it as often as the TorchScript model does.
    assert!(
        same_as_python >= script_as_python,
        "{same_as_python} against {script_as_python}"
    );
    // The same pixels through the same weights: only the kernels' summation order differs.
    assert!(worst_script < 1e-3, "{worst_script}");
    // PIL's decoder and resize against ours, as the TorchScript parity test allows.
    assert!(worst_python < 0.1, "{worst_python}");
}

/// The int8 package (PT2E quantization, compiled into int8 kernels) against the fp32 package of
/// the same network: really quantized (its metadata says int8 and its probabilities are not the
/// fp32 ones); on the photos whose subject is an ImageNet class (the accuracy set, every
/// variant) its top-1 class is among fp32's top 3 on every one, and the same as fp32's wherever
/// fp32 gives its top class at least 0.5. The top-1 agreement on those photos and on the whole
/// photo set (textures and microscopy included, where the top class has a few percent) is
/// reported; near ties (tabby against tiger cat) are where the two part.
#[test]
fn the_int8_package_agrees_with_the_fp32_package_on_real_photos() {
    let (mut int8, meta) = load(&int8_package_dir());
    assert_eq!(meta.format, ModelFormat::Aoti);
    assert_eq!(meta.quantized.as_deref(), Some("int8"));
    let (mut fp32, _) = load(&package_dir());
    let photos = photos(&meta);
    let (mut same, mut subjects, mut same_subjects) = (0, 0, 0);
    let (mut confident, mut same_confident) = (0, 0);
    let mut worst = 0f32;
    for (file, pixels, _) in &photos {
        let q = int8.forward(pixels, 1).unwrap();
        let f = fp32.forward(pixels, 1).unwrap();
        let (top_q, top_f) = (argmax(&q), argmax(&f));
        let agree = top_q == top_f;
        worst = worst.max(largest_difference(&q, &f));
        same += usize::from(agree);
        println!(
            "{file:32} int8 top-1 {top_q} {:.3}, fp32 {top_f} {:.3}",
            q[top_q], f[top_f]
        );
        if !file.starts_with("accuracy/") {
            continue;
        }
        subjects += 1;
        same_subjects += usize::from(agree);
        let rank = f.iter().filter(|&&p| p > f[top_q]).count();
        assert!(
            rank < 3,
            "{file}: int8's top class {top_q} is number {} of fp32's",
            rank + 1
        );
        if f[top_f] >= 0.5 {
            confident += 1;
            same_confident += usize::from(agree);
        }
    }
    let n = photos.len();
    println!(
        "PARITY: efficientnet_lite0 int8 .pt2 against fp32 .pt2: top-1 agrees on {same_subjects}/{subjects} \
         photos of ImageNet subjects ({same_confident}/{confident} where fp32 gives p >= 0.5), {same}/{n} of \
         all photos (largest probability difference {worst:.3})"
    );
    assert!(
        subjects >= 15,
        "expected the accuracy set's photos, got {subjects}"
    );
    assert!(confident >= 5, "{confident}");
    assert_eq!(same_confident, confident);
    // Quantized, not fp32 under another name: int8 rounding moves the probabilities.
    assert!(worst > 1e-3, "{worst}");
}

/// Every batch size from 1 to the package's largest runs through the dynamic batch dimension
/// and gives each image its own answer; one more is refused with an error, and the package
/// still answers afterwards. For the fp32 package and the int8 one.
///
/// "Its own answer": within 1e-4 of the image alone for fp32. An int8 package is held to
/// [`INT8_BATCH_TOLERANCE`]: with more than one intra-op thread the compiled kernels split some
/// of their work by the batch's shape, and the float rounding that moves with the split can
/// push a value across a requantization step, which moves a probability by up to about 1e-2
/// (7.1e-3 over batches of 1 to 64 on an Intel CPU with AMX, two threads; with one thread the
/// answers are identical at every batch size). Distinct photos differ by far more than that,
/// which the test also checks, so a batch that mixed images up still fails.
#[test]
fn every_batch_size_up_to_the_largest_runs_and_one_more_is_refused() {
    batches_up_to_the_largest(&package_dir());
    batches_up_to_the_largest(&int8_package_dir());
}

/// How far an int8 package's answer in a batch may be from its answer alone (see above).
const INT8_BATCH_TOLERANCE: f32 = 2e-2;

fn batches_up_to_the_largest(dir: &Path) {
    let (mut package, meta) = load(dir);
    let tolerance = if meta.quantized.is_some() {
        INT8_BATCH_TOLERANCE
    } else {
        1e-4
    };
    let max = meta.max_batch.expect("the export records max_batch") as usize;
    assert!(max >= 8, "{max}");
    // Five different photos (the reference set holds each as PNG and as JPEG: one of each).
    let images: Vec<Vec<u8>> = photos(&meta)
        .into_iter()
        .filter(|p| p.0.ends_with(".png"))
        .take(5)
        .map(|p| p.1)
        .collect();
    assert_eq!(images.len(), 5);
    let alone: Vec<Vec<f32>> = images
        .iter()
        .map(|x| package.forward(x, 1).unwrap())
        .collect();
    let classes = package.num_classes();
    // The photos' answers are far apart: a batch that gave an image another's answer would be
    // caught by the tolerance.
    let apart = (0..alone.len())
        .flat_map(|i| (i + 1..alone.len()).map(move |j| (i, j)))
        .map(|(i, j)| largest_difference(&alone[i], &alone[j]))
        .fold(f32::INFINITY, f32::min);
    assert!(
        apart > 5.0 * tolerance,
        "two photos' answers differ by only {apart}"
    );
    let mut worst = 0f32;
    for n in 1..=max {
        let batch: Vec<u8> = (0..n)
            .flat_map(|i| images[i % images.len()].clone())
            .collect();
        let out = package.forward(&batch, n).unwrap();
        assert_eq!(out.len(), n * classes, "batch {n}");
        for i in 0..n {
            let d = largest_difference(
                &out[i * classes..(i + 1) * classes],
                &alone[i % images.len()],
            );
            worst = worst.max(d);
            assert!(
                d < tolerance,
                "batch {n}, image {i}: differs from alone by {d} (tolerance {tolerance})"
            );
        }
    }
    println!(
        "BATCHES: {}: 1..={max} through the dynamic dimension, largest difference from alone {worst:.2e} \
         (tolerance {tolerance:.0e}; two photos differ by at least {apart:.2})",
        meta.name
    );
    let batch: Vec<u8> = (0..=max)
        .flat_map(|i| images[i % images.len()].clone())
        .collect();
    let err = package.forward(&batch, max + 1).unwrap_err().to_string();
    assert!(err.contains(&format!("at most {max}")), "{err}");
    assert_eq!(package.forward(&images[0], 1).unwrap(), alone[0]);
}

/// A copy of the package's folder with its metadata.json edited and its package file replaced.
fn variant(edit: impl FnOnce(&mut serde_json::Value), package: Option<&[u8]>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = package_dir();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("metadata.json")).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(dir.path().join("metadata.json"), meta.to_string()).unwrap();
    match package {
        Some(bytes) => std::fs::write(dir.path().join("model.pt2"), bytes).unwrap(),
        None => {
            std::fs::copy(src.join("model.pt2"), dir.path().join("model.pt2")).unwrap();
        }
    }
    dir
}

fn load_error(dir: &Path) -> String {
    let meta = ModelMetadata::load(dir).unwrap();
    let settings = config(&[]).model_defaults();
    let spec = ModelSpec {
        name: "m".into(),
        version: 1,
        dir: dir.to_path_buf(),
        meta,
        settings,
    };
    match TorchBackend.load(&spec) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A corrupt or truncated file, a package for another device, by another torch version or for
/// a CPU with other instructions: each is an error at load that says what is wrong and what to
/// do, and the process carries on.
#[test]
fn a_package_that_cannot_run_here_is_refused_with_the_reason() {
    let real = std::fs::read(package_dir().join("model.pt2")).unwrap();
    let cases: Vec<(&str, tempfile::TempDir, &[&str])> = vec![
        (
            "random bytes",
            variant(|_| {}, Some(&[0x5a; 4096])),
            &["model.pt2", "AOTInductor package"],
        ),
        (
            "truncated",
            variant(|_| {}, Some(&real[..real.len() / 2])),
            &["model.pt2", "AOTInductor package"],
        ),
        (
            "another device",
            variant(|m| m["device"] = "cuda".into(), None),
            &["compiled for cuda", "--device cuda"],
        ),
        (
            "another torch",
            variant(|m| m["torch_version"] = "2.10.0".into(), None),
            &["torch 2.10.0", "export it again"],
        ),
        (
            "another CPU",
            variant(
                |m| m["cpu_flags"] = serde_json::json!(["avx2", "no_such_flag"]),
                None,
            ),
            &["lacks no_such_flag"],
        ),
    ];
    for (what, dir, needles) in &cases {
        let err = load_error(dir.path());
        for needle in *needles {
            assert!(err.contains(needle), "{what}: {needle:?} not in {err}");
        }
        println!(
            "LOAD ERROR ({what}): {}",
            err.lines().next().unwrap_or_default()
        );
    }
    // The real package still loads after all of them.
    let (mut model, meta) = load(&package_dir());
    let x = vec![128u8; (meta.input_size as usize).pow(2) * 3];
    assert_eq!(model.forward(&x, 1).unwrap().len(), model.num_classes());
}

/// Served from a repository: the model's metadata reports the platform, and a corrupt new
/// version found by the poll fails to load with its reason while version 1 keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_package_leaves_the_old_one_serving() {
    let root = tempfile::tempdir().unwrap();
    let v1 = root.path().join("eff/1");
    std::fs::create_dir_all(&v1).unwrap();
    for f in ["metadata.json", "model.pt2"] {
        std::fs::copy(package_dir().join(f), v1.join(f)).unwrap();
    }
    let mut server = Server::start(
        config(&[
            "--model-repository",
            root.path().to_str().unwrap(),
            "--poll-repository-secs",
            "1",
            "--warmup-iterations",
            "1",
        ]),
        Arc::new(TorchBackend),
    )
    .unwrap();
    server.wait_ready().await.unwrap();
    let photo = std::fs::read(test_data_dir().join("accuracy/coffee.jpg")).unwrap();
    let state = server.state.clone();
    let (addr, stop, serving) = serve_on_socket(server).await;
    let client = reqwest::Client::new();
    let predict = || async {
        let resp = client
            .post(format!("http://{addr}/predict"))
            .header("content-type", "application/octet-stream")
            .body(photo.clone())
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<serde_json::Value>().await.unwrap(),
        )
    };
    let (status, body) = predict().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["model"].as_str(), body["version"].as_u64()),
        (Some("eff"), Some(1))
    );
    let first = body["predictions"][0].clone();
    let meta: serde_json::Value = client
        .get(format!("http://{addr}/v2/models/eff"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["platform"], "pytorch_aoti", "{meta}");
    let view = state.repository.view("eff").unwrap();
    assert_eq!(view.format, Some(ModelFormat::Aoti));
    assert_eq!(serde_json::to_value(&view).unwrap()["format"], "aoti");

    let v2 = root.path().join("eff/2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::copy(
        package_dir().join("metadata.json"),
        v2.join("metadata.json"),
    )
    .unwrap();
    std::fs::write(v2.join("model.pt2"), b"PK\x03\x04 not really a zip").unwrap();
    let mut reason = String::new();
    let failed = eventually(Duration::from_secs(20), || {
        let v = state
            .repository
            .view("eff")
            .and_then(|m| m.versions.iter().find(|s| s.version == 2).cloned());
        if let Some(v) = v {
            reason = v.reason.clone().unwrap_or_default();
            return v.state == "failed";
        }
        false
    })
    .await;
    assert!(
        failed,
        "version 2 never reported failed: {}",
        serde_json::to_string(&state.repository.view("eff")).unwrap()
    );
    assert!(reason.contains("AOTInductor package"), "{reason}");
    let (status, body) = predict().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["predictions"][0], first);
    stop.cancel();
    serving.await.unwrap().unwrap();
}
