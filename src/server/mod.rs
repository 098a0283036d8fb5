//! Assembling and running the server: the shared state ([`crate::state`]), the router of both
//! HTTP doors, the repository's initial loads, the listeners, the repository poller, and the
//! shutdown sequence. Nothing imports it but the binary.
//!
//! Shutdown, on the one cancellation token: `/health` turns 503 at once; the listener keeps
//! serving for `--shutdown-delay-secs` (so load balancers stop sending first), then closes; the
//! connections get until `--shutdown-timeout-secs` after that to finish their requests and are
//! dropped if they have not; a model still loading or warming up gets what is left of that
//! time to finish; the models' queues close and their workers get what is left to end.
//! `serve` returns by then in every case; a forward pass that never ends is left behind on its
//! own thread, and the process exits without it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::config::{ModelSource, ServeConfig};
use crate::listener::{self as listener, Door};
use crate::model::threads::CpuBudget;
use crate::model::{Backend, TorchBackend, torch};
use crate::pipeline::{DecodeBudget, Shared};
use crate::repository::Repository;
pub use crate::state::{AppState, Readiness};
use crate::telemetry::Metrics;
use crate::upload::UploadBudget;

/// Every route of both HTTP doors, `/predict` and the Open Inference Protocol's REST routes,
/// with the layers every request passes through.
pub fn router(state: std::sync::Arc<AppState>) -> axum::Router {
    let max_body = state.config.max_body_bytes;
    let routes = crate::api::routes(max_body)
        .route("/openapi.json", axum::routing::get(openapi_json))
        .merge(crate::v2::rest::routes(max_body));
    crate::api::with_layers(routes, state)
}

/// `GET /openapi.json`: the description of both doors, generated from the handlers' annotations.
async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    axum::Json(crate::v2::rest::with_v2(crate::api::ApiDoc::openapi()))
}

/// Each model's name and the outcome of its first load.
type InitialLoads = JoinHandle<Vec<(String, Result<(), String>)>>;

/// A server whose models are loading.
pub struct Server {
    pub state: Arc<AppState>,
    loading: Option<InitialLoads>,
}

impl Server {
    /// Builds the state, finds the models and starts loading every one of them; returns at
    /// once. `/live` answers from the start, `/health` once the models are ready.
    pub fn start(config: ServeConfig, backend: Arc<dyn Backend>) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let auth = ApiKeys::new(
            &config.api_keys,
            config.api_key_file.as_deref(),
            config.protect_metrics,
        )
        .map_err(anyhow::Error::msg)?
        .with_rotation_grace(Duration::from_secs(config.api_key_rotation_grace_secs));
        let metrics = Arc::new(Metrics::new());
        metrics.prime_connection_series(
            &listener::closed_reasons().collect::<Vec<_>>(),
            &listener::connection_states().collect::<Vec<_>>(),
        );
        let (preprocess_threads, _) = config.thread_split();
        metrics
            .build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &torch::libtorch_version(),
                &crate::config::cpu_features().join(","),
            ])
            .set(1);
        let cpu_budget = match config.cpu_budget {
            0 => crate::config::available_cpus(),
            n => n,
        };
        metrics
            .decode_memory_budget
            .set(i64::try_from(config.decode_memory_bytes).unwrap_or(i64::MAX));
        let shared = Shared {
            backend,
            pool: Arc::new(
                Shared::decode_pool(preprocess_threads).context("starting the decoding pool")?,
            ),
            decode_budget: Arc::new(DecodeBudget::new(
                config.decode_memory_bytes,
                metrics.decode_memory.clone(),
            )),
            exif: config.exif_orientation,
            jpeg_scaling: config.jpeg_scaled_decode,
            cpu_budget: Arc::new(CpuBudget::new(cpu_budget)),
            metrics: metrics.clone(),
            max_image_pixels: config.max_image_pixels,
            inter_op_threads: config.inter_op_threads,
            niceness: config.inference_niceness,
        };
        let repository = Arc::new(Repository::new(&config, shared));
        let names = repository.discover_all()?;
        let loading = {
            let repository = repository.clone();
            tokio::spawn(async move {
                let loads = names.into_iter().map(|name| {
                    let repository = repository.clone();
                    async move {
                        let r = repository
                            .load(&name)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string());
                        (name, r)
                    }
                });
                futures_util::future::join_all(loads).await
            })
        };
        let uploads = UploadBudget::new(
            config.max_upload_memory_bytes,
            config.upload_limits(),
            &metrics,
        );
        let state = Arc::new(AppState::new(
            config,
            repository,
            metrics,
            uploads,
            Arc::new(auth),
        ));
        Ok(Self {
            state,
            loading: Some(loading),
        })
    }

    pub fn router(&self) -> axum::Router {
        router(self.state.clone())
    }

    /// Waits until every model has been loaded and warmed (or failed to be); an error names
    /// those that failed.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let Some(loading) = self.loading.take() else {
            return Ok(());
        };
        let failed: Vec<String> = loading
            .await
            .context("the loading task")?
            .into_iter()
            .filter_map(|(_, r)| r.err())
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", failed.join("; "))
        }
    }

    /// Serves on `listener` until `shutdown` is cancelled, then shuts down in bounded time (see
    /// the module's documentation). With `--model-dir`, a model that fails to load stops the
    /// server with the reason; in a repository it is reported and the others are served.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.serve_with_grpc(listener, None, shutdown).await
    }

    /// As [`Server::serve`], with the Open Inference Protocol's gRPC service on `grpc` too: it
    /// stops accepting with the HTTP listener and drains within the same deadline.
    pub async fn serve_with_grpc(
        mut self,
        listener: TcpListener,
        grpc: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let config = &state.config;
        let fatal: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Default::default();
        let single = matches!(config.model_source(), ModelSource::Single(_));
        if let Some(loading) = self.loading.take() {
            let (fatal, shutdown) = (fatal.clone(), shutdown.clone());
            tokio::spawn(async move {
                let Ok(results) = loading.await else { return };
                for (name, result) in results {
                    match result {
                        Ok(()) => tracing::info!(model = %name, "ready"),
                        Err(why) if single => {
                            *fatal.lock().unwrap() =
                                Some(anyhow::anyhow!(why).context("loading the model"));
                            shutdown.cancel();
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        if config.poll_repository_secs > 0 && !single {
            let (repository, shutdown) = (state.repository.clone(), shutdown.clone());
            let every = Duration::from_secs(config.poll_repository_secs);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(every) => repository.poll().await,
                    }
                }
            });
        }
        if state.auth.file().is_some() {
            tokio::spawn(crate::auth::watch_key_file(
                state.auth.clone(),
                Duration::from_secs(config.api_key_file_poll_secs),
                state.metrics.clone(),
                shutdown.clone(),
            ));
        }
        let stop_accepting = CancellationToken::new();
        let limits = config.connection_limits();
        let accepting = tokio::spawn(listener::accept(
            listener,
            self.router(),
            Door::HTTP,
            limits,
            state.metrics.clone(),
            stop_accepting.clone(),
        ));
        let grpc = match grpc {
            Some(listener) => {
                let app = crate::v2::grpc::door(state.clone(), shutdown.clone()).await;
                Some(tokio::spawn(listener::accept(
                    listener,
                    app,
                    Door::GRPC,
                    limits,
                    state.metrics.clone(),
                    stop_accepting.clone(),
                )))
            }
            None => None,
        };

        shutdown.cancelled().await;
        state.begin_shutdown();
        let failed_to_start = fatal.lock().unwrap().is_some();
        if !failed_to_start {
            let delay = Duration::from_secs(config.shutdown_delay_secs);
            tracing::info!(
                delay_secs = delay.as_secs(),
                "shutting down: /health now 503, still serving for the delay"
            );
            tokio::time::sleep(delay).await;
        }
        stop_accepting.cancel();
        let deadline = Instant::now() + Duration::from_secs(config.shutdown_timeout_secs);
        let connections = accepting.await.context("the accepting task")?;
        let grpc_connections = match grpc {
            Some(g) => Some(g.await.context("the gRPC accepting task")?),
            None => None,
        };
        let (http_drained, grpc_drained) = tokio::join!(connections.drain(deadline), async {
            match grpc_connections {
                Some(c) => c.drain(deadline).await,
                None => true,
            }
        });
        if !http_drained {
            tracing::warn!(
                timeout_secs = config.shutdown_timeout_secs,
                "requests still in flight at the shutdown timeout were dropped"
            );
        }
        if !grpc_drained {
            tracing::warn!("gRPC calls still in flight at the shutdown timeout were dropped");
        }
        if tokio::time::timeout_at(deadline, state.repository.settle())
            .await
            .is_err()
        {
            tracing::warn!("a model was still loading at the shutdown timeout; exiting without it");
        }
        let pipelines = state.repository.close_all();
        let workers = futures_util::future::join_all(pipelines.iter().map(|p| p.wait_exited()));
        if tokio::time::timeout_at(deadline, workers).await.is_err() {
            tracing::warn!(
                "a model's forward pass was still running at the shutdown timeout; exiting without it"
            );
        }
        let fatal = fatal.lock().unwrap().take();
        fatal.map_or(Ok(()), Err)
    }
}

/// `tch-serve serve`: load the configured models and serve until SIGTERM/SIGINT; the traces
/// still buffered are flushed (in bounded time) before it returns, whatever the outcome.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let result = run_until_stopped(config).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "tch-serve failed");
    }
    crate::shutdown::flush_traces().await;
    result
}

async fn run_until_stopped(config: ServeConfig) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let (pre, intra) = config.thread_split();
    tracing::info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        libtorch = %torch::libtorch_version(),
        cpus = crate::config::available_cpus(),
        cpu_features = %crate::config::cpu_features().join(","),
        preprocess_threads = pre,
        intra_op_threads = intra,
        "starting tch-serve {}",
        env!("CARGO_PKG_VERSION")
    );
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let (host, grpc_port) = (config.host, config.grpc_port);
    listener::raise_open_file_limit(config.max_connections);
    let server = Server::start(config, Arc::new(TorchBackend))?;
    match server.state.auth.len() {
        0 => tracing::info!("no API key: every route is open"),
        n => tracing::info!(
            keys = n,
            protect_metrics = server.state.config.protect_metrics,
            "API keys required on every route but /live, /health{}",
            if server.state.config.protect_metrics {
                ""
            } else {
                " and /metrics"
            }
        ),
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (change --port / TCH_SERVE_PORT)"))?;
    // The address bound: with --port 0, the port the system picked.
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "listening");
    let grpc = match grpc_port {
        0 => None,
        port => {
            let addr = std::net::SocketAddr::new(host, port);
            let l = TcpListener::bind(addr).await.with_context(|| {
                format!("binding {addr} for gRPC (change --grpc-port / TCH_SERVE_GRPC_PORT, or 0 to disable)")
            })?;
            tracing::info!(%addr, "listening (gRPC)");
            Some(l)
        }
    };
    server
        .serve_with_grpc(listener, grpc, crate::shutdown::on_signals())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// `tch-serve healthcheck`: GET /health on the local server; true for a 200.
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
