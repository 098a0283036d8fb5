//! Signals to one cancellation token: SIGTERM or SIGINT cancels it, and everything that must
//! stop watches it; and the last step of an exit, flushing the traces.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long the traces still buffered at exit may take to reach the collector.
pub const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Exports the spans still buffered, within [`TRACE_FLUSH_TIMEOUT`] (at once when traces are
/// not exported): the last thing the server does before it returns.
pub async fn flush_traces() {
    crate::telemetry::shutdown_tracing(TRACE_FLUSH_TIMEOUT).await;
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        cancel.cancel();
    });
    token
}

/// Completes on SIGTERM or SIGINT.
async fn signal() {
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
