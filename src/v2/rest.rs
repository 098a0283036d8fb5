//! The Open Inference Protocol over HTTP: `/v2/...` on the server's HTTP port, with Triton's
//! binary data extension (`Inference-Header-Content-Length`: the JSON header, then the tensors'
//! raw bytes) and classification extension.
//!
//! Errors are the protocol's `{"error": "..."}`, with the server's usual `code` beside it and the
//! server's status codes (503 with Retry-After when at capacity, 504 past the time limit, ...).
//!
//! A request's time limit runs from its arrival, so it covers the upload as `/predict`'s does.
//! Bodies may come compressed (`Content-Encoding: gzip` or `deflate`, as tritonclient's
//! `request_compression_algorithm` sends them): they are decompressed as they arrive, the
//! decompressed bytes held to `--max-body-bytes` and drawn from the upload budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{OpenApi, ToSchema};

use super::extensions;
use super::tensor::JsonData;
use super::{
    Data, EXTENSIONS, InputTensor, ModelMeta, OutputData, OutputRequest, SERVER_NAME, short,
};
use crate::doors::{BodyReceived, ModelLabel};
use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, Readiness};

/// The header that gives the length of the JSON part of a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The `/v2` routes, to merge into the server's router (which adds the layers).
pub fn routes(max_body_bytes: usize) -> Router<Arc<AppState>> {
    let limit = DefaultBodyLimit::max(max_body_bytes);
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(server_live))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/infer", post(infer).layer(limit))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer).layer(limit),
        )
        .route("/v2/models/{name}/config", get(model_config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_statistics),
        )
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route(
            "/v2/repository/models/{name}/unload",
            post(repository_unload),
        )
}

/// The OpenAPI description of the `/v2` routes, merged into the server's.
#[derive(OpenApi)]
#[openapi(
    paths(server_metadata, server_live, server_ready, model_metadata, model_ready, infer,
        model_config, model_statistics, all_statistics, repository_index, repository_load, repository_unload),
    components(schemas(ServerMetadata, ModelMeta, super::TensorMeta, InferRequestBody, InputBody, OutputBody, InferResponseBody, ResponseOutputBody,
        extensions::ModelConfig, extensions::TensorConfig, extensions::VersionPolicy, extensions::SpecificVersions,
        extensions::DynamicBatching, extensions::InstanceGroup, extensions::Parameter, StatisticsBody,
        extensions::ModelStats, extensions::InferStats, extensions::BatchStats, extensions::Duration, extensions::IndexEntry)),
    tags((name = "open inference protocol", description = "KServe v2 / Triton: the same models and queues as /predict"))
)]
pub struct V2Doc;

/// The server's OpenAPI description with the `/v2` routes added.
pub fn with_v2(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    doc.merge(V2Doc::openapi());
    doc
}

/// The server's name, version and the protocol extensions it serves.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

impl ServerMetadata {
    pub fn get() -> Self {
        Self {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// An inference request's JSON (the whole body, or its header with the binary extension).
#[derive(Debug, Deserialize, ToSchema)]
pub struct InferRequestBody {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `timeout` (microseconds; capped by --request-timeout-ms), `binary_data_output` (bool).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputBody>,
    #[serde(default)]
    pub outputs: Vec<OutputBody>,
}

/// One input tensor: `input` (FP32/FP16/BF16 [N, 3, S, S]) or `image` (BYTES [N]: encoded
/// images, base64 in JSON).
#[derive(Debug, Deserialize, ToSchema)]
pub struct InputBody {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// The elements, flat or nested, row-major.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub data: Option<JsonData>,
}

/// An output asked for: `probabilities`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct OutputBody {
    pub name: String,
    /// `classification` (k: the top k classes as "score:index:label"), `binary_data` (bool).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

/// An inference response's JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct InferResponseBody {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutputBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseOutputBody {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    /// `binary_data_size` when the elements follow the JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Value>,
}

#[utoipa::path(get, path = "/v2", tag = "open inference protocol",
    responses((status = 200, description = "Server metadata", body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata::get())
}

/// 200 while the process serves (as `/live`); 503 when a model's worker has stopped.
#[utoipa::path(get, path = "/v2/health/live", tag = "open inference protocol",
    responses((status = 200, description = "Live"), (status = 503, description = "A model's worker has stopped")))]
pub async fn server_live(State(state): State<Arc<AppState>>) -> Response {
    let stopped = state.repository.stopped_workers();
    if stopped.is_empty() {
        return Json(serde_json::json!({ "live": true })).into_response();
    }
    let e = ApiError::Unavailable(format!(
        "the worker of {} has stopped; restart the server",
        stopped.join(", ")
    ));
    with_fields(e, serde_json::json!({ "live": false }))
}

/// 200 when every model that should be served is ready (as `/health`); 503 otherwise.
#[utoipa::path(get, path = "/v2/health/ready", tag = "open inference protocol",
    responses((status = 200, description = "Ready"), (status = 503, description = "Starting, unhealthy or shutting down")))]
pub async fn server_ready(State(state): State<Arc<AppState>>) -> Response {
    let reason = match state.readiness() {
        Readiness::Ready => return Json(serde_json::json!({ "ready": true })).into_response(),
        Readiness::Starting(p) => format!("starting: {}", p.join("; ")),
        Readiness::Unhealthy(p) => format!("unhealthy: {}", p.join("; ")),
        Readiness::ShuttingDown => "the server is shutting down".into(),
    };
    with_fields(
        ApiError::Unavailable(format!("not ready: {reason}")),
        serde_json::json!({ "ready": false }),
    )
}

/// The model's versions, platform, inputs and outputs.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Model metadata (also at /v2/models/{name}/versions/{version})", body = ModelMeta),
        (status = 404, description = "No such model or version", body = crate::error::ErrorBody),
        (status = 503, description = "The model is not loaded", body = crate::error::ErrorBody),
    ))]
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
) -> Response {
    let (name, version) = match path(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match super::resolve(&state, &name, version.as_deref()) {
        Ok(p) => labelled(Json(super::metadata(&state, &p)).into_response(), &p.name),
        Err(e) => e.into_response(),
    }
}

/// 200 `{"name", "ready": true}` when the model (and version) can take requests; 503 with
/// `"ready": false` when not; 404 for an unknown model or version.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Ready (also at /v2/models/{name}/versions/{version}/ready)"),
        (status = 404, description = "No such model or version", body = crate::error::ErrorBody),
        (status = 503, description = "Not ready"),
    ))]
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
) -> Response {
    let (name, version) = match path(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let fields = |ready: bool| serde_json::json!({ "name": name, "ready": ready });
    match super::resolve(&state, &name, version.as_deref()) {
        Ok(p) => match p.readiness() {
            Ok(()) => labelled(Json(fields(true)).into_response(), &p.name),
            Err(why) => labelled(
                with_fields(
                    ApiError::Unavailable(format!("model {name} is not ready: {why}")),
                    fields(false),
                ),
                &p.name,
            ),
        },
        Err(e @ ApiError::Unavailable(_)) => with_fields(e, fields(false)),
        Err(e) => e.into_response(),
    }
}

/// Inference: JSON, or JSON then binary tensors (the binary data extension).
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    request_body(description = "An inference request (also at /v2/models/{name}/versions/{version}/infer). With the binary data extension: the JSON, then each input's bytes in order, its length in the Inference-Header-Content-Length header",
        content((InferRequestBody = "application/json"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 200, description = "The outputs (binary ones after the JSON, with Inference-Header-Content-Length)", body = InferResponseBody),
        (status = 400, description = "Malformed request: JSON, shapes, datatypes, sizes, base64, parameters", body = crate::error::ErrorBody),
        (status = 404, description = "No such model or version", body = crate::error::ErrorBody),
        (status = 413, description = "Body or image count over the limits", body = crate::error::ErrorBody),
        (status = 415, description = "A BYTES element is not a JPEG, PNG, WebP, BMP or GIF file", body = crate::error::ErrorBody),
        (status = 422, description = "Corrupt or truncated image", body = crate::error::ErrorBody),
        (status = 503, description = "At capacity (with Retry-After) or the model is not ready", body = crate::error::ErrorBody),
        (status = 504, description = "Not done within the time limit", body = crate::error::ErrorBody),
    ))]
pub async fn infer(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
    request: Request,
) -> Response {
    let (name, version) = match path(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let pipeline = match super::resolve(&state, &name, version.as_deref()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let arrived = tokio::time::Instant::now();
    let mut received = None;
    let result = serve(&state, &pipeline, request, arrived, &mut received).await;
    let answered = result.as_ref().ok().map(|(_, times)| *times);
    state
        .metrics
        .record_inference(&pipeline.name, answered, arrived.elapsed());
    let mut response = result.map_or_else(IntoResponse::into_response, |(r, _)| r);
    if let Some(at) = received {
        response.extensions_mut().insert(BodyReceived(at));
    }
    labelled(response, &pipeline.name)
}

async fn serve(
    state: &Arc<AppState>,
    pipeline: &Arc<crate::pipeline::Pipeline>,
    request: Request,
    arrived: tokio::time::Instant,
    received: &mut Option<Instant>,
) -> Result<(Response, crate::telemetry::RequestTimes), ApiError> {
    // Refused before the body is read while the model cannot serve.
    pipeline.readiness().map_err(|reason| {
        ApiError::Unavailable(format!(
            "model {} is not available: {reason}",
            pipeline.name
        ))
    })?;
    let limit = state.config.max_body_bytes;
    let headers = request.headers().clone();
    let encoding = Encoding::of(&headers)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        crate::upload::linger_unless_expected(request);
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Inference-Header-Content-Length must be a byte count".into(),
                    )
                })?,
        ),
    };
    // The body under the upload budget and deadlines, as every front door's, decompressed first
    // if it comes compressed; within the request's time from its arrival.
    let request = encoding.decoded(request);
    let deadline = arrived + state.config.request_timeout();
    let body = state
        .uploads
        .read_all(request, limit, Some(deadline))
        .await?;
    *received = Some(Instant::now());
    let mut parsed = parse(&body, header_length)?;
    parsed.request.arrived = Some(arrived);
    let binary_output = parsed.binary_output;
    let response = super::infer(state, pipeline, parsed.request).await?;
    let times = response.times;
    Ok((encode(response, binary_output), times))
}

/// The model's configuration (Triton's model configuration extension).
#[utoipa::path(get, path = "/v2/models/{name}/config", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The configuration (also at /v2/models/{name}/versions/{version}/config)", body = extensions::ModelConfig),
        (status = 404, description = "No such model or version", body = crate::error::ErrorBody),
        (status = 503, description = "The model is not loaded", body = crate::error::ErrorBody),
    ))]
pub async fn model_config(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
) -> Response {
    let (name, version) = match path(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match extensions::model_config(&state, &name, version.as_deref()) {
        Ok(c) => {
            let model = c.name.clone();
            labelled(Json(c).into_response(), &model)
        }
        Err(e) => e.into_response(),
    }
}

/// Statistics of every served model.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatisticsBody {
    pub model_stats: Vec<extensions::ModelStats>,
}

/// A model's cumulative statistics (Triton's statistics extension): requests, queue, decoding
/// and forward pass times in nanoseconds, and forward passes by batch size.
#[utoipa::path(get, path = "/v2/models/{name}/stats", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The statistics (also at /v2/models/{name}/versions/{version}/stats)", body = StatisticsBody),
        (status = 404, description = "No such model or version", body = crate::error::ErrorBody),
    ))]
pub async fn model_statistics(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
) -> Response {
    let (name, version) = match path(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    statistics_response(&state, &name, version.as_deref())
}

/// Every served model's statistics.
#[utoipa::path(get, path = "/v2/models/stats", tag = "open inference protocol",
    responses((status = 200, description = "The statistics of every served model", body = StatisticsBody)))]
pub async fn all_statistics(State(state): State<Arc<AppState>>) -> Response {
    statistics_response(&state, "", None)
}

fn statistics_response(state: &AppState, name: &str, version: Option<&str>) -> Response {
    match extensions::statistics(state, name, version) {
        Ok(model_stats) => Json(StatisticsBody { model_stats }).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A small JSON body of a repository request (64 KiB at most; empty: `{}`).
async fn small_json<T: serde::de::DeserializeOwned + Default>(
    state: &AppState,
    request: Request,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.request_timeout();
    let body = state
        .uploads
        .read_all(request, 64 * 1024, Some(deadline))
        .await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the request's JSON is not valid: {e}")))
}

#[derive(Debug, Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

#[derive(Debug, Default, Deserialize)]
struct RepositoryRequest {
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// The repository's models and versions, in Triton's states (`{"ready": true}`: only those
/// ready).
#[utoipa::path(post, path = "/v2/repository/index", tag = "open inference protocol",
    request_body(description = "Optional: {\"ready\": true} for the ready ones only", content = Object),
    responses((status = 200, description = "name, version, state (READY, LOADING, UNLOADING, UNAVAILABLE), reason", body = Vec<extensions::IndexEntry>)))]
pub async fn repository_index(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match small_json::<IndexRequest>(&state, request).await {
        Ok(r) => Json(extensions::index(&state, r.ready)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Loads or reloads a model from the repository (with --enable-model-control), as
/// `POST /models/{name}/load`.
#[utoipa::path(post, path = "/v2/repository/models/{name}/load", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Loaded and ready"),
        (status = 400, description = "A `config` or `file:` parameter (not supported)", body = crate::error::ErrorBody),
        (status = 403, description = "Model control is disabled", body = crate::error::ErrorBody),
        (status = 404, description = "No such model in the repository", body = crate::error::ErrorBody),
        (status = 500, description = "The model could not be loaded; the version being served, if any, stays", body = crate::error::ErrorBody),
    ))]
pub async fn repository_load(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
    request: Request,
) -> Response {
    repository_control(&state, params, request, true).await
}

/// Stops serving a model (with --enable-model-control); requests in flight finish first.
#[utoipa::path(post, path = "/v2/repository/models/{name}/unload", tag = "open inference protocol",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "No longer served"),
        (status = 403, description = "Model control is disabled", body = crate::error::ErrorBody),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
    ))]
pub async fn repository_unload(
    State(state): State<Arc<AppState>>,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
    request: Request,
) -> Response {
    repository_control(&state, params, request, false).await
}

async fn repository_control(
    state: &AppState,
    params: Result<Path<HashMap<String, String>>, PathRejection>,
    request: Request,
    load: bool,
) -> Response {
    let result = async {
        let (name, _) = path(params)?;
        let body: RepositoryRequest = small_json(state, request).await?;
        if load {
            extensions::check_load_parameters(body.parameters.keys().map(String::as_str))?;
            extensions::load(state, &name).await?;
        } else {
            extensions::unload(state, &name).await?;
        }
        Ok::<_, ApiError>(name)
    }
    .await;
    match result {
        Ok(name) => labelled(Json(serde_json::json!({})).into_response(), &name),
        Err(e) => e.into_response(),
    }
}

/// A request body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    /// zlib, as RFC 9110 defines `deflate` (and tritonclient sends it).
    Deflate,
}

impl Encoding {
    /// The body's encoding; 415 for one the server does not take.
    fn of(headers: &axum::http::HeaderMap) -> Result<Self, ApiError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Self::Identity);
        };
        let value = value.to_str().unwrap_or("").trim();
        if value.is_empty() || value.eq_ignore_ascii_case("identity") {
            Ok(Self::Identity)
        } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
            Ok(Self::Gzip)
        } else if value.eq_ignore_ascii_case("deflate") {
            Ok(Self::Deflate)
        } else {
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding {:?} is not supported: send the request uncompressed, or gzip or deflate",
                short(value)
            )))
        }
    }

    /// The request with its body decompressed as it is read (its length no longer known).
    fn decoded(self, request: Request) -> Request {
        use async_compression::tokio::bufread::{GzipDecoder, ZlibDecoder};
        use futures_util::TryStreamExt;
        use tokio_util::io::{ReaderStream, StreamReader};
        let name = match self {
            Self::Identity => return request,
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        };
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_ENCODING);
        let raw = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
        let reader: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> = match self {
            Self::Gzip => Box::pin(GzipDecoder::new(raw)),
            _ => Box::pin(ZlibDecoder::new(raw)),
        };
        // The body's own errors come through as `Other`; the rest are the decoder's.
        let stream = ReaderStream::new(reader).map_err(move |e| {
            if e.kind() != std::io::ErrorKind::Other {
                std::io::Error::new(
                    e.kind(),
                    format!("the {name} body could not be decompressed: {e}"),
                )
            } else {
                e
            }
        });
        Request::from_parts(parts, Body::from_stream(stream))
    }
}

/// A REST request decoded: the protocol-neutral request, and `binary_data_output`.
#[derive(Debug)]
pub struct Parsed {
    pub request: super::Request,
    pub binary_output: bool,
}

/// Decodes a request body: the JSON (all of it, or its first `header_length` bytes) and, with
/// the binary data extension, each input's `binary_data_size` bytes after it, in order.
pub fn parse(body: &Bytes, header_length: Option<usize>) -> Result<Parsed, ApiError> {
    let json_len = match header_length {
        Some(n) if n > body.len() => {
            return Err(ApiError::BadRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )));
        }
        Some(n) => n,
        None => body.len(),
    };
    if json_len == 0 {
        return Err(ApiError::BadRequest(
            "empty request: send an inference request's JSON".into(),
        ));
    }
    let json: InferRequestBody = serde_json::from_slice(&body[..json_len])
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request JSON: {e}")))?;
    let binary = body.slice(json_len..);
    let mut at = 0usize;
    let mut inputs = Vec::with_capacity(json.inputs.len());
    for input in json.inputs {
        let size = param_u64(&input.parameters, "binary_data_size", "input")?;
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` has both `data` and binary_data_size",
                    short(&input.name)
                )));
            }
            (Some(size), None) => {
                let left = binary.len() - at;
                if size > left as u64 {
                    return Err(ApiError::BadRequest(format!(
                        "input `{}` declares {size} bytes of binary data; {left} are left in the body",
                        short(&input.name)
                    )));
                }
                let size = size as usize;
                let slice = binary.slice(at..at + size);
                at += size;
                Data::Raw(slice)
            }
            (None, Some(d)) => d.into_data(),
            (None, None) => Data::Missing,
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    if at != binary.len() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes after the JSON that no input's binary_data_size accounts for",
            binary.len() - at
        )));
    }
    let mut outputs = Vec::with_capacity(json.outputs.len());
    for out in json.outputs {
        let k = param_u64(&out.parameters, "classification", "output")?;
        outputs.push(OutputRequest {
            name: out.name,
            classification: k.map(|k| k.min(u32::MAX as u64) as usize),
            binary: param_bool(&out.parameters, "binary_data")?,
        });
    }
    let timeout = param_u64(&json.parameters, "timeout", "request")?;
    if timeout == Some(0) {
        return Err(ApiError::InvalidParameter(
            "parameter `timeout` (microseconds) must be positive".into(),
        ));
    }
    Ok(Parsed {
        request: super::Request {
            id: json.id,
            timeout: timeout.map(Duration::from_micros),
            arrived: None,
            inputs,
            outputs,
        },
        binary_output: param_bool(&json.parameters, "binary_data_output")?.unwrap_or(false),
    })
}

fn param_u64(params: &Map<String, Value>, key: &str, of: &str) -> Result<Option<u64>, ApiError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::InvalidParameter(format!(
                "{of} parameter `{key}` must be a non-negative integer, got {}",
                short(&v.to_string())
            ))
        }),
    }
}

fn param_bool(params: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::InvalidParameter(format!(
            "parameter `{key}` must be true or false, got {}",
            short(&v.to_string())
        ))),
    }
}

/// The response: JSON, or JSON then the binary outputs' bytes.
pub fn encode(response: super::Response, binary_output: bool) -> Response {
    let mut tail: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for out in response.outputs {
        let binary = out.binary.unwrap_or(binary_output);
        let (parameters, data) = if binary {
            let raw = out.raw();
            let size = raw.len();
            tail.extend_from_slice(&raw);
            (Some(serde_json::json!({ "binary_data_size": size })), None)
        } else {
            let data = match out.data {
                OutputData::Fp32(v) => serde_json::to_value(v).unwrap_or_default(),
                OutputData::Bytes(v) => serde_json::to_value(v).unwrap_or_default(),
            };
            (None, Some(data))
        };
        outputs.push(ResponseOutputBody {
            name: out.name,
            datatype: out.datatype.into(),
            shape: out.shape,
            parameters,
            data,
        });
    }
    let body = InferResponseBody {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        outputs,
    };
    if tail.is_empty() {
        return Json(body).into_response();
    }
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    let json_len = bytes.len();
    bytes.extend_from_slice(&tail);
    let mut r = Response::new(Body::from(bytes));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_LENGTH, HeaderValue::from(json_len));
    r
}

/// `{name}` and the optional `{version}` of the path.
fn path(
    params: Result<Path<HashMap<String, String>>, PathRejection>,
) -> Result<(String, Option<String>), ApiError> {
    let Path(mut p) =
        params.map_err(|e| ApiError::BadRequest(format!("bad path parameters: {e}")))?;
    let name: String = p
        .remove("name")
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect();
    let version = p.remove("version").map(|v| v.chars().take(40).collect());
    Ok((name, version))
}

/// An error response with extra fields beside `error` and `code` (`ready`, `live`, `name`).
fn with_fields(e: ApiError, fields: Value) -> Response {
    let status = e.status();
    let retry = e.retry_after();
    let code = e.code();
    let mut body = fields;
    body["error"] = e.to_string().into();
    body["code"] = code.into();
    let mut r = (status, Json(body)).into_response();
    if let Some(secs) = retry {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r.extensions_mut().insert(ErrorCode(code));
    r
}

fn labelled(mut r: Response, model: &str) -> Response {
    r.extensions_mut().insert(ModelLabel(model.to_owned()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str, binary: &[u8]) -> (Bytes, usize) {
        let mut b = json.as_bytes().to_vec();
        b.extend_from_slice(binary);
        (Bytes::from(b), json.len())
    }

    #[test]
    fn binary_inputs_are_cut_from_the_tail_in_order() {
        let json = r#"{"id":"7","inputs":[{"name":"image","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}],"outputs":[{"name":"probabilities","parameters":{"classification":3,"binary_data":true}}],"parameters":{"timeout":5000}}"#;
        let (b, n) = body(json, b"0123456789");
        let p = parse(&b, Some(n)).unwrap();
        assert_eq!(p.request.id.as_deref(), Some("7"));
        assert_eq!(p.request.timeout, Some(Duration::from_millis(5)));
        match &p.request.inputs[0].data {
            Data::Raw(r) => assert_eq!(&r[..], b"0123456789"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.request.outputs[0].classification, Some(3));
        assert_eq!(p.request.outputs[0].binary, Some(true));
    }

    #[test]
    fn sizes_that_do_not_add_up_are_refused() {
        let json = r#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        // Too few bytes, too many bytes, a header length beyond the body, a huge declared size.
        let (b, n) = body(json, b"1234");
        assert!(parse(&b, Some(n)).is_err());
        let (b, n) = body(json, b"123456789");
        assert!(parse(&b, Some(n)).is_err());
        let (b, _) = body(json, b"12345678");
        assert!(parse(&b, Some(b.len() + 1)).is_err());
        let huge = json.replace("8}", &format!("{}}}", u64::MAX));
        let (b, n) = body(&huge, b"12345678");
        assert!(parse(&b, Some(n)).is_err());
        let (b, n) = body(json, b"12345678");
        assert!(parse(&b, Some(n)).is_ok());
    }

    #[test]
    fn parameters_have_types() {
        for bad in [
            r#"{"inputs":[],"parameters":{"timeout":"soon"}}"#,
            r#"{"inputs":[],"parameters":{"timeout":0}}"#,
            r#"{"inputs":[],"parameters":{"binary_data_output":1}}"#,
            r#"{"inputs":[],"outputs":[{"name":"p","parameters":{"classification":-1}}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}trailing"#,
            r#"{"inputs":[{"name":"x","shape":[-1e30],"datatype":"FP32","data":[1]}]}"#,
            "",
        ] {
            assert!(parse(&Bytes::from(bad), None).is_err(), "{bad}");
        }
    }
}
