//! What a client can cause: one enum, each variant with its status code and a stable `code`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

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
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    ImageTooLarge { width: u32, height: u32, limit: u64 },
    #[error("too many images in one request: at most {limit}")]
    TooManyImages { limit: usize },
    #[error("the server is at capacity ({capacity} images admitted); retry shortly")]
    Overloaded { capacity: usize },
    #[error("the server is not ready: {0}")]
    Unavailable(String),
    #[error("the request did not complete within {ms} ms")]
    Timeout { ms: u64 },
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
            Self::BadRequest(_) | Self::MissingFile | Self::InvalidParameter(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UndecodableImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. }
            | Self::ImageTooLarge { .. }
            | Self::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
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
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::ImageTooLarge { .. } => "image_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::Overloaded { .. } => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout { .. } => "timeout",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
        }
    }

    /// Seconds a client should wait before retrying, for the statuses that invite a retry.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Overloaded { .. } => Some(1),
            Self::Unavailable(_) => Some(5),
            _ => None,
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
            (ApiError::Overloaded { capacity: 1 }, 503, "overloaded"),
            (ApiError::Timeout { ms: 1 }, 504, "timeout"),
            (ApiError::NotFound("/x".into()), 404, "not_found"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn overload_sets_retry_after() {
        let r = ApiError::Overloaded { capacity: 4 }.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::MissingFile.into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
