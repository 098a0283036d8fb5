//! Command line and environment configuration: every flag has an environment variable of the
//! same meaning (`--max-batch-size` / `TCH_SERVE_MAX_BATCH_SIZE`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

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
    Serve(ServeConfig),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere.
    Fp32,
    /// bfloat16 weights and activations (CPUs with AVX512-BF16/AMX, and CUDA).
    Bf16,
    /// float16 weights and activations (CUDA).
    Fp16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
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
    /// Port to listen on.
    #[arg(long, env = "TCH_SERVE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Directory holding model.pt (TorchScript) and metadata.json, as written by models/export.py.
    #[arg(long, env = "TCH_SERVE_MODEL_DIR", default_value = "models/resnet18")]
    pub model_dir: PathBuf,
    /// Device to run the model on: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "TCH_SERVE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Numeric precision of the weights and activations, applied at load time.
    #[arg(long, env = "TCH_SERVE_PRECISION", value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
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
    /// Request bodies being received at once; beyond it requests get 503. With --max-body-bytes it
    /// bounds the memory that uploads can take.
    #[arg(long, env = "TCH_SERVE_MAX_PENDING_UPLOADS", default_value_t = 64)]
    pub max_pending_uploads: usize,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "TCH_SERVE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest image accepted, in pixels (width x height), checked before decoding (413 beyond).
    #[arg(long, env = "TCH_SERVE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
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
    /// libtorch inter-op threads.
    #[arg(long, env = "TCH_SERVE_INTER_OP_THREADS", default_value_t = 1)]
    pub inter_op_threads: usize,
    /// Threads that decode and resize images (0: the CPUs this process may use).
    #[arg(long, env = "TCH_SERVE_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,
    /// Niceness of the inference thread and libtorch's threads (0-19), so the HTTP threads get a
    /// core at once while forward passes keep the cores busy (503s and /health stay fast).
    #[arg(long, env = "TCH_SERVE_INFERENCE_NICENESS", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub inference_niceness: u8,
    /// Forward passes per warm-up batch size before /health reports healthy.
    #[arg(long, env = "TCH_SERVE_WARMUP_ITERATIONS", default_value_t = 2)]
    pub warmup_iterations: usize,
    /// Log format.
    #[arg(long, env = "TCH_SERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "TCH_SERVE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 25)]
    pub shutdown_timeout_secs: u64,
    /// Seconds /health reports 503 after SIGTERM before the listener closes, so load balancers stop sending first.
    #[arg(long, env = "TCH_SERVE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,
}

impl ServeConfig {
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Cross-field checks; the message names the flags to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 || self.max_batch_size > 1024 {
            return Err("--max-batch-size must be between 1 and 1024".into());
        }
        if self.queue_capacity < self.max_images_per_request {
            return Err(format!(
                "--queue-capacity ({}) must be at least --max-images-per-request ({}), or no request of that size could ever be admitted",
                self.queue_capacity, self.max_images_per_request
            ));
        }
        if self.max_pending_uploads == 0 {
            return Err("--max-pending-uploads must be at least 1".into());
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
        if self.request_timeout_ms == 0 {
            return Err("--request-timeout-ms must be positive".into());
        }
        if self.max_batch_delay_ms >= self.request_timeout_ms {
            return Err(format!(
                "--max-batch-delay-ms ({}) must be below --request-timeout-ms ({})",
                self.max_batch_delay_ms, self.request_timeout_ms
            ));
        }
        parse_device(&self.device)?;
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

/// The device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
            _ => Err(format!(
                "--device {s:?} is not one of auto, cpu, cuda, cuda:N"
            )),
        },
    }
}

/// CPUs this process may use: the affinity mask and the cgroup CPU quota both count
/// (`std::thread::available_parallelism` reads both on Linux).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Default thread split. Decoding and resizing are short compared with a forward pass, so the
/// model gets every core and the preprocessing pool as many threads as there are cores: the two
/// rarely run flat out at the same moment. Measured on 2 cores (BENCHMARKS.md): one decoding
/// thread loses about 6% of saturated throughput, one intra-op thread about 35%, and making
/// decoding wait while a forward pass runs gained nothing and raised p99. Explicit values win.
pub fn split_threads(cpus: usize, preprocess: usize, intra_op: usize) -> (usize, usize) {
    let cpus = cpus.max(1);
    let pre = if preprocess > 0 { preprocess } else { cpus };
    let intra = if intra_op > 0 { intra_op } else { cpus };
    (pre, intra)
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
        assert_eq!(c.validate(), Ok(()));
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
