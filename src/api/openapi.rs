//! `GET /openapi.json`: the API description, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use crate::api::health::HealthBody;
use crate::api::models::ModelList;
use crate::api::predict::{ImageResult, PredictResponse, Prediction, Timings};
use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tch-serve",
        description = "Image classification with TorchScript models. Every failure is JSON `{\"error\", \"code\"}`."
    ),
    paths(
        crate::api::predict::predict,
        crate::api::predict::predict_named,
        crate::api::models::list,
        crate::api::models::get,
        crate::api::models::load,
        crate::api::models::unload,
        crate::api::health::health,
        crate::api::health::live,
        crate::api::health::metrics,
    ),
    components(schemas(PredictResponse, ImageResult, Prediction, Timings, HealthBody, ModelList, ErrorBody)),
    tags((name = "inference"), (name = "models"), (name = "operations"))
)]
pub struct ApiDoc;

pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::v2::rest::with_v2(ApiDoc::openapi()))
}
