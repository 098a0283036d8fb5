//! `/models`: what the repository serves, each model's readiness, and (with
//! `--enable-model-control`) loading and unloading while serving.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ModelLabel;
use crate::error::ApiError;
use crate::repository::{ModelState, ModelView};
use crate::state::AppState;

/// The `{name}` of a `/models/{name}/...` route, with a JSON error when it cannot be read.
pub struct ModelName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ModelName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(name)| ModelName(name.chars().take(100).collect()))
            .map_err(|e| ApiError::BadRequest(format!("bad model name in the path: {e}")))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// The model `POST /predict` serves without `?model=`.
    pub default_model: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<ModelView>,
}

/// Every model in the repository: versions, state, device, precision, whether trained.
#[utoipa::path(get, path = "/models", tag = "models",
    responses((status = 200, description = "The models", body = ModelList)))]
pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        default_model: state.repository.default_model(),
        models: state.repository.views(),
    })
}

/// One model; 200 when it is ready to serve, 503 (same body, with `error` and `code`) when not.
#[utoipa::path(get, path = "/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
        (status = 503, description = "Not ready: loading, failed, unloading or unavailable", body = Object),
    ))]
pub async fn get(State(state): State<Arc<AppState>>, ModelName(name): ModelName) -> Response {
    match state.repository.view(&name) {
        Some(view) => view_response(view),
        None => not_found(&state, &name).into_response(),
    }
}

fn not_found(state: &AppState, name: &str) -> ApiError {
    ApiError::from(crate::repository::RepoError::NotFound {
        name: name.to_owned(),
        available: state.repository.names(),
    })
}

fn view_response(view: ModelView) -> Response {
    let ready = view.state == ModelState::Ready;
    let mut body = serde_json::to_value(&view).unwrap_or_default();
    if !ready {
        body["error"] = format!(
            "model {} is {}{}",
            view.name,
            view.state.as_str(),
            view.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )
        .into();
        body["code"] = "unavailable".into();
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = (status, Json(body)).into_response();
    r.extensions_mut().insert(ModelLabel(view.name));
    r
}

/// Loads the model from the repository, or reloads it: the new version is loaded and warmed
/// beside the one being served, then swapped in; requests in flight finish on the old one.
#[utoipa::path(post, path = "/models/{name}/load", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Loaded and ready", body = Object),
        (status = 403, description = "Model control is disabled", body = crate::error::ErrorBody),
        (status = 404, description = "No such model in the repository", body = crate::error::ErrorBody),
        (status = 500, description = "The model could not be loaded; the version being served, if any, stays", body = crate::error::ErrorBody),
    ))]
pub async fn load(State(state): State<Arc<AppState>>, ModelName(name): ModelName) -> Response {
    if !state.config.enable_model_control {
        return ApiError::ModelControlDisabled.into_response();
    }
    match state.repository.load(&name).await {
        Ok(view) => view_response(view),
        Err(e) => {
            let mut r = ApiError::from(e).into_response();
            r.extensions_mut().insert(ModelLabel(name));
            r
        }
    }
}

/// Stops serving the model; requests in flight finish first.
#[utoipa::path(post, path = "/models/{name}/unload", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "No longer served (state unloading, then unavailable)", body = Object),
        (status = 403, description = "Model control is disabled", body = crate::error::ErrorBody),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
    ))]
pub async fn unload(State(state): State<Arc<AppState>>, ModelName(name): ModelName) -> Response {
    if !state.config.enable_model_control {
        return ApiError::ModelControlDisabled.into_response();
    }
    match state.repository.unload(&name).await {
        Ok(view) => {
            let mut r = Json(view).into_response();
            r.extensions_mut().insert(ModelLabel(name));
            r
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}
