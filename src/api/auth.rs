//! The API keys on the HTTP front door: every route but the probes (see [`crate::auth`]) needs
//! `Authorization: Bearer <key>` when keys are configured; a 401 JSON answer otherwise.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// Refuses a request for a protected route without a valid key, before its body is read.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let keys = &state.auth;
    if !keys.enabled() || keys.is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match keys.verify(authorization) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            // A client still sending a body reads the 401 instead of a broken pipe.
            crate::upload::linger_unless_expected(request);
            ApiError::Unauthorized(why).into_response()
        }
    }
}
