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
use tokio::sync::oneshot;
use utoipa::ToSchema;

use crate::batcher::Job;
use crate::error::ApiError;
use crate::state::{AppState, Phase};

/// One class and its probability.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub index: usize,
    pub probability: f32,
}

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
    /// Decoding and resizing all images (in parallel).
    pub preprocess_ms: f64,
    /// Longest forward pass among the request's images.
    pub inference_ms: f64,
    /// From arrival to response, body upload included.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PredictResponse {
    pub model: String,
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

/// Classify one or more images.
#[utoipa::path(post, path = "/predict", tag = "inference",
    params(("top_k" = Option<usize>, Query, description = "Classes returned per image (default 5)")),
    request_body(description = "multipart/form-data with one or more `file` parts, or the raw image bytes (image/*)",
        content((String = "multipart/form-data"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 200, description = "Top-k classes per image", body = PredictResponse),
        (status = 400, description = "No `file` part, empty body, or bad `top_k`", body = crate::error::ErrorBody),
        (status = 413, description = "Body, image dimensions or image count over the limits", body = crate::error::ErrorBody),
        (status = 415, description = "Not JPEG, PNG, WebP, BMP or GIF", body = crate::error::ErrorBody),
        (status = 422, description = "Corrupt or truncated image", body = crate::error::ErrorBody),
        (status = 503, description = "At capacity (with Retry-After) or not ready", body = crate::error::ErrorBody),
        (status = 504, description = "Not done within the request timeout", body = crate::error::ErrorBody),
    ))]
pub async fn predict(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    // While shutting down the server keeps answering: /health already says 503 so load
    // balancers stop sending, and whatever still arrives before the listener closes is served.
    if state.phase() == Phase::Starting {
        return Err(ApiError::Unavailable("the model is still loading".into()));
    }
    let top_k = parse_top_k(
        request.uri().query(),
        state.config.default_top_k,
        state.config.max_top_k,
    )?;
    let budget = state.config.request_timeout();
    match tokio::time::timeout(budget, classify(&state, request, top_k, arrived)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout {
            ms: budget.as_millis() as u64,
        }),
    }
}

async fn classify(
    state: &Arc<AppState>,
    request: Request,
    k: usize,
    arrived: Instant,
) -> Result<Response, ApiError> {
    // A place to receive the body, then places for its images: both refused at once when full.
    let receiving = state.begin_upload()?;
    let uploads = read_uploads(
        request,
        state.config.max_body_bytes,
        state.config.max_images_per_request,
    )
    .await?;
    let _admission = state.admit(uploads.len())?;
    drop(receiving);

    // Decode and resize off the async runtime, all images of the request in parallel.
    let pre_start = Instant::now();
    let mut decoding = Vec::with_capacity(uploads.len());
    for upload in &uploads {
        let (tx, rx) = oneshot::channel();
        let bytes = upload.bytes.clone();
        let metrics = state.metrics.clone();
        let pre = state.preprocessor.clone();
        state.pool.spawn(move || {
            let t = Instant::now();
            let out = pre.run(&bytes);
            metrics
                .preprocess_duration
                .observe(t.elapsed().as_secs_f64());
            let _ = tx.send(out);
        });
        decoding.push(rx);
    }
    let mut images = Vec::with_capacity(decoding.len());
    for rx in decoding {
        images.push(rx.await.map_err(|_| ApiError::Internal)??);
    }
    let preprocess_ms = ms(pre_start.elapsed());

    let mut answers = Vec::with_capacity(images.len());
    let mut meta = Vec::with_capacity(images.len());
    for image in images {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            input: image.data,
            enqueued: Instant::now(),
            reply: tx,
        };
        if state.batcher.submit(job).is_err() {
            return Err(ApiError::Overloaded {
                capacity: state.config.queue_capacity,
            });
        }
        answers.push(rx);
        meta.push((image.format, image.width, image.height));
    }

    let labels = &state.model.labels;
    let mut results = Vec::with_capacity(answers.len());
    for ((rx, (format, width, height)), upload) in answers.into_iter().zip(meta).zip(uploads) {
        let out = match rx.await {
            Ok(Ok(out)) => out,
            Ok(Err(why)) => {
                tracing::error!(error = %why, "inference failed");
                return Err(ApiError::Internal);
            }
            Err(_) => return Err(ApiError::Unavailable("the inference thread stopped".into())),
        };
        results.push(ImageResult {
            filename: upload.filename,
            format: format.to_string(),
            width,
            height,
            predictions: top_k(&out.probabilities, k, labels),
            batch_size: out.batch_size,
            queue_ms: ms(out.queue_time),
            inference_ms: ms(out.inference_time),
        });
    }
    state.metrics.images.inc_by(results.len() as u64);

    let timings = Timings {
        queue_ms: results.iter().map(|r| r.queue_ms).fold(0.0, f64::max),
        preprocess_ms,
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
    let body = PredictResponse {
        model: state.model.name.clone(),
        device: state.model.device.clone(),
        trained: state.model.trained,
        predictions: results[0].predictions.clone(),
        results,
        timings,
    };
    Ok((headers, Json(body)).into_response())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `top_k` from the query string: absent gives the default, anything but 1..=max is a 400.
pub fn parse_top_k(query: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let mut k = default;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "top_k" {
            k = value.parse::<usize>().map_err(|_| {
                ApiError::InvalidParameter(format!(
                    "top_k must be an integer between 1 and {max}, got {value:?}"
                ))
            })?;
        }
    }
    if k == 0 || k > max {
        return Err(ApiError::InvalidParameter(format!(
            "top_k must be between 1 and {max}, got {k}"
        )));
    }
    Ok(k)
}

/// The `k` most probable classes, highest first (ties by lower index). `k` is capped at the
/// number of classes.
pub fn top_k(probs: &[f32], k: usize, labels: &[String]) -> Vec<Prediction> {
    let k = k.min(probs.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.select_nth_unstable_by(k - 1, order);
    idx.truncate(k);
    idx.sort_unstable_by(order);
    idx.into_iter()
        .map(|i| Prediction {
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            index: i,
            probability: probs[i],
        })
        .collect()
}

/// The images of a request: every multipart `file` part in order, or the raw body.
async fn read_uploads(
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
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }

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
        .map_err(|e| body_error(e, limit))?;
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

fn body_error(e: axum::Error, limit: usize) -> ApiError {
    let inner = e.into_inner();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge { limit };
        }
        source = err.source();
    }
    ApiError::BadRequest(format!("could not read the request body: {inner}"))
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
    fn top_k_parameter() {
        assert_eq!(parse_top_k(None, 5, 100).unwrap(), 5);
        assert_eq!(parse_top_k(Some("top_k=3"), 5, 100).unwrap(), 3);
        assert_eq!(parse_top_k(Some("x=1&top_k=100"), 5, 100).unwrap(), 100);
        for bad in ["top_k=0", "top_k=101", "top_k=-1", "top_k=abc", "top_k="] {
            let err = parse_top_k(Some(bad), 5, 100).unwrap_err();
            assert_eq!(err.code(), "invalid_parameter", "{bad}");
        }
    }
}
