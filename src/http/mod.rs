//! The router: endpoints, the JSON fallbacks, and the layers every request passes through
//! (request id, tracing, metrics, panic catching, body limit).

mod health;
mod openapi;
mod predict;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use openapi::ApiDoc;
pub use predict::{ImageResult, PredictResponse, Prediction, Timings, top_k};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route(
            "/predict",
            post(predict::predict).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/health", get(health::health))
        .route("/live", get(health::live))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let id = req
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-");
                            tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                        })
                        .on_request(())
                        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
                    tracing::error!("handler panicked");
                    ApiError::Internal.into_response()
                })),
        )
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts every response by route template and status, times it, counts refusals by reason,
/// and logs failures once (inside the request's span, so with its id).
async fn record_metrics(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        m.rejections.with_label_values(&[code]).inc();
        // Refusals are counted above; only failures of the server's own making are worth a
        // warning (overload and not-ready are expected states, and would flood the log).
        match *code {
            "internal" | "timeout" => {
                tracing::warn!(status = status.as_u16(), code, "request failed")
            }
            _ => tracing::debug!(status = status.as_u16(), code, "request refused"),
        }
    }
    response
}
