//! End to end through HTTP on the ImageNet-pretrained model of the repository the Makefile
//! serves (`models/`): real photos whose subject is an ImageNet class (tests/data/accuracy.json
//! says which classes are right for each, and why) get a right class in their top 5, and most
//! in their top 1; PNG, grayscale and JPEG files of them and a multi-image request agree.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
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
                &server,
                predict_raw(
                    "/predict?model=efficientnet_lite0",
                    "application/octet-stream",
                    bytes,
                ),
            )
            .await;
            assert_eq!(resp.status(), 200, "{}: {body}", p.name);
            assert_eq!(body["model"], "efficientnet_lite0");
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
        "ACCURACY: efficientnet_lite0 on {} photos: {}",
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
        &server,
        predict_multipart("/models/efficientnet_lite0/predict", &parts),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), photos.len());
    for (p, r) in photos.iter().zip(results) {
        assert_eq!(r["filename"], p.name.as_str());
        let batched = ranking(r);
        let alone = &answers[&("png", p.name.clone())];
        assert_eq!(batched[0].0, alone[0].0, "{}: in a batch and alone", p.name);
        assert!((batched[0].1 - alone[0].1).abs() < 1e-3, "{}", p.name);
        let jpeg = &answers[&("jpeg", p.name.clone())];
        assert!(
            jpeg[0].0 == alone[0].0 || (alone[0].1 - alone[1].1).abs() < 0.05,
            "{}: PNG says {:?}, JPEG {:?}",
            p.name,
            alone[0],
            jpeg[0]
        );
    }
    // The untrained default model answers /predict, and says it is untrained.
    let (resp, body) = send(
        &server,
        predict_raw(
            "/predict",
            "application/octet-stream",
            std::fs::read(dir.join("coffee.jpg")).unwrap(),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        (body["model"].as_str(), body["trained"].as_bool()),
        (Some("resnet18"), Some(false))
    );
}
