//! `POST /predict`: multipart `file` parts (in order) or a raw image body, answered with the
//! top-k classes of each image and per-stage timings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use utoipa::ToSchema;

use super::models::ModelName;
use crate::doors::{BodyReceived, ModelLabel, Prediction, top_k};
use crate::error::ApiError;
use crate::pipeline::{Classified, Pipeline, WorkerState};
use crate::state::AppState;
use crate::telemetry::RequestTimes;
use crate::upload::UploadBudget;

/// The answer for one image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageResult {
    /// The multipart part's filename, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Detected from the content: jpeg, png, webp, bmp or gif.
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// Sorted by probability, highest first; `top_k` long.
    pub predictions: Vec<Prediction>,
    /// Images in the forward pass that served this one.
    pub batch_size: usize,
    pub queue_ms: f64,
    pub inference_ms: f64,
}

/// Milliseconds spent per stage for the whole request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Longest wait of the request's images in the inference queue.
    pub queue_ms: f64,
    /// Longest decode and resize among the request's images (they run in parallel).
    pub preprocess_ms: f64,
    /// Longest forward pass among the request's images.
    pub inference_ms: f64,
    /// From arrival to response, body upload included.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PredictResponse {
    pub model: String,
    /// The version of the model that answered.
    pub version: u64,
    pub device: String,
    /// False when the model's weights are a random initialisation.
    pub trained: bool,
    /// The first image's predictions, for clients of single-image APIs.
    pub predictions: Vec<Prediction>,
    /// One entry per image, in request order.
    pub results: Vec<ImageResult>,
    pub timings: Timings,
}

/// An uploaded image before decoding.
struct Upload {
    filename: Option<String>,
    bytes: Bytes,
}

/// Classify one or more images with the default model, or the one named by `?model=`.
#[utoipa::path(post, path = "/predict", tag = "inference",
    params(
        ("top_k" = Option<usize>, Query, description = "Classes returned per image (default 5)"),
        ("model" = Option<String>, Query, description = "Model to use (default: the default model)"),
    ),
    request_body(description = "multipart/form-data with one or more `file` parts, or the raw image bytes (image/*)",
        content((String = "multipart/form-data"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 200, description = "Top-k classes per image", body = PredictResponse),
        (status = 400, description = "No `file` part, empty body, bad `top_k`, or no model named while several are served", body = crate::error::ErrorBody),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
        (status = 413, description = "Body, image dimensions or image count over the limits", body = crate::error::ErrorBody),
        (status = 415, description = "Not JPEG, PNG, WebP, BMP or GIF", body = crate::error::ErrorBody),
        (status = 422, description = "Corrupt or truncated image", body = crate::error::ErrorBody),
        (status = 503, description = "At capacity (with Retry-After) or the model is not ready", body = crate::error::ErrorBody),
        (status = 504, description = "Not done within the request timeout", body = crate::error::ErrorBody),
    ))]
pub async fn predict(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let query = match parse_query(
        request.uri().query(),
        state.config.default_top_k,
        state.config.max_top_k,
    ) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    serve(&state, query.model.as_deref(), query.top_k, request).await
}

/// Classify one or more images with the named model.
#[utoipa::path(post, path = "/models/{name}/predict", tag = "inference",
    params(
        ("name" = String, Path, description = "Model name"),
        ("top_k" = Option<usize>, Query, description = "Classes returned per image (default 5)"),
    ),
    request_body(description = "as POST /predict",
        content((String = "multipart/form-data"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 200, description = "Top-k classes per image", body = PredictResponse),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
        (status = 503, description = "At capacity (with Retry-After) or the model is not ready", body = crate::error::ErrorBody),
    ))]
pub async fn predict_named(
    State(state): State<Arc<AppState>>,
    ModelName(name): ModelName,
    request: Request,
) -> Response {
    let query = match parse_query(
        request.uri().query(),
        state.config.default_top_k,
        state.config.max_top_k,
    ) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    serve(&state, Some(&name), query.top_k, request).await
}

/// Resolves the model, then classifies within the request's time budget. Every answer, error
/// or not, carries the model's name for the metrics.
async fn serve(state: &Arc<AppState>, model: Option<&str>, k: usize, request: Request) -> Response {
    let arrived = Instant::now();
    let pipeline = match state.repository.resolve(model) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let budget = state.config.request_timeout();
    let deadline = tokio::time::Instant::now() + budget;
    let work = classify(state, &pipeline, request, k, arrived, deadline);
    let result = match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout {
            ms: budget.as_millis() as u64,
        }),
    };
    let answered = result.as_ref().ok().map(|(_, times)| *times);
    state
        .metrics
        .record_inference(&pipeline.name, answered, arrived.elapsed());
    let mut response = result.map_or_else(IntoResponse::into_response, |(r, _)| r);
    response
        .extensions_mut()
        .insert(ModelLabel(pipeline.name.clone()));
    response
}

async fn classify(
    state: &Arc<AppState>,
    pipeline: &Arc<Pipeline>,
    request: Request,
    k: usize,
    arrived: Instant,
    deadline: tokio::time::Instant,
) -> Result<(Response, RequestTimes), ApiError> {
    // Refused at once while the model cannot serve, before the body is read.
    pipeline.readiness().map_err(|reason| {
        ApiError::Unavailable(format!(
            "model {} is not available: {reason}",
            pipeline.name
        ))
    })?;
    // The body's bytes from the upload budget, then a place per image: both refused at once
    // when full.
    let upload = tracing::info_span!(
        "upload",
        upload.bytes = tracing::field::Empty,
        upload.images = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::record_trace_id(&upload);
    let uploads = read_uploads(
        request,
        state.config.max_body_bytes,
        state.config.max_images_per_request,
        &state.uploads,
        deadline,
    )
    .instrument(upload.clone())
    .await?;
    upload.record(
        "upload.bytes",
        uploads.iter().map(|u| u.bytes.len()).sum::<usize>(),
    );
    upload.record("upload.images", uploads.len());
    drop(upload);
    let body_received = Instant::now();
    let places = pipeline.admit(uploads.len())?;
    // Each image's place travels with its work; if this request ends early, the futures are
    // dropped and the work not yet started is skipped.
    let pending = places
        .into_iter()
        .zip(&uploads)
        .map(|(place, upload)| pipeline.submit(place, upload.bytes.clone()));
    let answers = futures_util::future::try_join_all(pending).await?;
    let times = Classified::times(&answers);

    let labels = pipeline.labels();
    let mut results = Vec::with_capacity(answers.len());
    let mut preprocess = Duration::ZERO;
    for (out, upload) in answers.into_iter().zip(uploads) {
        preprocess = preprocess.max(out.image.preprocess_time);
        results.push(ImageResult {
            filename: upload.filename,
            format: out.image.format.to_string(),
            width: out.image.width,
            height: out.image.height,
            predictions: top_k(&out.probabilities, k, labels),
            batch_size: out.batch_size,
            queue_ms: ms(out.queue_time),
            inference_ms: ms(out.inference_time),
        });
    }

    let timings = Timings {
        queue_ms: results.iter().map(|r| r.queue_ms).fold(0.0, f64::max),
        preprocess_ms: ms(preprocess),
        inference_ms: results.iter().map(|r| r.inference_ms).fold(0.0, f64::max),
        total_ms: ms(arrived.elapsed()),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-queue-time", timings.queue_ms),
        ("x-preprocess-time", timings.preprocess_ms),
        ("x-inference-time", timings.inference_ms),
        ("x-total-time", timings.total_ms),
    ] {
        if let Ok(v) = HeaderValue::from_str(&format!("{value:.3}")) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    let device = match pipeline.state() {
        WorkerState::Ready(r) => r.device,
        _ => pipeline.settings.device.clone(),
    };
    let body = PredictResponse {
        model: pipeline.name.clone(),
        version: pipeline.version,
        device,
        trained: pipeline.meta.trained,
        predictions: results[0].predictions.clone(),
        results,
        timings,
    };
    let mut response = (headers, Json(body)).into_response();
    response
        .extensions_mut()
        .insert(BodyReceived(body_received));
    Ok((response, times))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What the query string of a predict request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictQuery {
    pub top_k: usize,
    pub model: Option<String>,
}

/// The longest model name: a model is a folder of the repository, and no file system has longer
/// names.
const MAX_MODEL_NAME_BYTES: usize = 255;

/// `top_k` and `model` from the query string, percent-decoded (`+` is a space, as in forms): an
/// absent `top_k` gives the default, anything but 1..=max is a 400, as is a model name longer
/// than a folder name can be; other keys are ignored.
pub fn parse_query(
    query: Option<&str>,
    default: usize,
    max: usize,
) -> Result<PredictQuery, ApiError> {
    let mut k = default;
    let mut model = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "top_k" => {
                k = value.parse::<usize>().map_err(|_| {
                    ApiError::InvalidParameter(format!(
                        "top_k must be an integer between 1 and {max}, got {:?}",
                        value.chars().take(40).collect::<String>()
                    ))
                })?;
            }
            "model" if value.len() > MAX_MODEL_NAME_BYTES => {
                return Err(ApiError::InvalidParameter(format!(
                    "model names are at most {MAX_MODEL_NAME_BYTES} bytes, got {}",
                    value.len()
                )));
            }
            "model" if !value.is_empty() => model = Some(value.into_owned()),
            "model" => {
                return Err(ApiError::InvalidParameter(
                    "model must name a model: ?model=NAME".into(),
                ));
            }
            _ => {}
        }
    }
    if k == 0 || k > max {
        return Err(ApiError::InvalidParameter(format!(
            "top_k must be between 1 and {max}, got {k}"
        )));
    }
    Ok(PredictQuery { top_k: k, model })
}

/// The images of a request: every multipart `file` part in order, or the raw body, received
/// under the upload budget and deadlines (see [`crate::upload`]).
async fn read_uploads(
    request: Request,
    limit: usize,
    max_images: usize,
    budget: &UploadBudget,
    deadline: tokio::time::Instant,
) -> Result<Vec<Upload>, ApiError> {
    let (request, receiving) = match refuse_declared_over(request, limit) {
        Ok(request) => budget.receive(request, Some(deadline))?,
        Err(e) => return Err(e),
    };
    read_parts(request, limit, max_images)
        .await
        .map_err(|e| receiving.explain(e))
}

/// 413 from the declared length alone; the body is still read (and dropped) in the background,
/// so that a client or proxy still sending it reads the 413 instead of a broken pipe (nginx
/// would answer 502).
fn refuse_declared_over(request: Request, limit: usize) -> Result<Request, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        crate::upload::linger_unless_expected(request);
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(request)
}

async fn read_parts(
    request: Request,
    limit: usize,
    max_images: usize,
) -> Result<Vec<Upload>, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();

    if mime == "multipart/form-data" {
        let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
            ApiError::BadRequest(format!("invalid multipart request: {}", e.body_text()))
        })?;
        let mut uploads = Vec::new();
        let mut other_fields = Vec::new();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) => return Err(multipart_error(e, limit)),
            };
            let name = field.name().unwrap_or("").to_owned();
            if name != "file" {
                other_fields.push(name);
                // Drain it so the next part can be read (it counts against the body limit).
                field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                continue;
            }
            if uploads.len() == max_images {
                return Err(ApiError::TooManyImages { limit: max_images });
            }
            let filename = field.file_name().map(str::to_owned);
            let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
            if bytes.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "`file` part {} is empty",
                    uploads.len() + 1
                )));
            }
            uploads.push(Upload { filename, bytes });
        }
        if uploads.is_empty() {
            return Err(if other_fields.is_empty() {
                ApiError::MissingFile
            } else {
                ApiError::BadRequest(format!(
                    "no `file` part in the form (found {}): send the image as `-F file=@image.jpg`",
                    other_fields
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            });
        }
        return Ok(uploads);
    }

    if !(mime.is_empty() || mime.starts_with("image/") || mime == "application/octet-stream") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {mime:?} is not accepted: send multipart/form-data with a `file` part, or the image bytes as image/* or application/octet-stream"
        )));
    }
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| crate::upload::body_error(e, limit))?;
    if bytes.is_empty() {
        return Err(ApiError::MissingFile);
    }
    Ok(vec![Upload {
        filename: None,
        bytes,
    }])
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_capped() {
        let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = [0.1, 0.4, 0.2, 0.3];
        let top = top_k(&p, 3, &labels);
        assert_eq!(
            top.iter().map(|p| p.index).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        assert_eq!(top[0].label, "b");
        assert_eq!(top_k(&p, 10, &labels).len(), 4);
        // Ties go to the lower index.
        let tie = top_k(&[0.5, 0.5, 0.0], 2, &labels);
        assert_eq!((tie[0].index, tie[1].index), (0, 1));
    }

    #[test]
    fn query_parameters() {
        let k = |q: Option<&str>| parse_query(q, 5, 100).map(|q| q.top_k);
        assert_eq!(k(None).unwrap(), 5);
        assert_eq!(k(Some("top_k=3")).unwrap(), 3);
        assert_eq!(k(Some("x=1&top_k=100")).unwrap(), 100);
        for bad in [
            "top_k=0",
            "top_k=101",
            "top_k=-1",
            "top_k=abc",
            "top_k=",
            "model=",
        ] {
            let err = parse_query(Some(bad), 5, 100).unwrap_err();
            assert_eq!(err.code(), "invalid_parameter", "{bad}");
        }
        let q = parse_query(Some("model=efficientnet_lite0&top_k=2"), 5, 100).unwrap();
        assert_eq!(q.model.as_deref(), Some("efficientnet_lite0"));
        assert_eq!(q.top_k, 2);
        // Keys and values are percent-decoded (and `+` is a space), as clients encode them.
        let q = parse_query(Some("model=efficientnet%5Flite0&top%5Fk=2"), 5, 100).unwrap();
        assert_eq!(q.model.as_deref(), Some("efficientnet_lite0"));
        assert_eq!(q.top_k, 2);
        let q = parse_query(Some("model=my+model%2Fv2"), 5, 100).unwrap();
        assert_eq!(q.model.as_deref(), Some("my model/v2"));
        // A name longer than any folder name is refused, not cut to a name it is not.
        let longest = format!("model={}", "x".repeat(255));
        assert_eq!(
            parse_query(Some(&longest), 5, 100)
                .unwrap()
                .model
                .unwrap()
                .len(),
            255
        );
        let long = format!("model={}", "x".repeat(10_000));
        let err = parse_query(Some(&long), 5, 100).unwrap_err();
        assert_eq!(err.code(), "invalid_parameter");
    }
}
