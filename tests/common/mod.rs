//! Shared helpers of the integration tests, and the fake model that the HTTP tests run on.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use http_body_util::BodyExt;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use tch_serve::Server;
use tch_serve::config::{Cli, ServeConfig};
use tch_serve::model::{Backend, Classifier, Loaded, ModelSpec};
use tower::ServiceExt;

pub mod fuzzing;

pub const INPUT: u32 = 32;

/// Default settings plus `args`, as the command line would give them.
pub fn config(args: &[&str]) -> ServeConfig {
    let mut argv = vec!["tch-serve"];
    argv.extend_from_slice(args);
    let mut c = <Cli as clap::Parser>::try_parse_from(argv).unwrap().serve;
    c.preprocess_threads = c.preprocess_threads.max(2);
    c
}

/// A gate that forward passes wait at until the test lets them through; it counts the passes
/// that have reached it, so a test can wait for that event instead of sleeping.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    permits: usize,
    arrived: usize,
}

impl Gate {
    /// Lets every pass through from now on.
    pub fn open(&self) {
        let (m, c) = &*self.inner;
        m.lock().unwrap().open = true;
        c.notify_all();
    }

    /// Lets `n` more passes through.
    pub fn release(&self, n: usize) {
        let (m, c) = &*self.inner;
        m.lock().unwrap().permits += n;
        c.notify_all();
    }

    /// Forward passes that have reached the gate so far.
    pub fn arrived(&self) -> usize {
        self.inner.0.lock().unwrap().arrived
    }

    /// Waits (without blocking the runtime) until `n` passes have reached the gate.
    pub async fn wait_arrived(&self, n: usize) {
        while self.arrived() < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Arrives at the gate and waits there until let through.
    pub fn pass(&self) {
        let (m, c) = &*self.inner;
        let mut s = m.lock().unwrap();
        s.arrived += 1;
        c.notify_all();
        while !s.open && s.permits == 0 {
            s = c.wait(s).unwrap();
        }
        if !s.open {
            s.permits -= 1;
        }
    }
}

/// A short request timeout (800 ms) and upload deadlines far beyond it: what decides when a
/// body that stops coming is answered is then the request's own time limit.
pub const SHORT_REQUEST_LONG_UPLOAD: &[&str] = &[
    "--request-timeout-ms",
    "800",
    "--upload-timeout-secs",
    "28",
    "--upload-rate-grace-secs",
    "25",
];

/// How a fake model behaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Time each forward pass takes.
    pub delay: Duration,
    /// Forward passes wait here first.
    pub gate: Option<Gate>,
    /// Every forward pass fails.
    pub failing: bool,
    /// The worker's loop panics outside the forward pass (a stand-in for a bug that kills it).
    pub crash_worker: bool,
    /// Loading fails with this message.
    pub load_error: Option<String>,
    /// Loading waits here first.
    pub load_gate: Option<Gate>,
}

/// A stand-in classifier for fast tests of the HTTP layer: its scores are a deterministic
/// function of the image's per-channel means.
pub struct FakeClassifier {
    pub classes: usize,
    pub input_size: usize,
    pub behaviour: Behaviour,
    pub passes: Arc<AtomicUsize>,
}

impl Classifier for FakeClassifier {
    fn forward(&mut self, pixels: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
        if let Some(g) = &self.behaviour.gate {
            g.pass();
        }
        std::thread::sleep(self.behaviour.delay);
        self.passes.fetch_add(1, Ordering::SeqCst);
        if self.behaviour.failing {
            anyhow::bail!("the fake model fails on purpose");
        }
        let per = self.input_size * self.input_size * 3;
        anyhow::ensure!(
            pixels.len() == n * per,
            "{} bytes for {n} images",
            pixels.len()
        );
        let mut out = Vec::with_capacity(n * self.classes);
        for img in pixels.chunks_exact(per) {
            let mut mean = [0f64; 3];
            for px in img.chunks_exact(3) {
                for c in 0..3 {
                    mean[c] += f64::from(px[c]) / 255.0;
                }
            }
            let pixels = (per / 3) as f64;
            let logits: Vec<f64> = (0..self.classes)
                .map(|k| {
                    let k = k as f64;
                    (mean[0] / pixels) * (k + 1.0).sin() * 3.0
                        + (mean[1] / pixels) * (k * 0.7).cos() * 2.0
                        + (mean[2] / pixels) * (k * 1.3 + 0.5).sin()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            out.extend(logits.iter().map(|l| ((l - max).exp() / sum) as f32));
        }
        Ok(out)
    }

    fn forward_tensor(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        // The same function of the per-channel means, on floats taken back to bytes.
        let per = self.input_size * self.input_size;
        let mut pixels = Vec::with_capacity(input.len());
        for img in input.chunks_exact(3 * per) {
            for i in 0..per {
                for c in 0..3 {
                    pixels.push((img[c * per + i] * 64.0 + 128.0).clamp(0.0, 255.0) as u8);
                }
            }
        }
        self.forward(&pixels, n)
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn input_size(&self) -> usize {
        self.input_size
    }

    fn padded_batch(&self, n: usize) -> usize {
        if self.behaviour.crash_worker && self.passes.load(Ordering::SeqCst) > 0 {
            panic!("the fake worker crashes on purpose");
        }
        n
    }
}

/// Builds fake classifiers; each model behaves as set for its name (default: instant).
#[derive(Clone, Default)]
pub struct FakeBackend {
    pub behaviours: Arc<Mutex<HashMap<String, Behaviour>>>,
    /// Loads that succeeded.
    pub loads: Arc<AtomicUsize>,
    /// Every load begun, failed or not.
    pub attempts: Arc<AtomicUsize>,
    pub passes: Arc<AtomicUsize>,
    pub quiet: Arc<AtomicBool>,
}

impl FakeBackend {
    pub fn with(name: &str, b: Behaviour) -> Self {
        let f = Self::default();
        f.set(name, b);
        f
    }

    pub fn set(&self, name: &str, b: Behaviour) {
        self.behaviours.lock().unwrap().insert(name.to_owned(), b);
    }
}

impl Backend for FakeBackend {
    fn load(&self, spec: &ModelSpec) -> anyhow::Result<Loaded> {
        let b = self
            .behaviours
            .lock()
            .unwrap()
            .get(&spec.name)
            .cloned()
            .unwrap_or_default();
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if let Some(g) = &b.load_gate {
            g.pass();
        }
        if let Some(e) = &b.load_error {
            anyhow::bail!("{e}");
        }
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Loaded {
            classifier: Box::new(FakeClassifier {
                classes: spec.meta.labels.len(),
                input_size: spec.meta.input_size as usize,
                behaviour: b,
                passes: self.passes.clone(),
            }),
            device: "cpu".into(),
            on_cpu: true,
        })
    }
}

/// Writes a fake model's `metadata.json` (and an empty model file) into `dir`.
pub fn write_fake_model(dir: &Path, name: &str, classes: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let meta = serde_json::json!({
        "name": name,
        "input_size": INPUT,
        "resize_size": 40,
        "labels": (0..classes).map(|i| format!("class{i}")).collect::<Vec<_>>(),
        "trained": false,
        "weights": "fake",
    });
    std::fs::write(dir.join("metadata.json"), meta.to_string()).unwrap();
    std::fs::write(dir.join("model.pt"), b"").unwrap();
}

/// A repository folder holding fake models: (folder name, classes).
pub fn fake_repository(models: &[(&str, usize)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (name, classes) in models {
        write_fake_model(&root.path().join(name), name, *classes);
    }
    root
}

/// A server on one fake model named `fake` (10 classes), with `args`, loading (not waited for).
/// The returned folder must outlive the server.
pub fn start_fake(args: &[&str], backend: FakeBackend) -> (Server, tempfile::TempDir) {
    let root = fake_repository(&[("fake", 10)]);
    let dir = root.path().join("fake");
    let mut all = vec!["--model-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let server = Server::start(config(&all), Arc::new(backend)).unwrap();
    (server, root)
}

/// A ready server on the fake model (10 classes), every forward pass taking `delay`.
pub async fn fake_server(args: &[&str], delay: Duration) -> FakeServer {
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            delay,
            ..Default::default()
        },
    );
    fake_server_with(args, backend).await
}

/// A ready server on the fake model with the given backend.
pub async fn fake_server_with(args: &[&str], backend: FakeBackend) -> FakeServer {
    let (mut server, root) = start_fake(args, backend.clone());
    server.wait_ready().await.unwrap();
    FakeServer {
        server,
        backend,
        _root: root,
    }
}

/// A server with its fake backend and the folder of its model.
pub struct FakeServer {
    pub server: Server,
    pub backend: FakeBackend,
    pub _root: tempfile::TempDir,
}

impl std::ops::Deref for FakeServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Serves `server` on a real socket on 127.0.0.1; returns its address, the token that stops it
/// and the task that ends when it has stopped.
pub async fn serve_on_socket(
    server: Server,
) -> (
    std::net::SocketAddr,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, stop.clone()));
    (addr, stop, task)
}

/// The value of a metric series in Prometheus' text format (the first line that starts with
/// `series`), or None.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` until it returns true (every 5 ms, up to `limit`); false if it never did.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
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
