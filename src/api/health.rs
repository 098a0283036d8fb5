//! `/health` (readiness), `/live` (liveness) and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ErrorCode;
use crate::repository::ModelView;
use crate::state::{AppState, Readiness};

/// Readiness and what is being served.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// `healthy`, `starting`, `unhealthy` or `shutting_down`.
    pub status: String,
    /// The default model (the one `POST /predict` serves without `?model=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Where the default model runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// False when the default model's weights are a random initialisation: its predictions
    /// mean nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Every model: name, state, version, device, precision, ...
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<ModelView>,
    /// The CPU features that decide which precisions run fast here (avx512_bf16, amx_bf16, ...).
    pub cpu_features: Vec<String>,
    pub version: String,
    /// Why the server is not ready (503 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Present on 503, like every failure body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// 200 once every model that should be served is loaded and warm; 503 with the reason while
/// starting, when a model failed or stopped, and while shutting down.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = HealthBody),
        (status = 503, description = "Starting, unhealthy or shutting down", body = HealthBody),
    ))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, reason) = match state.readiness() {
        Readiness::Ready => ("healthy", None),
        Readiness::Starting(p) => ("starting", Some(p.join("; "))),
        Readiness::Unhealthy(p) => ("unhealthy", Some(p.join("; "))),
        Readiness::ShuttingDown => ("shutting_down", Some("the server is shutting down".into())),
    };
    let models = state.repository.views();
    let default = state
        .repository
        .default_model()
        .and_then(|d| models.iter().find(|m| m.name == d).cloned());
    let body = HealthBody {
        status: status.into(),
        model: default.as_ref().map(|m| m.name.clone()),
        device: default.as_ref().and_then(|m| m.device.clone()),
        precision: default.as_ref().and_then(|m| m.precision.clone()),
        trained: default.as_ref().and_then(|m| m.trained),
        weights: default.as_ref().and_then(|m| m.weights.clone()),
        models,
        cpu_features: crate::config::cpu_features()
            .iter()
            .map(|f| f.to_string())
            .collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        error: reason.as_ref().map(|r| format!("not ready: {r}")),
        code: reason.as_ref().map(|_| "unavailable".to_owned()),
        reason,
    };
    if body.reason.is_none() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        unavailable(Json(body).into_response())
    }
}

fn unavailable(mut r: Response) -> Response {
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r.extensions_mut().insert(ErrorCode("unavailable"));
    r
}

/// 200 whenever the process serves HTTP, even at capacity or while loading: liveness probes
/// must not restart a server that is merely busy. 503 only when a model's worker has stopped
/// (a bug that only a restart repairs).
#[utoipa::path(get, path = "/live", tag = "operations",
    responses(
        (status = 200, description = "The process is alive"),
        (status = 503, description = "A model's worker has stopped: restart the process"),
    ))]
pub async fn live(State(state): State<Arc<AppState>>) -> Response {
    let stopped = state.repository.stopped_workers();
    if stopped.is_empty() {
        return Json(serde_json::json!({ "status": "alive" })).into_response();
    }
    let reason = format!(
        "the worker of {} has stopped; restart the server",
        stopped.join(", ")
    );
    unavailable(
        Json(serde_json::json!({
            "status": "stopped",
            "reason": reason,
            "error": reason,
            "code": "unavailable",
        }))
        .into_response(),
    )
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Sets the readiness gauge from the current state before rendering.
    let _ = state.readiness();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
