//! Command line and environment configuration: every flag has an environment variable of the
//! same meaning (`--max-batch-size` / `TCH_SERVE_MAX_BATCH_SIZE`), and the checks across flags.
//! What is derived from them lives below: one model's settings, the command line's overridden
//! by its `config.json` ([`model`]), and what this machine offers (CPUs, CPU features, the
//! thread split, the device asked for: [`machine`]).

mod machine;
mod model;

pub use machine::{
    DeviceRequest, available_cpus, cpu_features, cpu_flags, native_bf16, parse_device,
    split_threads,
};
pub use model::{ModelOverrides, ModelSettings, VersionPolicy};

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Image-classification inference server for TorchScript models.
#[derive(Debug, Parser)]
#[command(name = "tch-serve", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server settings, used when no subcommand is given (`serve` is the default).
    #[command(flatten)]
    pub serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the model and serve HTTP (the default).
    Serve(Box<ServeConfig>),
    /// Exit 0 if the local server's /health answers 200, 1 otherwise (for container health checks).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// Port of the server to check.
    #[arg(long, env = "TCH_SERVE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere.
    Fp32,
    /// bfloat16 weights and activations (CPUs with AVX512-BF16/AMX, and CUDA).
    Bf16,
    /// float16 weights and activations (CUDA).
    Fp16,
}

pub use crate::telemetry::LogFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryFormat {
    /// channels-last (measured faster on CPU in fp32 and bf16, and what cuDNN prefers).
    Auto,
    /// Contiguous NCHW weights and input.
    Contiguous,
    /// NHWC-strided convolution weights and input, which oneDNN and cuDNN convolutions prefer.
    ChannelsLast,
}

/// Settings of the `serve` command.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "TCH_SERVE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on; 0: one the system picks, named in the `listening` log line.
    #[arg(long, env = "TCH_SERVE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Port of the Open Inference Protocol's gRPC service (inference.GRPCInferenceService and
    /// grpc.health.v1.Health); 0 disables it.
    #[arg(long, env = "TCH_SERVE_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// A model repository: each subfolder is a model named after it, holding model.pt and
    /// metadata.json directly or in numbered version folders (the highest is served).
    #[arg(long, env = "TCH_SERVE_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// One model directory holding model.pt (TorchScript) and metadata.json, as written by
    /// models/export.py, served alone; it wins over --model-repository when both are given
    /// (default when neither is: models/resnet18).
    #[arg(long, env = "TCH_SERVE_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Model answering `POST /predict` without `?model=` (default: the only model, or resnet18
    /// when the repository has it, else the first by name).
    #[arg(long, env = "TCH_SERVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Serve this version of a model instead of its highest: NAME=VERSION (repeatable; in the
    /// environment, comma-separated).
    #[arg(long = "model-version", env = "TCH_SERVE_MODEL_VERSION", value_delimiter = ',', value_parser = parse_pin)]
    pub model_versions: Vec<(String, u64)>,
    /// Enable POST /models/{name}/load and /models/{name}/unload.
    #[arg(long, env = "TCH_SERVE_ENABLE_MODEL_CONTROL")]
    pub enable_model_control: bool,
    /// Seconds between scans of the model repository for new, changed and removed models and
    /// versions (0: never; load them with POST /models/{name}/load).
    #[arg(long, env = "TCH_SERVE_POLL_REPOSITORY_SECS", default_value_t = 0)]
    pub poll_repository_secs: u64,
    /// Device to run the model on: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "TCH_SERVE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Numeric precision of the weights and activations, applied at load time.
    #[arg(long, env = "TCH_SERVE_PRECISION", value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Serve bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16), where libtorch
    /// emulates it at about a tenth of fp32's speed; without it such a model is refused.
    #[arg(long, env = "TCH_SERVE_ALLOW_EMULATED_BF16")]
    pub allow_emulated_bf16: bool,
    /// Memory layout of the convolution weights and the input batch, applied at load time.
    #[arg(long, env = "TCH_SERVE_MEMORY_FORMAT", value_enum, default_value_t = MemoryFormat::Auto)]
    pub memory_format: MemoryFormat,
    /// Largest batch the inference thread forms.
    #[arg(long, env = "TCH_SERVE_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// Longest wait, in milliseconds, for more images once a first one is ready (0: take what is
    /// queued). Under load, batches fill while the previous forward pass runs, so waiting only
    /// adds latency on CPU.
    #[arg(long, env = "TCH_SERVE_MAX_BATCH_DELAY_MS", default_value_t = 0)]
    pub max_batch_delay_ms: u64,
    /// Images admitted at once (being decoded, queued or in inference); beyond it requests get 503.
    #[arg(long, env = "TCH_SERVE_QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,
    /// Memory that request bodies being received may take, in bytes, counted as the bytes
    /// arrive (a slow client holds only what it has sent); beyond it requests get 503.
    #[arg(long, env = "TCH_SERVE_MAX_UPLOAD_MEMORY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_upload_memory_bytes: usize,
    /// Seconds a request body may take to arrive, from the end of its headers (408 beyond).
    #[arg(long, env = "TCH_SERVE_UPLOAD_TIMEOUT_SECS", default_value_t = 20)]
    pub upload_timeout_secs: u64,
    /// Bytes per second a request body must keep up on average, after --upload-rate-grace-secs
    /// (408 when it falls further behind; 0: no minimum).
    #[arg(long, env = "TCH_SERVE_UPLOAD_MIN_RATE_BYTES", default_value_t = 1024)]
    pub upload_min_rate_bytes: u64,
    /// Seconds a request body may fall behind --upload-min-rate-bytes (so also how long one that
    /// stalls from the start is waited for).
    #[arg(long, env = "TCH_SERVE_UPLOAD_RATE_GRACE_SECS", default_value_t = 5)]
    pub upload_rate_grace_secs: u64,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "TCH_SERVE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest image accepted, in pixels (width x height), checked before decoding (413 beyond).
    #[arg(long, env = "TCH_SERVE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Memory the images being decoded at once may take, in bytes, estimated from their headers
    /// (decoded pixels in their own format, plus the RGB and orientation copies); an image waits
    /// for its share, so a burst of the largest images cannot exhaust the memory.
    #[arg(long, env = "TCH_SERVE_DECODE_MEMORY_BYTES", default_value_t = 768 << 20)]
    pub decode_memory_bytes: u64,
    /// Whether a photo's EXIF orientation tag is applied before resizing: `apply` (upright, as
    /// phones and viewers show it) or `ignore` (the pixels as stored, as PIL and torchvision).
    #[arg(long, env = "TCH_SERVE_EXIF_ORIENTATION", value_enum, default_value_t = crate::preprocess::ExifOrientation::Apply)]
    pub exif_orientation: crate::preprocess::ExifOrientation,
    /// Whether large JPEGs are decoded at 1/2, 1/4 or 1/8 scale inside the inverse DCT, keeping
    /// the short side at least twice the model's resize size (`auto`; photos under that size
    /// decode in full), or always in full (`off`, the default: pixel parity with PIL and
    /// torchvision on any size, and as fast with today's decoders: BENCHMARKS.md).
    #[arg(long, env = "TCH_SERVE_JPEG_SCALED_DECODE", value_enum, default_value_t = crate::preprocess::JpegScaledDecode::Off)]
    pub jpeg_scaled_decode: crate::preprocess::JpegScaledDecode,
    /// Most images in one multipart request.
    #[arg(long, env = "TCH_SERVE_MAX_IMAGES_PER_REQUEST", default_value_t = 16)]
    pub max_images_per_request: usize,
    /// Largest top_k a client may ask for.
    #[arg(long, env = "TCH_SERVE_MAX_TOP_K", default_value_t = 100)]
    pub max_top_k: usize,
    /// top_k when the request does not say.
    #[arg(long, env = "TCH_SERVE_DEFAULT_TOP_K", default_value_t = 5)]
    pub default_top_k: usize,
    /// Time budget of one /predict request, in milliseconds, from its arrival (504 beyond).
    #[arg(long, env = "TCH_SERVE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// libtorch intra-op threads (0: the CPUs this process may use, cgroup quota aware, minus the preprocessing threads' share).
    #[arg(long, env = "TCH_SERVE_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,
    /// Cores that the models' CPU forward passes share: a forward pass takes its intra-op
    /// threads from this budget first, so several busy models never run more libtorch threads
    /// than there are cores (0: the CPUs this process may use).
    #[arg(long, env = "TCH_SERVE_CPU_BUDGET", default_value_t = 0)]
    pub cpu_budget: usize,
    /// libtorch inter-op threads.
    #[arg(long, env = "TCH_SERVE_INTER_OP_THREADS", default_value_t = 1)]
    pub inter_op_threads: usize,
    /// Threads that decode and resize images (0: the CPUs this process may use).
    #[arg(long, env = "TCH_SERVE_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,
    /// Niceness of the inference thread and libtorch's threads (0-19), so the HTTP threads get a
    /// core at once while forward passes keep the cores busy (503s and /health stay fast).
    /// CPU models only: a CUDA model's worker keeps the normal priority to feed the GPU at once.
    #[arg(long, env = "TCH_SERVE_INFERENCE_NICENESS", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub inference_niceness: u8,
    /// Forward passes per warm-up batch size before /health reports healthy.
    #[arg(long, env = "TCH_SERVE_WARMUP_ITERATIONS", default_value_t = 2)]
    pub warmup_iterations: usize,
    /// Log format.
    #[arg(long, env = "TCH_SERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export traces to (e.g. http://otel-collector:4317); off when
    /// unset, unless OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "TCH_SERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Client connections open at once; a new one beyond it takes the place of the connection
    /// that has been idle or sending its headers the longest (closed at once when all are busy).
    #[arg(long, env = "TCH_SERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, from the connection's start or the
    /// request's first byte.
    #[arg(long, env = "TCH_SERVE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a keep-alive connection may stay idle between two requests. Keep it above the
    /// idle timeout of any load balancer in front (60 s for most), or it answers 502s.
    #[arg(long, env = "TCH_SERVE_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = 75)]
    pub keep_alive_timeout_secs: u64,
    /// Seconds a finished response may wait on its client to take it (an HTTP/2 client that
    /// keeps its flow-control window shut, a client that stops reading); beyond, the
    /// connection is closed.
    #[arg(long, env = "TCH_SERVE_SEND_TIMEOUT_SECS", default_value_t = 20)]
    pub send_timeout_secs: u64,
    /// HTTP/2 (both ports): requests one connection may have in flight at once; the client is
    /// told in its SETTINGS, and a stream beyond it is refused.
    #[arg(
        long,
        env = "TCH_SERVE_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 128
    )]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: largest header list of a request, in bytes (decoded, as HPACK counts it);
    /// beyond it the request gets 431 and CONTINUATION frames past it end the connection.
    #[arg(long, env = "TCH_SERVE_HTTP2_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub http2_max_header_list_bytes: u32,
    /// HTTP/2: largest frame the client may send, in bytes (16384 to 16777215).
    #[arg(long, env = "TCH_SERVE_HTTP2_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub http2_max_frame_bytes: u32,
    /// HTTP/2: streams a client may cancel (RST_STREAM) on one connection within 10 s, and
    /// streams the server may reset for its errors; beyond, the connection is closed (the
    /// "rapid reset" attack).
    #[arg(long, env = "TCH_SERVE_HTTP2_MAX_RESETS", default_value_t = 100)]
    pub http2_max_resets: u32,
    /// HTTP/2: flow-control window of each request stream, in bytes: how much of an upload
    /// the client may send before the server has read it.
    #[arg(long, env = "TCH_SERVE_HTTP2_STREAM_WINDOW_BYTES", default_value_t = 1024 * 1024)]
    pub http2_stream_window_bytes: u32,
    /// HTTP/2: flow-control window of each connection, in bytes, shared by its streams; it
    /// bounds what one connection can make the server buffer.
    #[arg(long, env = "TCH_SERVE_HTTP2_CONNECTION_WINDOW_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub http2_connection_window_bytes: u32,
    /// HTTP/2: seconds between keep-alive PINGs on a connection (0: none); a connection whose
    /// client does not answer within --http2-keep-alive-timeout-secs is closed.
    #[arg(
        long,
        env = "TCH_SERVE_HTTP2_KEEP_ALIVE_INTERVAL_SECS",
        default_value_t = 30
    )]
    pub http2_keep_alive_interval_secs: u64,
    /// HTTP/2: seconds a client has to answer a keep-alive PING.
    #[arg(
        long,
        env = "TCH_SERVE_HTTP2_KEEP_ALIVE_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub http2_keep_alive_timeout_secs: u64,
    /// API keys that inference, model control and every route but /live, /health and /metrics
    /// then need, as `Authorization: Bearer <key>` (repeatable; in the environment,
    /// comma-separated). Never logged.
    #[arg(long = "api-key", env = "TCH_SERVE_API_KEY", value_delimiter = ',', hide_env_values = true, value_parser = crate::auth::ApiKey::from_arg)]
    #[serde(rename = "api_keys", serialize_with = "crate::auth::redact_keys")]
    pub api_keys: Vec<crate::auth::ApiKey>,
    /// A file of API keys, one per line (blank lines and lines starting with # are skipped);
    /// adds to --api-key. Read again when it changes (see --api-key-file-poll-secs) and on
    /// SIGHUP, with no restart.
    #[arg(long, env = "TCH_SERVE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Seconds between checks of --api-key-file for a change (0: only on SIGHUP).
    #[arg(long, env = "TCH_SERVE_API_KEY_FILE_POLL_SECS", default_value_t = 5)]
    pub api_key_file_poll_secs: u64,
    /// Seconds a key removed from --api-key-file stays valid after the change is read, so that
    /// clients can move to the new key with no request refused.
    #[arg(
        long,
        env = "TCH_SERVE_API_KEY_ROTATION_GRACE_SECS",
        default_value_t = 300
    )]
    pub api_key_rotation_grace_secs: u64,
    /// With API keys, /metrics needs one too.
    #[arg(long, env = "TCH_SERVE_PROTECT_METRICS")]
    pub protect_metrics: bool,
    /// Seconds to let in-flight requests (and loads under way) finish after SIGTERM/SIGINT before
    /// exiting anyway.
    #[arg(long, env = "TCH_SERVE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 25)]
    pub shutdown_timeout_secs: u64,
    /// Seconds /health reports 503 after SIGTERM before the listener closes, so load balancers stop sending first.
    #[arg(long, env = "TCH_SERVE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,
}

/// Where the models come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `--model-repository`: every model folder in it.
    Repository(PathBuf),
    /// `--model-dir`: one model.
    Single(PathBuf),
}

impl ServeConfig {
    pub fn model_source(&self) -> ModelSource {
        match (&self.model_dir, &self.model_repository) {
            (Some(dir), _) => ModelSource::Single(dir.clone()),
            (None, Some(repo)) => ModelSource::Repository(repo.clone()),
            (None, None) => ModelSource::Single(PathBuf::from("models/resnet18")),
        }
    }

    /// Serving settings of every model before its own `config.json` is applied.
    pub fn model_defaults(&self) -> ModelSettings {
        ModelSettings {
            device: self.device.clone(),
            precision: self.precision,
            allow_emulated_bf16: self.allow_emulated_bf16,
            memory_format: self.memory_format,
            max_batch_size: self.max_batch_size,
            max_batch_delay_ms: self.max_batch_delay_ms,
            queue_capacity: self.queue_capacity,
            intra_op_threads: self.thread_split().1,
            warmup_iterations: self.warmup_iterations,
            version: None,
        }
    }

    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Cross-field checks; the message names the flags to change.
    pub fn validate(&self) -> Result<(), String> {
        self.model_defaults().validate(
            self.max_images_per_request,
            self.request_timeout_ms,
            |key| format!("--{}", key.replace('_', "-")),
        )?;
        if self.grpc_port != 0 && self.grpc_port == self.port {
            return Err(format!(
                "--grpc-port ({}) must differ from --port, or be 0 to disable gRPC",
                self.grpc_port
            ));
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.header_read_timeout_secs == 0 {
            return Err("--header-read-timeout-secs must be at least 1".into());
        }
        if self.keep_alive_timeout_secs == 0 {
            return Err("--keep-alive-timeout-secs must be at least 1".into());
        }
        if self.send_timeout_secs == 0 {
            return Err("--send-timeout-secs must be at least 1".into());
        }
        self.http2_limits().validate()?;
        if self.max_upload_memory_bytes < self.max_body_bytes {
            return Err(format!(
                "--max-upload-memory-bytes ({}) must be at least --max-body-bytes ({}), or a body of the largest size could never be received",
                self.max_upload_memory_bytes, self.max_body_bytes
            ));
        }
        if self.upload_timeout_secs == 0 || self.upload_rate_grace_secs == 0 {
            return Err(
                "--upload-timeout-secs and --upload-rate-grace-secs must be at least 1".into(),
            );
        }
        if self.max_images_per_request == 0 {
            return Err("--max-images-per-request must be at least 1".into());
        }
        if self.default_top_k == 0 || self.default_top_k > self.max_top_k {
            return Err(format!(
                "--default-top-k ({}) must be between 1 and --max-top-k ({})",
                self.default_top_k, self.max_top_k
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes must be at least 1024".into());
        }
        if self.max_image_pixels == 0 {
            return Err("--max-image-pixels must be positive".into());
        }
        // The largest image allowed, in the costliest pixel format (16-bit RGBA) with its RGB
        // and orientation copies, must fit in the decode budget, or it could never be decoded.
        let worst = self.max_image_pixels.saturating_mul(8 + 2 * 3);
        if self.decode_memory_bytes < worst {
            return Err(format!(
                "--decode-memory-bytes ({}) must be at least 14 bytes per pixel of --max-image-pixels ({} pixels: {worst} bytes), or the largest images allowed could never be decoded",
                self.decode_memory_bytes, self.max_image_pixels
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err("--request-timeout-ms must be positive".into());
        }
        if let Some(name) = &self.default_model
            && name.trim().is_empty()
        {
            return Err("--default-model must not be empty".into());
        }
        Ok(())
    }

    /// Threads for (preprocessing, libtorch intra-op), from the flags or from the CPUs available.
    pub fn thread_split(&self) -> (usize, usize) {
        split_threads(
            available_cpus(),
            self.preprocess_threads,
            self.intra_op_threads,
        )
    }
}

fn parse_pin(s: &str) -> Result<(String, u64), String> {
    let (name, version) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VERSION"))?;
    let version = version
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{s:?}: the version must be a positive integer"))?;
    if name.trim().is_empty() || version == 0 {
        return Err(format!("{s:?} is not NAME=VERSION"));
    }
    Ok((name.trim().to_owned(), version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> ServeConfig {
        let mut argv = vec!["tch-serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]);
        assert_eq!(c.port, 8000);
        assert_eq!(c.grpc_port, 8001);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn grpc_port_differs_from_the_http_port() {
        let err = config(&["--port", "9000", "--grpc-port", "9000"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--grpc-port"), "{err}");
        assert_eq!(config(&["--grpc-port", "0"]).validate(), Ok(()));
    }

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("auto"), Ok(DeviceRequest::Auto));
        assert_eq!(parse_device("CPU"), Ok(DeviceRequest::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceRequest::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceRequest::Cuda(3)));
        assert!(parse_device("cuda:x").is_err());
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn cross_field_checks_name_the_flags() {
        let err = config(&["--queue-capacity", "4", "--max-images-per-request", "8"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--queue-capacity") && err.contains("--max-images-per-request"));
        let err = config(&["--default-top-k", "10", "--max-top-k", "5"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--default-top-k"));
        let err = config(&["--max-batch-size", "0"]).validate().unwrap_err();
        assert!(err.contains("--max-batch-size"));
        let err = config(&["--device", "npu"]).validate().unwrap_err();
        assert!(err.contains("--device"));
    }

    #[test]
    fn connection_and_upload_settings() {
        let c = config(&[]);
        assert_eq!(
            (c.header_read_timeout_secs, c.keep_alive_timeout_secs),
            (10, 75)
        );
        assert_eq!(c.max_upload_memory_bytes, 256 << 20);
        let err = config(&["--max-upload-memory-bytes", "1000000"])
            .validate()
            .unwrap_err();
        assert!(
            err.contains("--max-upload-memory-bytes") && err.contains("--max-body-bytes"),
            "{err}"
        );
        for bad in [
            ["--keep-alive-timeout-secs", "0"],
            ["--upload-timeout-secs", "0"],
            ["--upload-rate-grace-secs", "0"],
        ] {
            let err = config(&bad).validate().unwrap_err();
            assert!(err.contains(bad[0]), "{err}");
        }
        let c = config(&["--api-key", "a", "--api-key", "b,c"]);
        assert_eq!(c.api_keys.len(), 3);
        assert!(!format!("{c:?}").contains("\"b\""));
    }

    #[test]
    fn model_source_and_pins() {
        assert_eq!(
            config(&[]).model_source(),
            ModelSource::Single("models/resnet18".into())
        );
        assert_eq!(
            config(&["--model-repository", "models"]).model_source(),
            ModelSource::Repository("models".into())
        );
        let c = config(&["--model-version", "a=2", "--model-version", "b=10"]);
        assert_eq!(c.model_versions, vec![("a".into(), 2), ("b".into(), 10)]);
        for bad in ["a", "a=x", "=1", "a=0"] {
            assert!(
                Cli::try_parse_from(["tch-serve", "--model-version", bad]).is_err(),
                "{bad}"
            );
        }
        // A model directory wins over a repository (an image's default repository, say).
        assert_eq!(
            config(&["--model-dir", "a", "--model-repository", "b"]).model_source(),
            ModelSource::Single("a".into())
        );
    }

    #[test]
    fn config_json_overrides_name_their_keys() {
        let o: ModelOverrides =
            serde_json::from_str(r#"{"max_batch_size": 4, "precision": "bf16", "version": 2}"#)
                .unwrap();
        let s = config(&[]).model_defaults().with(&o);
        assert_eq!(
            (s.max_batch_size, s.precision, s.version),
            (4, Precision::Bf16, Some(2))
        );
        assert_eq!(
            s.queue_capacity, 32,
            "what the file does not say keeps its default"
        );
        assert!(serde_json::from_str::<ModelOverrides>(r#"{"max_batch":4}"#).is_err());
        let bad = config(&[]).model_defaults().with(&ModelOverrides {
            queue_capacity: Some(2),
            ..Default::default()
        });
        let err = bad.validate(16, 30_000, |k| format!("`{k}`")).unwrap_err();
        assert!(
            err.contains("`queue_capacity`") && err.contains("`max_images_per_request`"),
            "{err}"
        );
    }

    #[test]
    fn thread_split_defaults_and_overrides() {
        assert_eq!(split_threads(4, 0, 0), (4, 4));
        assert_eq!(split_threads(0, 0, 0), (1, 1));
        assert_eq!(split_threads(8, 2, 0), (2, 8));
        assert_eq!(split_threads(8, 0, 3), (8, 3));
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from(["tch-serve", "healthcheck", "--port", "9000"]).unwrap();
        match cli.command {
            Some(Command::Healthcheck(h)) => assert_eq!(h.port, 9000),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["tch-serve", "serve", "--max-batch-size", "4"]).unwrap();
        match cli.command {
            Some(Command::Serve(s)) => assert_eq!(s.max_batch_size, 4),
            other => panic!("unexpected {other:?}"),
        }
    }
}
