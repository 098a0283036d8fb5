//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use http_body_util::BodyExt;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use tch_serve::Server;
use tch_serve::batcher::ClassifierFactory;
use tch_serve::config::{Cli, ServeConfig};
use tch_serve::metadata::ModelMetadata;
use tch_serve::model::{Classifier, FakeClassifier};
use tower::ServiceExt;

pub const INPUT: u32 = 32;

/// Default settings plus `args`, as the command line would give them.
pub fn config(args: &[&str]) -> ServeConfig {
    let mut argv = vec!["tch-serve"];
    argv.extend_from_slice(args);
    let mut c = <Cli as clap::Parser>::try_parse_from(argv).unwrap().serve;
    c.preprocess_threads = c.preprocess_threads.max(2);
    c
}

pub fn fake_meta(classes: usize) -> ModelMetadata {
    ModelMetadata {
        name: "fake".into(),
        file: "model.pt".into(),
        input_size: INPUT,
        resize_size: 40,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        labels: (0..classes).map(|i| format!("class{i}")).collect(),
        trained: false,
        weights: Some("fake".into()),
    }
}

pub fn fake_factory(classes: usize, delay: Duration) -> ClassifierFactory {
    Box::new(move || {
        Ok(Box::new(FakeClassifier {
            classes,
            delay,
            input_size: INPUT as usize,
        }) as Box<dyn Classifier>)
    })
}

/// A ready server on the fake classifier (10 classes).
pub async fn fake_server(args: &[&str], delay: Duration) -> Server {
    let mut server = tch_serve::start(
        config(args),
        &fake_meta(10),
        "cpu".into(),
        fake_factory(10, delay),
    )
    .unwrap();
    server.wait_ready().await.unwrap();
    server
}

/// The real model exported by the setup step (`make model`).
pub fn model_dir() -> PathBuf {
    std::env::var_os("TCH_SERVE_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/resnet18"))
}

/// Photos and reference answers written by tests/python/reference.py (`make test-data`).
pub fn test_data_dir() -> PathBuf {
    std::env::var_os("TCH_SERVE_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data"))
}

/// A synthetic image whose colours depend on `seed`, encoded as `format`.
pub fn image_bytes(seed: u32, w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            ((x * (seed % 7 + 1) + seed * 37) % 256) as u8,
            ((y * (seed % 5 + 2) + seed * 11) % 256) as u8,
            (((x + y) * (seed % 3 + 1) + seed * 53) % 256) as u8,
        ])
    }));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn png(seed: u32) -> Vec<u8> {
    image_bytes(seed, 64, 48, ImageFormat::Png)
}

/// A multipart/form-data body with the given (field name, filename, bytes) parts.
pub fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----tchservetestboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn predict_multipart(uri: &str, parts: &[(&str, &str, &[u8])]) -> Request<Body> {
    let (ct, body) = multipart(parts);
    Request::post(uri)
        .header("content-type", ct)
        .body(Body::from(body))
        .unwrap()
}

pub fn predict_raw(uri: &str, content_type: &str, bytes: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", content_type)
        .body(Body::from(bytes))
        .unwrap()
}

/// Sends one request through the router in-process.
pub async fn send(server: &Server, req: Request<Body>) -> (Response<()>, serde_json::Value) {
    let resp = server.router().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (Response::from_parts(parts, ()), json)
}

/// Asserts a JSON error with the given status and code.
pub fn assert_error(resp: &Response<()>, body: &serde_json::Value, status: u16, code: &str) {
    assert_eq!(resp.status().as_u16(), status, "body: {body}");
    assert_eq!(body["code"], code, "body: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "body: {body}"
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
}

/// (index, probability) pairs of an image result's predictions.
pub fn ranking(result: &serde_json::Value) -> Vec<(u64, f64)> {
    result["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["index"].as_u64().unwrap(),
                p["probability"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A PNG chunk: length, type, data, CRC over type and data.
pub fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut typed = kind.to_vec();
    typed.extend_from_slice(data);
    out.extend_from_slice(&typed);
    out.extend_from_slice(&crc32fast::hash(&typed).to_be_bytes());
    out
}

/// A zlib stream of stored (uncompressed) deflate blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65_535).collect()
    };
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}
