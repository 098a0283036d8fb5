//! tch-serve: an image-classification server for TorchScript models.
//!
//! A request's path: [`http`] (router, extraction, errors) -> [`preprocess`] on a thread pool ->
//! [`batcher`] queue -> the inference thread's [`model`] -> back through a oneshot channel.

pub mod batcher;
pub mod config;
pub mod error;
pub mod http;
pub mod metadata;
pub mod model;
pub mod preprocess;
pub mod state;
pub mod telemetry;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::batcher::{BatchPolicy, BatcherHandle, ClassifierFactory, LoadReport};
use crate::config::{ServeConfig, parse_device};
use crate::metadata::ModelMetadata;
use crate::model::{Classifier, TorchClassifier};
use crate::preprocess::Preprocessor;
use crate::state::{AppState, ModelInfo};
use crate::telemetry::Metrics;

/// A server whose model is loading on its inference thread.
pub struct Server {
    pub state: Arc<AppState>,
    ready: Option<oneshot::Receiver<anyhow::Result<LoadReport>>>,
    worker: Option<JoinHandle<()>>,
    started: Instant,
}

/// Builds the state and starts the inference thread with the given classifier. The server
/// answers /live at once and /health with 503 until [`Server::wait_ready`] has seen the model
/// loaded and warmed.
pub fn start(
    config: ServeConfig,
    meta: &ModelMetadata,
    device_name: String,
    factory: ClassifierFactory,
) -> anyhow::Result<Server> {
    let started = Instant::now();
    config.validate().map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::new());
    let (preprocess_threads, intra_op_threads) = config.thread_split();
    let inter_op_threads = config.inter_op_threads;
    let niceness = config.inference_niceness;
    metrics
        .build_info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &model::libtorch_version(),
            &device_name,
            &format!("{:?}", config.precision).to_lowercase(),
            &meta.name,
        ])
        .set(1);
    let policy = BatchPolicy {
        max_batch_size: config.max_batch_size,
        max_batch_delay: config.max_batch_delay(),
        queue_capacity: config.queue_capacity,
    };
    let (input_size, max_batch, iterations) = (
        meta.input_size,
        config.max_batch_size,
        config.warmup_iterations,
    );
    let (batcher, ready, worker): (BatcherHandle, _, _) = batcher::spawn(
        policy,
        metrics.clone(),
        Box::new(move || configure_torch_threads(intra_op_threads, inter_op_threads, niceness)),
        factory,
        Box::new(move |m: &mut dyn Classifier| {
            if iterations == 0 {
                return Ok(Duration::ZERO);
            }
            model::warm_up(m, input_size, max_batch, iterations)
        }),
    )
    .context("starting the inference thread")?;
    let info = ModelInfo {
        name: meta.name.clone(),
        device: device_name,
        precision: config.precision,
        trained: meta.trained,
        weights: meta.weights.clone(),
        labels: Arc::new(meta.labels.clone()),
    };
    let preprocessor = Arc::new(Preprocessor::for_model(meta, config.max_image_pixels));
    let state = AppState::new(
        config,
        info,
        preprocessor,
        batcher,
        metrics,
        preprocess_threads,
    )
    .context("starting the preprocessing pool")?;
    Ok(Server {
        state: Arc::new(state),
        ready: Some(ready),
        worker: Some(worker),
        started,
    })
}

/// Sets the calling thread's niceness (Linux: per thread; higher is lower priority). libtorch's
/// worker threads, created later by this thread, inherit it, so the HTTP threads get a core at
/// once when they wake: refusals, /health and /metrics stay fast while forward passes keep the
/// cores busy. Lowering a priority needs no privilege.
fn lower_priority(niceness: u8) {
    if niceness == 0 {
        return;
    }
    // SAFETY: setpriority has no memory-safety preconditions; `who` 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, i32::from(niceness)) };
    if rc != 0 {
        tracing::warn!(
            niceness,
            error = %std::io::Error::last_os_error(),
            "could not lower the inference threads' priority"
        );
    }
}

/// Thread settings of libtorch; they must be made on the inference thread before its first op.
fn configure_torch_threads(intra: usize, inter: usize, niceness: u8) {
    lower_priority(niceness);
    tch::set_num_threads(intra as i32);
    // The inter-op pool can be sized once per process, before it is first used.
    static INTER_OP: Once = Once::new();
    INTER_OP.call_once(|| tch::set_num_interop_threads(inter.max(1) as i32));
    // Inference only: no autograd bookkeeping on this thread.
    std::mem::forget(tch::no_grad_guard());
}

impl Server {
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Waits for the model to be loaded and warmed, then marks the server ready.
    pub async fn wait_ready(&mut self) -> anyhow::Result<LoadReport> {
        let rx = self.ready.take().context("wait_ready called twice")?;
        let report = rx
            .await
            .context("the inference thread stopped during start-up")??;
        mark_ready(&self.state, &report, self.started);
        Ok(report)
    }

    /// Serves on `listener` until `shutdown` completes, then drains: /health turns 503 at once,
    /// the listener closes after `--shutdown-delay-secs`, in-flight requests complete within
    /// `--shutdown-timeout-secs`, and the inference thread stops.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            state,
            ready,
            worker,
            started,
        } = self;
        let app = http::router(state.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        // Model loading runs beside the listener: /live answers and /health says "starting".
        let loading = ready.map(|rx| {
            let state = state.clone();
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(report)) => {
                        mark_ready(&state, &report, started);
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        let _ = stop_tx.send(true);
                        Err(e.context("loading the model"))
                    }
                    Err(_) => {
                        let _ = stop_tx.send(true);
                        Err(anyhow::anyhow!(
                            "the inference thread stopped during start-up"
                        ))
                    }
                }
            })
        });

        let drain_state = state.clone();
        let delay = Duration::from_secs(state.config.shutdown_delay_secs);
        let mut stop_on_error = stop_rx.clone();
        let (drained_tx, drained_rx) = oneshot::channel::<()>();
        let graceful = async move {
            tokio::select! {
                _ = shutdown => {
                    drain_state.begin_shutdown();
                    tracing::info!(delay_secs = delay.as_secs(), "shutdown requested: /health now 503, draining");
                    tokio::time::sleep(delay).await;
                }
                _ = async move {
                    // A closed channel means loading succeeded: nothing to stop for.
                    if stop_on_error.wait_for(|stop| *stop).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } => {
                    drain_state.begin_shutdown();
                }
            }
            let _ = drained_tx.send(());
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
        let timeout = Duration::from_secs(state.config.shutdown_timeout_secs);
        let serve = tokio::spawn(async move { server.await });
        let mut serve = serve;
        let outcome = tokio::select! {
            r = &mut serve => r.context("server task")?.context("serving HTTP"),
            _ = drained_rx => {
                match tokio::time::timeout(timeout, &mut serve).await {
                    Ok(r) => r.context("server task")?.context("serving HTTP"),
                    Err(_) => {
                        tracing::warn!(timeout_secs = timeout.as_secs(), "in-flight requests did not finish in time; exiting anyway");
                        serve.abort();
                        Ok(())
                    }
                }
            }
        };
        if let Some(loading) = loading {
            if loading.is_finished() {
                loading.await.context("model loading task")??;
            } else {
                loading.abort();
            }
        }
        // The last handle on the state holds the last sender of the inference queue: once it is
        // gone the inference thread finishes its batch and exits.
        drop(state);
        if let Some(worker) = worker {
            // The thread ends once the last queue sender is gone; don't wait on a stuck model.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || worker.join()),
            )
            .await;
        }
        outcome
    }
}

fn mark_ready(state: &AppState, report: &LoadReport, started: Instant) {
    let m = &state.metrics;
    m.model_load_seconds.set(report.load_time.as_secs_f64());
    m.warmup_seconds.set(report.warmup_time.as_secs_f64());
    state.set_ready();
    tracing::info!(
        load_ms = report.load_time.as_millis() as u64,
        warmup_ms = report.warmup_time.as_millis() as u64,
        since_start_ms = started.elapsed().as_millis() as u64,
        "model loaded and warmed; ready"
    );
}

/// The model directory's classifier on the configured device, built on the inference thread.
pub fn torch_factory(
    config: &ServeConfig,
    dir: &Path,
    meta: &ModelMetadata,
    device: tch::Device,
) -> ClassifierFactory {
    let dir = dir.to_path_buf();
    let meta = meta.clone();
    let (precision, memory_format) = (config.precision, config.memory_format);
    Box::new(move || {
        let model = TorchClassifier::load(&dir, &meta, device, precision, memory_format)?;
        Ok(Box::new(model) as Box<dyn Classifier>)
    })
}

/// `tch-serve serve`: load the configured model and serve until SIGTERM/SIGINT.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let meta = ModelMetadata::load(&config.model_dir)?;
    let device = model::resolve_device(parse_device(&config.device).map_err(anyhow::Error::msg)?)?;
    let device_name = model::device_name(device);
    let (pre, intra) = config.thread_split();
    tracing::info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        model = %meta.name,
        trained = meta.trained,
        device = %device_name,
        libtorch = %model::libtorch_version(),
        cpus = config::available_cpus(),
        preprocess_threads = pre,
        intra_op_threads = intra,
        "starting tch-serve {}",
        env!("CARGO_PKG_VERSION")
    );
    if !meta.trained {
        tracing::warn!(model = %meta.name, weights = ?meta.weights, "the model is UNTRAINED (random weights): its predictions are meaningless");
    }
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let factory = torch_factory(&config, &config.model_dir, &meta, device);
    let server = start(config, &meta, device_name, factory)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (change --port / TCH_SERVE_PORT)"))?;
    tracing::info!(%addr, "listening");
    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// `tch-serve healthcheck`: GET /health on the local server; Ok(true) for a 200.
pub async fn healthcheck(port: u16, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::with_capacity(1024);
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn niceness_of_this_thread() -> i32 {
        // SAFETY: getpriority has no memory-safety preconditions; `who` 0 is the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn inference_priority_is_lowered_for_that_thread_and_its_children_only() {
        let before = niceness_of_this_thread();
        if before >= 7 {
            return; // already as nice or nicer: nothing to lower
        }
        let (own, child) = std::thread::spawn(|| {
            lower_priority(7);
            let child = std::thread::spawn(niceness_of_this_thread).join().unwrap();
            (niceness_of_this_thread(), child)
        })
        .join()
        .unwrap();
        assert_eq!(own, 7);
        assert_eq!(child, own, "threads started later inherit the niceness");
        assert_eq!(
            niceness_of_this_thread(),
            before,
            "other threads keep theirs"
        );
    }
}
