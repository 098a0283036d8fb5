//! Accepting and serving connections: hyper-util's HTTP/1 and HTTP/2 server with a timer, a
//! cap on open connections, per-connection metrics, and a drain with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::telemetry::Metrics;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from the connection's start or the end of
    /// the previous response (so also how long an idle keep-alive connection stays open).
    pub header_read_timeout: Duration,
}

/// The connections being served, to drain at shutdown.
pub struct Connections {
    graceful: GracefulShutdown,
    tasks: JoinSet<()>,
}

/// Counts a connection as open while it lives, whatever ends it.
struct OpenConnection(prometheus::IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts and serves connections until `stop` is cancelled; the listener is closed on return.
pub async fn accept(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Connections {
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        metrics.connections.inc();
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics
                .connections_refused
                .with_label_values(&["max_connections"])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics.connections_open.inc();
        let open = OpenConnection(metrics.connections_open.clone());
        let service =
            app.clone()
                .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(ConnectInfo::<SocketAddr>(remote));
                    req
                });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tasks.spawn(async move {
            let _open = open;
            let _place = place;
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, %remote, "connection ended with an error");
            }
        });
    }
    Connections { graceful, tasks }
}

impl Connections {
    /// Asks every connection to finish its request in flight and close, and waits for them
    /// until `deadline`; then drops those still open (their requests end there). Returns
    /// whether all finished in time.
    pub async fn drain(self, deadline: Instant) -> bool {
        let Connections {
            graceful,
            mut tasks,
        } = self;
        let finished = tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_ok();
        if !finished {
            tasks.abort_all();
        }
        while tasks.join_next().await.is_some() {}
        finished
    }
}
