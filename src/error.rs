//! What a client can cause: one enum, each variant with its status code and a stable `code`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Refusal;
use crate::pipeline::PipelineError;
use crate::preprocess::PreprocessError;
use crate::repository::RepoError;

/// The JSON body of every failure.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable description.
    pub error: String,
    /// Stable machine-readable code, e.g. `unsupported_media_type`.
    pub code: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "no image in the request: send multipart/form-data with a `file` field, or the image bytes as the body"
    )]
    MissingFile,
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the image could not be decoded: {0}")]
    UndecodableImage(String),
    #[error("{0}")]
    UnsupportedAspectRatio(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("too many images in one request: at most {limit}")]
    TooManyImages { limit: usize },
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    ModelRequired(String),
    #[error("{0}")]
    ModelLoadFailed(String),
    #[error(
        "model control is disabled: start the server with --enable-model-control (TCH_SERVE_ENABLE_MODEL_CONTROL=true)"
    )]
    ModelControlDisabled,
    #[error("the request did not complete within {ms} ms")]
    Timeout { ms: u64 },
    /// The client was too slow sending its request body.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{}", match .0 {
        Refusal::Missing => "this route needs an API key: send `Authorization: Bearer <key>`",
        Refusal::Invalid => "the API key is not valid",
    })]
    Unauthorized(Refusal),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::MissingFile
            | Self::InvalidParameter(_)
            | Self::ModelRequired(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::ModelControlDisabled => StatusCode::FORBIDDEN,
            Self::ModelLoadFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UndecodableImage(_) | Self::UnsupportedAspectRatio(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::PayloadTooLarge { .. } | Self::ImageTooLarge(_) | Self::TooManyImages { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::Overloaded(_) | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::MissingFile => "missing_file",
            Self::InvalidParameter(_) => "invalid_parameter",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UndecodableImage(_) => "undecodable_image",
            Self::UnsupportedAspectRatio(_) => "unsupported_aspect_ratio",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::ImageTooLarge(_) => "image_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::Overloaded(_) => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::ModelNotFound(_) => "model_not_found",
            Self::ModelRequired(_) => "model_required",
            Self::ModelLoadFailed(_) => "model_load_failed",
            Self::ModelControlDisabled => "model_control_disabled",
            Self::Timeout { .. } => "timeout",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
        }
    }

    /// Seconds a client should wait before retrying, for the statuses that invite a retry.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Overloaded(_) => Some(1),
            Self::Unavailable(_) => Some(5),
            _ => None,
        }
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        match e {
            PreprocessError::Empty => Self::MissingFile,
            PreprocessError::UnsupportedFormat(m) => Self::UnsupportedMediaType(m),
            PreprocessError::Undecodable(m) => Self::UndecodableImage(m),
            PreprocessError::AspectRatio { .. } => Self::UnsupportedAspectRatio(e.to_string()),
            PreprocessError::TooLarge { .. } | PreprocessError::OverBudget { .. } => {
                Self::ImageTooLarge(e.to_string())
            }
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Overloaded { .. } => Self::Overloaded(e.to_string()),
            PipelineError::Unavailable { .. } => Self::Unavailable(e.to_string()),
            PipelineError::Preprocess(p) => p.into(),
            PipelineError::WrongTensor(m) => Self::BadRequest(m),
            PipelineError::InferenceFailed { detail } => {
                // Logged once, here; the client gets no internal detail.
                tracing::error!(error = %detail, "inference failed");
                Self::Internal
            }
        }
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        let message = e.to_string();
        match e {
            RepoError::NotFound { .. } | RepoError::VersionNotServed { .. } => {
                Self::ModelNotFound(message)
            }
            RepoError::NoDefault { .. } => Self::ModelRequired(message),
            RepoError::Unavailable { .. } => Self::Unavailable(message),
            RepoError::LoadFailed { .. } => Self::ModelLoadFailed(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code().to_string(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        match &self {
            // The rest of the body is not read: the connection cannot serve another request.
            Self::RequestTimeout(_) => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // RFC 6750, section 3.
            Self::Unauthorized(why) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(match why {
                        Refusal::Missing => "Bearer realm=\"tch-serve\"",
                        Refusal::Invalid => "Bearer realm=\"tch-serve\", error=\"invalid_token\"",
                    }),
                );
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}

/// Attached to error responses so the metrics layer can count rejections by reason.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let cases = [
            (ApiError::MissingFile, 400, "missing_file"),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "unsupported_media_type",
            ),
            (
                ApiError::UndecodableImage("x".into()),
                422,
                "undecodable_image",
            ),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (ApiError::Overloaded("x".into()), 503, "overloaded"),
            (ApiError::ModelNotFound("x".into()), 404, "model_not_found"),
            (ApiError::ModelRequired("x".into()), 400, "model_required"),
            (
                ApiError::ModelControlDisabled,
                403,
                "model_control_disabled",
            ),
            (ApiError::Timeout { ms: 1 }, 504, "timeout"),
            (ApiError::RequestTimeout("x".into()), 408, "request_timeout"),
            (
                ApiError::Unauthorized(Refusal::Missing),
                401,
                "unauthorized",
            ),
            (ApiError::NotFound("/x".into()), 404, "not_found"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn overload_sets_retry_after() {
        let r = ApiError::Overloaded("full".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::MissingFile.into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
