//! The HTTP front door (`/predict`, `/models`, `/health`, `/metrics`): its routes, the JSON
//! fallbacks, and the layers every request passes through (request id, tracing, metrics, panic
//! catching), which the server puts around both doors' routes. Each endpoint family has its file;
//! they only translate between HTTP and the [`crate::repository`] and [`crate::pipeline`].

mod auth;
mod health;
mod models;
mod openapi;
mod predict;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use crate::doors::{Prediction, top_k};
pub use openapi::ApiDoc;
pub use predict::{ImageResult, PredictResponse, Timings, parse_query};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::telemetry::Metrics;

pub use crate::doors::{BodyReceived, ModelLabel, REQUEST_ID, TRACE_ID};

/// The routes of the HTTP front door (the server adds the v2 routes and the layers).
pub fn routes(max_body_bytes: usize) -> Router<Arc<AppState>> {
    let body_limit = DefaultBodyLimit::max(max_body_bytes);
    Router::new()
        .route("/predict", post(predict::predict).layer(body_limit))
        .route(
            "/models/{name}/predict",
            post(predict::predict_named).layer(body_limit),
        )
        .route("/models", get(models::list))
        .route("/models/{name}", get(models::get))
        .route("/models/{name}/load", post(models::load))
        .route("/models/{name}/unload", post(models::unload))
        .route("/health", get(health::health))
        .route("/live", get(health::live))
        .route("/metrics", get(health::metrics))
}

/// Wraps `routes` in the layers every request passes through: the JSON fallbacks, panics
/// turned into JSON 500s, the API keys, the metrics, the request id and the tracing span.
pub fn with_layers(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Innermost, so that a panic becomes a 500 that the metrics layer counts.
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("handler panicked");
                ApiError::Internal.into_response()
            },
        ))
        // Inside the metrics, so that refusals are counted; before any handler reads a body.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_request(())
                        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .with_state(state)
}

/// The span of one request: named `METHOD /route/template` in traces, the child of the caller's
/// span when a W3C `traceparent` header names one, with the OpenTelemetry HTTP attributes;
/// status, model and trace id are recorded as they become known.
fn request_span(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    let method = req.method();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = %id,
        method = %method,
        path = %req.uri().path(),
        http.request.method = %method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        model.name = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(&span, req.headers());
    if let Some(trace_id) = crate::telemetry::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    span
}

/// Names the request's trace on its response (`x-trace-id`, 32 hex digits) and records the
/// outcome on its span.
fn trace_response(response: &mut Response) {
    let span = tracing::Span::current();
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    if let Some(ModelLabel(model)) = response.extensions().get::<ModelLabel>() {
        span.record("model.name", model.as_str());
    }
    if let Some(id) = crate::telemetry::trace_id(&span)
        && let Ok(value) = axum::http::HeaderValue::from_str(&id)
    {
        response.headers_mut().insert(TRACE_ID, value);
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().chars().take(200).collect())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// One request's record in the metrics. Dropped without a response (the client went away and
/// the request was cancelled), it counts the request as 499, as nginx does.
struct Record {
    metrics: Arc<Metrics>,
    route: String,
    method: Method,
    start: Instant,
    done: bool,
}

impl Record {
    fn finish(&mut self, response: &Response) {
        self.done = true;
        let status = response.status();
        let m = &self.metrics;
        m.requests
            .with_label_values(&[self.route.as_str(), self.method.as_str(), status.as_str()])
            .inc();
        m.request_duration
            .with_label_values(&[self.route.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
        let body_done = response
            .extensions()
            .get::<BodyReceived>()
            .map_or(self.start, |b| b.0);
        m.request_processing
            .with_label_values(&[self.route.as_str()])
            .observe(body_done.elapsed().as_secs_f64());
        if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
            let model = response
                .extensions()
                .get::<ModelLabel>()
                .map_or("", |m| m.0.as_str());
            m.rejections.with_label_values(&[model, code]).inc();
            // Refusals are counted above; only failures of the server's own making are worth a
            // warning (overload and not-ready are expected states, and would flood the log).
            match *code {
                "internal" | "timeout" | "model_load_failed" => {
                    tracing::warn!(status = status.as_u16(), code, "request failed")
                }
                _ => tracing::debug!(status = status.as_u16(), code, "request refused"),
            }
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let m = &self.metrics;
        m.requests
            .with_label_values(&[self.route.as_str(), self.method.as_str(), "499"])
            .inc();
        m.request_duration
            .with_label_values(&[self.route.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
        tracing::debug!(route = %self.route, "the client went away before the response");
    }
}

/// Counts every response by route template and status, times it, counts refusals by model and
/// reason, and logs failures once (inside the request's span, so with its id).
async fn record_metrics(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let mut record = Record {
        metrics: state.metrics.clone(),
        route,
        method: req.method().clone(),
        start: Instant::now(),
        done: false,
    };
    let mut response = next.run(req).await;
    record.finish(&response);
    trace_response(&mut response);
    response
}
