//! End to end through HTTP on the ImageNet-pretrained model of the repository the Makefile
//! serves (`models/`), as TorchScript and as AOTInductor packages (fp32, int8): real photos whose subject is an ImageNet class (tests/data/accuracy.json
//! says which classes are right for each, and why) get a right class in their top 5, and most
//! in their top 1; PNG, grayscale and JPEG files of them and a multi-image request agree.

use std::collections::HashSet;
use std::sync::Arc;

use crate::common::*;
use tch_serve::Server;
use tch_serve::model::TorchBackend;

struct Photo {
    name: String,
    expected: HashSet<u64>,
}

fn accuracy_set() -> Vec<Photo> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/accuracy.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["photos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Photo {
            name: p["name"].as_str().unwrap().to_owned(),
            expected: p["expected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretrained_model_names_what_is_in_real_photos() {
    let repository = model_dir().parent().unwrap().to_path_buf();
    let mut server = Server::start(
        config(&[
            "--model-repository",
            repository.to_str().unwrap(),
            "--default-model",
            "resnet18",
            "--warmup-iterations",
            "1",
        ]),
        Arc::new(TorchBackend),
    )
    .unwrap();
    server.wait_ready().await.unwrap();
    // The same network as TorchScript, as an AOTInductor package, and as an int8 one.
    for model in [
        "efficientnet_lite0",
        "efficientnet_lite0_aoti",
        "efficientnet_lite0_aoti_int8",
    ] {
        names_what_is_in_real_photos(&server, model).await;
    }
    // The untrained default model answers /predict, and says it is untrained.
    let (resp, body) = send(
        &server,
        predict_raw(
            "/predict",
            "application/octet-stream",
            std::fs::read(test_data_dir().join("accuracy/coffee.jpg")).unwrap(),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        (body["model"].as_str(), body["trained"].as_bool()),
        (Some("resnet18"), Some(false))
    );
}

/// One pretrained model of the server's repository on the accuracy set, through /predict.
async fn names_what_is_in_real_photos(server: &Server, model: &str) {
    let photos = accuracy_set();
    assert!(
        photos.len() >= 5,
        "the accuracy set has {} photos",
        photos.len()
    );
    let dir = test_data_dir().join("accuracy");
    let mut summary = Vec::new();
    let mut answers = std::collections::HashMap::new();
    for (variant, file) in [
        ("png", "{}.png"),
        ("gray", "{}_gray.png"),
        ("jpeg", "{}.jpg"),
    ] {
        let (mut top1, mut top5) = (0, 0);
        for p in &photos {
            let bytes = std::fs::read(dir.join(file.replace("{}", &p.name))).unwrap();
            let (resp, body) = send(
                server,
                predict_raw(
                    &format!("/predict?model={model}"),
                    "application/octet-stream",
                    bytes,
                ),
            )
            .await;
            assert_eq!(resp.status(), 200, "{}: {body}", p.name);
            assert_eq!(body["model"], model);
            assert_eq!(body["trained"], true);
            let ranked = ranking(&body["results"][0]);
            let classes: Vec<u64> = ranked.iter().map(|r| r.0).collect();
            println!(
                "{variant:4} {:10} top-5 {:?} {:?}",
                p.name,
                body["predictions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["label"].as_str().unwrap())
                    .collect::<Vec<_>>(),
                ranked
                    .iter()
                    .map(|r| (r.1 * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            );
            if p.expected.contains(&classes[0]) {
                top1 += 1;
            }
            assert!(
                classes.iter().any(|c| p.expected.contains(c)),
                "{variant} {}: no right class in the top 5 {classes:?} (right: {:?})",
                p.name,
                p.expected
            );
            top5 += 1;
            answers.insert((variant, p.name.clone()), ranked);
        }
        assert!(
            top1 * 2 > photos.len(),
            "{variant}: top-1 right on only {top1}/{}",
            photos.len()
        );
        summary.push(format!(
            "{variant} top-1 {top1}/{n}, top-5 {top5}/{n}",
            n = photos.len()
        ));
    }
    println!(
        "ACCURACY: {model} on {} photos: {}",
        photos.len(),
        summary.join("; ")
    );

    // The PNG and JPEG files of a photo agree on the top class (or it is a near tie), and
    // so does the photo sent in one multi-image request with the others.
    let files: Vec<Vec<u8>> = photos
        .iter()
        .map(|p| std::fs::read(dir.join(format!("{}.png", p.name))).unwrap())
        .collect();
    let parts: Vec<(&str, &str, &[u8])> = photos
        .iter()
        .zip(&files)
        .map(|(p, f)| ("file", p.name.as_str(), f.as_slice()))
        .collect();
    let (resp, body) = send(
        server,
        predict_multipart(&format!("/models/{model}/predict"), &parts),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), photos.len());
    // An int8 model's answer may move by a requantization step with the batch's shape when its
    // kernels split their work across threads (tests/suite/aoti.rs says how far): its tolerance.
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            model_dir()
                .parent()
                .unwrap()
                .join(model)
                .join("metadata.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tolerance = if meta["quantized"].is_string() {
        2e-2
    } else {
        1e-3
    };
    for (p, r) in photos.iter().zip(results) {
        assert_eq!(r["filename"], p.name.as_str());
        let batched = ranking(r);
        let alone = &answers[&("png", p.name.clone())];
        assert!(
            batched[0].0 == alone[0].0 || (alone[0].1 - alone[1].1).abs() < tolerance,
            "{}: in a batch {:?} and alone {:?}",
            p.name,
            batched[0],
            alone[0]
        );
        assert!(
            (batched[0].1 - alone[0].1).abs() < tolerance,
            "{}: in a batch {:?} and alone {:?} (tolerance {tolerance})",
            p.name,
            batched[0],
            alone[0]
        );
        let jpeg = &answers[&("jpeg", p.name.clone())];
        assert!(
            jpeg[0].0 == alone[0].0 || (alone[0].1 - alone[1].1).abs() < 0.05,
            "{}: PNG says {:?}, JPEG {:?}",
            p.name,
            alone[0],
            jpeg[0]
        );
    }
}

/// Scaled JPEG decoding (`--jpeg-scaled-decode auto`, libjpeg-turbo) against the full decode on
/// phone-sized photos of the pretrained model: the real photos upscaled to 3 and 12
/// megapixels (and a 4:3 crop of each at 8 MP) with sensor-like noise, saved as JPEG at
/// quality 90. Prints the top-1 agreement, the largest probability difference and the decode
/// times; fails when the two disagree on a photo the model is sure of (top-1 probability of
/// 0.3 or more in the full decode), or when a probability moves by more than 0.05.
#[test]
fn scaled_jpeg_decoding_agrees_with_the_full_decode_on_phone_sized_photos() {
    use fast_image_resize::images::Image;
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    use tch_serve::config::{MemoryFormat, Precision};
    use tch_serve::metadata::ModelMetadata;
    use tch_serve::model::{Classifier, TorchClassifier};
    use tch_serve::preprocess::{JpegScaledDecode, Preprocessor};

    let dir = model_dir().parent().unwrap().join("efficientnet_lite0");
    let meta = ModelMetadata::load(&dir).unwrap();
    let _guard = tch::no_grad_guard();
    let mut model = TorchClassifier::load(
        &dir,
        &meta,
        tch::Device::Cpu,
        Precision::Fp32,
        MemoryFormat::Auto,
    )
    .unwrap();
    let full = Preprocessor::for_model(&meta, 100_000_000).with_jpeg_scaling(JpegScaledDecode::Off);
    let scaled =
        Preprocessor::for_model(&meta, 100_000_000).with_jpeg_scaling(JpegScaledDecode::Auto);

    let photos_dir = test_data_dir().join("photos");
    let mut names: Vec<String> = std::fs::read_dir(&photos_dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".png")?;
            (!stem.contains('_')).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 8, "{names:?}");
    let (mut n, mut agree, mut worst) = (0usize, 0usize, 0f32);
    let (mut t_full, mut t_scaled) = (0f64, 0f64);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for name in &names {
        let src = image::open(photos_dir.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        for (w, h) in [(2016u32, 1512u32), (3264, 2448), (4032, 3024)] {
            let (w, h) = if src.height() > src.width() {
                (h, w)
            } else {
                (w, h)
            };
            let from = fast_image_resize::images::ImageRef::new(
                src.width(),
                src.height(),
                src.as_raw(),
                PixelType::U8x3,
            )
            .unwrap();
            let mut big = Image::new(w, h, PixelType::U8x3);
            Resizer::new()
                .resize(
                    &from,
                    &mut big,
                    &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
                )
                .unwrap();
            let mut pixels = big.into_vec();
            // Sensor-like noise (xorshift), so that the JPEG has a phone photo's fine detail.
            for p in pixels.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = (seed % 17) as i16 - 8;
                *p = (i16::from(*p) + noise).clamp(0, 255) as u8;
            }
            let img = image::RgbImage::from_raw(w, h, pixels).unwrap();
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&img)
                .unwrap();
            let t = std::time::Instant::now();
            let a = full.run(&jpeg).unwrap();
            t_full += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let b = scaled.run(&jpeg).unwrap();
            t_scaled += t.elapsed().as_secs_f64();
            assert_eq!((a.width, a.height), (b.width, b.height));
            let pa = model.forward(&a.pixels, 1).unwrap();
            let pb = model.forward(&b.pixels, 1).unwrap();
            let top = |p: &[f32]| (0..p.len()).max_by(|&i, &j| p[i].total_cmp(&p[j])).unwrap();
            let diff = pa
                .iter()
                .zip(&pb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff);
            n += 1;
            if top(&pa) == top(&pb) {
                agree += 1;
            } else {
                assert!(
                    pa[top(&pa)] < 0.3,
                    "{name} {w}x{h}: the scaled decode changed a clear answer"
                );
                println!(
                    "{name} {w}x{h}: full says {} ({:.3}), scaled {} ({:.3})",
                    top(&pa),
                    pa[top(&pa)],
                    top(&pb),
                    pb[top(&pb)]
                );
            }
        }
    }
    println!(
        "ACCURACY: scaled JPEG decoding on {n} phone-sized photos: top-1 agrees on {agree}/{n}, largest probability difference {worst:.4}; preprocessing {:.1} ms full, {:.1} ms scaled per photo ({:.1}x)",
        t_full * 1e3 / n as f64,
        t_scaled * 1e3 / n as f64,
        t_full / t_scaled
    );
    assert!(worst < 0.05, "a probability moved by {worst}");
}
