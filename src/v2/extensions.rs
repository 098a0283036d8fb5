//! Triton's model repository, model configuration and statistics extensions, as both front
//! doors serve them: the repository's index, loading and unloading (behind
//! `--enable-model-control`, as `/models/{name}/load` is), a model's configuration in the terms
//! of Triton's `config.pbtxt`, and its cumulative statistics, read from the server's metrics.
//! [`super::rest`] and [`super::grpc`] only put these into their wire forms.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{INPUT_IMAGES, INPUT_TENSOR, OUTPUT};
use crate::error::ApiError;
use crate::pipeline::Pipeline;
use crate::repository::ModelState;
use crate::state::AppState;

/// One entry of the repository index: one version of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    /// READY, LOADING, UNLOADING or UNAVAILABLE, as Triton names them.
    pub state: String,
    pub reason: String,
}

/// Every version of every model the repository holds, in Triton's states; with `ready_only`,
/// only those ready for inference.
pub fn index(state: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for model in state.repository.views() {
        for v in &model.versions {
            let (triton, reason) = match v.state {
                "ready" if model.served_versions.contains(&v.version) => ("READY", String::new()),
                "ready" => (
                    "UNAVAILABLE",
                    model.reason.clone().unwrap_or_else(|| "not ready".into()),
                ),
                "loading" => ("LOADING", String::new()),
                "unloaded" if model.state == ModelState::Unloading => ("UNLOADING", String::new()),
                "unloaded" => ("UNAVAILABLE", "unloaded".into()),
                "failed" => ("UNAVAILABLE", v.reason.clone().unwrap_or_default()),
                _ => ("UNAVAILABLE", "not loaded".into()),
            };
            if ready_only && triton != "READY" {
                continue;
            }
            out.push(IndexEntry {
                name: model.name.clone(),
                version: v.version.to_string(),
                state: triton.into(),
                reason,
            });
        }
    }
    out
}

/// The parameters a load may carry. Triton's `config` (a configuration to load the model with)
/// and `file:...` (model files sent in the request) are refused: the repository's folder is
/// where models and their settings come from.
pub fn check_load_parameters<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
    for name in names {
        if name == "config" || name.starts_with("file:") {
            return Err(ApiError::InvalidParameter(format!(
                "load parameter `{}` is not supported: models and their settings (config.json) come from the model repository's folder",
                super::short(name)
            )));
        }
    }
    Ok(())
}

/// Loads (or reloads) the model from the repository, once model control is enabled.
pub async fn load(state: &AppState, name: &str) -> Result<(), ApiError> {
    if !state.config.enable_model_control {
        return Err(ApiError::ModelControlDisabled);
    }
    state
        .repository
        .load(name)
        .await
        .map(drop)
        .map_err(ApiError::from)
}

/// Stops serving the model, once model control is enabled; requests in flight finish first.
pub async fn unload(state: &AppState, name: &str) -> Result<(), ApiError> {
    if !state.config.enable_model_control {
        return Err(ApiError::ModelControlDisabled);
    }
    state
        .repository
        .unload(name)
        .await
        .map(drop)
        .map_err(ApiError::from)
}

/// A tensor of a model's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TensorConfig {
    pub name: String,
    /// TYPE_FP32, TYPE_STRING, ...
    pub data_type: String,
    /// Without the batch dimension (the model batches: `max_batch_size` > 0).
    pub dims: Vec<i64>,
    /// FORMAT_NCHW for the preprocessed tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// An input a request may leave out: each request gives one of the two inputs.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// A model's configuration, as Triton's `config.pbtxt` would give it: what `perf_analyzer` and
/// `get_model_config` read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ModelConfig {
    pub name: String,
    pub platform: String,
    pub backend: String,
    /// The version being served.
    pub version_policy: VersionPolicy,
    pub max_batch_size: usize,
    pub input: Vec<TensorConfig>,
    pub output: Vec<TensorConfig>,
    pub dynamic_batching: DynamicBatching,
    /// One instance, on the model's device.
    pub instance_group: Vec<InstanceGroup>,
    /// The server's own settings of the model: precision, queue capacity.
    pub parameters: BTreeMap<String, Parameter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VersionPolicy {
    pub specific: SpecificVersions,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SpecificVersions {
    pub versions: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DynamicBatching {
    /// How long the batcher waits to fill a batch (`max_batch_delay_ms`).
    pub max_queue_delay_microseconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InstanceGroup {
    pub name: String,
    /// KIND_CPU or KIND_GPU.
    pub kind: String,
    pub count: i32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Parameter {
    pub string_value: String,
}

/// The configuration of the pipeline serving a model, on `device` (`cpu`, `cuda:N`), with the
/// versions served.
pub fn config(pipeline: &Pipeline, device: &str, served: &[u64]) -> ModelConfig {
    let s = &pipeline.settings;
    let size = i64::from(pipeline.meta.input_size);
    let tensor = |name: &str, data_type: &str, dims: Vec<i64>, format: Option<&str>| TensorConfig {
        name: name.into(),
        data_type: data_type.into(),
        dims,
        format: format.map(str::to_owned),
        optional: false,
    };
    let optional = |t: TensorConfig| TensorConfig {
        optional: true,
        ..t
    };
    let (kind, gpus) = match device.strip_prefix("cuda") {
        Some(index) => (
            "KIND_GPU",
            vec![index.trim_start_matches(':').parse().unwrap_or(0)],
        ),
        None => ("KIND_CPU", Vec::new()),
    };
    let parameter = |v: String| Parameter { string_value: v };
    ModelConfig {
        name: pipeline.name.clone(),
        platform: pipeline.meta.format.platform().into(),
        backend: "pytorch".into(),
        version_policy: VersionPolicy {
            specific: SpecificVersions {
                versions: served.to_vec(),
            },
        },
        max_batch_size: s.max_batch_size,
        input: vec![
            optional(tensor(
                INPUT_TENSOR,
                "TYPE_FP32",
                vec![3, size, size],
                Some("FORMAT_NCHW"),
            )),
            optional(tensor(INPUT_IMAGES, "TYPE_STRING", vec![1], None)),
        ],
        output: vec![tensor(
            OUTPUT,
            "TYPE_FP32",
            vec![pipeline.labels().len() as i64],
            None,
        )],
        dynamic_batching: DynamicBatching {
            max_queue_delay_microseconds: s.max_batch_delay_ms * 1000,
        },
        instance_group: vec![InstanceGroup {
            name: format!("{}_0", pipeline.name),
            kind: kind.into(),
            count: 1,
            gpus,
        }],
        parameters: BTreeMap::from([
            (
                "precision".to_owned(),
                parameter(format!("{:?}", s.precision).to_lowercase()),
            ),
            (
                "queue_capacity".to_owned(),
                parameter(pipeline.capacity().to_string()),
            ),
        ]),
    }
}

/// The configuration of the model (and version) being served.
pub fn model_config(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<ModelConfig, ApiError> {
    let pipeline = super::resolve(state, name, version)?;
    let device = match pipeline.state() {
        crate::pipeline::WorkerState::Ready(r) => r.device,
        _ => pipeline.settings.device.clone(),
    };
    let served = state
        .repository
        .view(&pipeline.name)
        .map(|v| v.served_versions)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![pipeline.version]);
    Ok(config(&pipeline, &device, &served))
}

/// A count and a total time in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Duration {
    pub count: u64,
    pub ns: u64,
}

impl Duration {
    fn of(count: u64, seconds: f64) -> Self {
        Self {
            count,
            ns: (seconds.max(0.0) * 1e9) as u64,
        }
    }
}

/// The cumulative times of a model's requests, as Triton counts them: each answered request
/// once in `success`, `queue` and each `compute_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InferStats {
    /// Requests answered, from their arrival to their answer.
    pub success: Duration,
    /// Requests refused or failed after they reached the model.
    pub fail: Duration,
    /// The longest any of a request's images waited in the model's queue.
    pub queue: Duration,
    /// Decoding and preprocessing of a request's images.
    pub compute_input: Duration,
    /// The longest forward pass among a request's images'.
    pub compute_infer: Duration,
    /// Outputs are shaped inside the forward pass's time: no time of their own.
    pub compute_output: Duration,
    pub cache_hit: Duration,
    pub cache_miss: Duration,
}

/// Forward passes of one batch size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BatchStats {
    pub batch_size: u64,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

/// One model's statistics since the server started (all its versions together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ModelStats {
    pub name: String,
    pub version: String,
    /// When the last image was answered, in milliseconds since the epoch (0: never).
    pub last_inference: u64,
    /// Images answered.
    pub inference_count: u64,
    /// Forward passes run.
    pub execution_count: u64,
    pub inference_stats: InferStats,
    pub batch_stats: Vec<BatchStats>,
}

/// The statistics of `name` (every served model when empty), and only of the version asked
/// for, if one is.
pub fn statistics(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Vec<ModelStats>, ApiError> {
    let pipelines = if name.is_empty() {
        state
            .repository
            .names()
            .iter()
            .filter_map(|n| state.repository.resolve(Some(n)).ok())
            .collect()
    } else {
        vec![super::resolve(state, name, version)?]
    };
    Ok(pipelines
        .iter()
        .map(|p| model_stats(state, &p.name, p.version))
        .collect())
}

fn model_stats(state: &AppState, name: &str, version: u64) -> ModelStats {
    let m = state.metrics.model(name);
    let r = state.metrics.request_stats(name);
    // Per batch size only the forward pass is timed; the input and output counts match it, as
    // clients (perf_analyzer) expect, with no time of their own.
    let batches = m
        .batch_stats
        .lock()
        .unwrap()
        .iter()
        .map(|(&size, &(count, seconds))| BatchStats {
            batch_size: size as u64,
            compute_input: Duration::of(count, 0.0),
            compute_infer: Duration::of(count, seconds),
            compute_output: Duration::of(count, 0.0),
        })
        .collect();
    let (success, fail) = state.metrics.inference_requests(name);
    let answered = success.get_sample_count();
    let of = |count: u64, d: std::time::Duration| Duration::of(count, d.as_secs_f64());
    ModelStats {
        name: name.to_owned(),
        version: version.to_string(),
        last_inference: (m.last_inference.get() * 1e3) as u64,
        inference_count: m.images.get(),
        execution_count: m.inference_duration.get_sample_count(),
        inference_stats: InferStats {
            success: Duration::of(answered, success.get_sample_sum()),
            fail: Duration::of(fail.get_sample_count(), fail.get_sample_sum()),
            queue: of(answered, r.queue),
            compute_input: of(answered, r.compute_input),
            compute_infer: of(answered, r.compute_infer),
            compute_output: of(answered, std::time::Duration::ZERO),
            ..Default::default()
        },
        batch_stats: batches,
    }
}
