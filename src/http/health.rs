//! `/health` (readiness), `/live` (liveness) and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::Precision;
use crate::error::ErrorCode;
use crate::state::{AppState, Phase};

/// Readiness and what is being served.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// `healthy`, `starting` or `shutting_down`.
    pub status: String,
    pub model: String,
    pub device: String,
    #[schema(value_type = String, example = "fp32")]
    pub precision: Precision,
    /// False when the model's weights are a random initialisation: its predictions mean nothing.
    pub trained: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
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

/// 200 once the model is loaded and warmed; 503 with the reason while starting or shutting down.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = HealthBody),
        (status = 503, description = "Starting or shutting down", body = HealthBody),
    ))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, reason) = match state.phase() {
        Phase::Ready => ("healthy", None),
        Phase::Starting => ("starting", Some("loading and warming up the model")),
        Phase::ShuttingDown => ("shutting_down", Some("the server is shutting down")),
    };
    let m = &state.model;
    let body = HealthBody {
        status: status.into(),
        model: m.name.clone(),
        device: m.device.clone(),
        precision: m.precision,
        trained: m.trained,
        weights: m.weights.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        reason: reason.map(str::to_owned),
        error: reason.map(|r| format!("not ready: {r}")),
        code: reason.map(|_| "unavailable".to_owned()),
    };
    if reason.is_none() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        r.extensions_mut().insert(ErrorCode("unavailable"));
        r
    }
}

/// 200 whenever the process answers: for liveness probes, which must not restart a server that
/// is merely busy or still warming up.
#[utoipa::path(get, path = "/live", tag = "operations",
    responses((status = 200, description = "The process is alive")))]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "alive" }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
