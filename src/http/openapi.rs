//! `GET /openapi.json`: the API description, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use crate::error::ErrorBody;
use crate::http::health::HealthBody;
use crate::http::predict::{ImageResult, PredictResponse, Prediction, Timings};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tch-serve",
        description = "Image classification with a TorchScript model. Every failure is JSON `{\"error\", \"code\"}`."
    ),
    paths(
        crate::http::predict::predict,
        crate::http::health::health,
        crate::http::health::live,
        crate::http::health::metrics,
    ),
    components(schemas(PredictResponse, ImageResult, Prediction, Timings, HealthBody, ErrorBody)),
    tags((name = "inference"), (name = "operations"))
)]
pub struct ApiDoc;

pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
