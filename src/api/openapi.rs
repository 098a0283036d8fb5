//! The description of the `/predict` door, generated from the handlers' annotations (the
//! server adds the v2 door's and serves it at `GET /openapi.json`).

use utoipa::OpenApi;

use crate::api::health::HealthBody;
use crate::api::models::ModelList;
use crate::api::predict::{ImageResult, PredictResponse, Timings};
use crate::doors::Prediction;
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
