//! The Open Inference Protocol (KServe v2, Triton's protocol): what its two front doors share.
//!
//! [`rest`] (`/v2/...` on the HTTP port) and [`grpc`] (`inference.GRPCInferenceService` on its
//! own port) only translate their wire formats into a [`Request`] and a [`Response`] back; this
//! module checks a request against the model, runs it through the model's pipeline (the same
//! admission places, queue, batching and metrics as `/predict`), and shapes the outputs.
//!
//! A model takes one input per request, either of:
//! - `input`: a preprocessed tensor, `FP32` (or `FP16`/`BF16`, converted) of shape
//!   `[N, 3, S, S]` (S the model's input size), scaled and normalised as the model expects;
//! - `image`: encoded images (JPEG, PNG, WebP, BMP, GIF), `BYTES` of shape `[N]` or `[N, 1]`,
//!   decoded and preprocessed exactly as `/predict` does them. An element made only of base64
//!   characters is base64-decoded first (JSON has no other way to carry bytes).
//!
//! and gives one output, `probabilities` (`FP32 [N, classes]`), or with the classification
//! extension (`parameters.classification = k`) the top k classes per image as `BYTES [N, k]`
//! strings `"score:index:label"`.

pub mod extensions;
pub mod grpc;
pub mod rest;
pub mod tensor;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::ApiError;
use crate::pipeline::{Classified, Pipeline};
use crate::state::AppState;
use tensor::DataType;

/// The server's name in the protocol's server metadata.
pub const SERVER_NAME: &str = "tch-serve";
/// The protocol extensions served (names as Triton reports them).
pub const EXTENSIONS: [&str; 5] = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
];
/// The preprocessed-tensor input.
pub const INPUT_TENSOR: &str = "input";
/// The encoded-images input.
pub const INPUT_IMAGES: &str = "image";
/// The only output.
pub const OUTPUT: &str = "probabilities";

/// One tensor's description in model metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct TensorMeta {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// A model's metadata, as both front doors report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelMeta {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

impl ModelMeta {
    pub fn of(pipeline: &Pipeline) -> Self {
        let s = i64::from(pipeline.meta.input_size);
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMeta {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        Self {
            name: pipeline.name.clone(),
            versions: vec![pipeline.version.to_string()],
            platform: pipeline.meta.format.platform().into(),
            inputs: vec![
                tensor(INPUT_TENSOR, "FP32", vec![-1, 3, s, s]),
                // [N, 1], as Triton reports a batching model's dims [1] (the model configuration
                // extension's); [N] is taken too.
                tensor(INPUT_IMAGES, "BYTES", vec![-1, 1]),
            ],
            outputs: vec![tensor(
                OUTPUT,
                "FP32",
                vec![-1, pipeline.labels().len() as i64],
            )],
        }
    }
}

/// The elements of an input tensor as they came off the wire.
#[derive(Debug, Clone)]
pub enum Data {
    /// Row-major little-endian elements of the datatype's size; BYTES as 4-byte
    /// little-endian lengths each followed by the element (the binary extension, and gRPC's
    /// `raw_input_contents`).
    Raw(Bytes),
    /// Numbers (JSON `data`, gRPC `fp32_contents`/`fp64_contents`).
    Numbers(Vec<f32>),
    /// BYTES elements (JSON strings, gRPC `bytes_contents`).
    Elements(Vec<Bytes>),
    /// None given.
    Missing,
}

/// One input tensor of a request.
#[derive(Debug, Clone)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// One output a request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRequest {
    pub name: String,
    /// The classification extension: the top k classes instead of the probabilities.
    pub classification: Option<usize>,
    /// The binary data extension (REST only): the elements after the JSON, not in it.
    pub binary: Option<bool>,
}

/// A request, whichever front door it came through.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub id: Option<String>,
    /// The client's own time limit (`parameters.timeout` in microseconds, gRPC's deadline).
    pub timeout: Option<Duration>,
    /// When the request arrived: its time limit runs from then (from now when not given).
    pub arrived: Option<tokio::time::Instant>,
    pub inputs: Vec<InputTensor>,
    /// Empty: every output, by default settings.
    pub outputs: Vec<OutputRequest>,
}

/// The elements of an output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    pub data: OutputData,
    /// Whether the client asked for it in binary form (REST).
    pub binary: Option<bool>,
}

impl OutputTensor {
    /// The elements in raw form: little-endian floats, or length-prefixed strings.
    pub fn raw(&self) -> Vec<u8> {
        match &self.data {
            OutputData::Fp32(v) => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
            OutputData::Bytes(v) => {
                let mut out = Vec::with_capacity(v.iter().map(|s| s.len() + 4).sum());
                for s in v {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                out
            }
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone)]
pub struct Response {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub outputs: Vec<OutputTensor>,
    /// Where the request's time went, for the statistics extension.
    pub times: crate::telemetry::RequestTimes,
}

/// What a request's input becomes: work for the pipeline.
#[derive(Debug)]
pub enum Batch {
    /// Normalised CHW tensors, one per image.
    Tensors(Vec<Vec<f32>>),
    /// Encoded image files.
    Images(Vec<Bytes>),
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Self::Tensors(t) => t.len(),
            Self::Images(i) => i.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pipeline serving version `version` of `name` (an empty or absent version: the one that
/// answers requests naming none).
pub fn resolve(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<Pipeline>, ApiError> {
    match version.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(state.repository.resolve(Some(name))?),
        Some(v) => {
            let number = v.parse::<u64>().map_err(|_| {
                ApiError::ModelNotFound(format!(
                    "model {name} has no version {:?}: versions are numbers",
                    short(v)
                ))
            })?;
            Ok(state.repository.resolve_version(name, number)?)
        }
    }
}

/// The model's metadata, with every version served.
pub fn metadata(state: &AppState, pipeline: &Pipeline) -> ModelMeta {
    let mut m = ModelMeta::of(pipeline);
    if let Some(view) = state.repository.view(&pipeline.name)
        && !view.served_versions.is_empty()
    {
        m.versions = view.served_versions.iter().map(u64::to_string).collect();
    }
    m
}

/// Checks the request's input against the model and turns it into work for the pipeline.
pub fn prepare(
    request: &Request,
    pipeline: &Pipeline,
    max_images: usize,
) -> Result<Batch, ApiError> {
    let input = match request.inputs.as_slice() {
        [one] => one,
        [] => {
            return Err(bad(format!(
                "no input: send one input, `{INPUT_TENSOR}` (FP32 [N, 3, S, S]) or `{INPUT_IMAGES}` (BYTES [N])"
            )));
        }
        more => {
            return Err(bad(format!(
                "{} inputs: send one input, `{INPUT_TENSOR}` or `{INPUT_IMAGES}`",
                more.len()
            )));
        }
    };
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        bad(format!(
            "input `{}`: unknown datatype {:?}",
            short(&input.name),
            short(&input.datatype)
        ))
    })?;
    let size = pipeline.meta.input_size as usize;
    match input.name.as_str() {
        INPUT_TENSOR => {
            if !matches!(datatype, DataType::Fp32 | DataType::Fp16 | DataType::Bf16) {
                return Err(bad(format!(
                    "input `{INPUT_TENSOR}` takes FP32, FP16 or BF16, not {}",
                    datatype.name()
                )));
            }
            let n = tensor_batch(&input.shape, size)?;
            check_count(n, max_images)?;
            let floats = tensor::floats(datatype, &input.data, n * 3 * size * size)
                .map_err(|e| bad(format!("input `{INPUT_TENSOR}`: {e}")))?;
            let per = pipeline.tensor_len();
            Ok(Batch::Tensors(
                floats.chunks_exact(per).map(<[f32]>::to_vec).collect(),
            ))
        }
        INPUT_IMAGES => {
            if datatype != DataType::Bytes {
                return Err(bad(format!(
                    "input `{INPUT_IMAGES}` takes BYTES (encoded image files), not {}",
                    datatype.name()
                )));
            }
            let n = images_batch(&input.shape)?;
            check_count(n, max_images)?;
            let elements = tensor::elements(&input.data, n)
                .map_err(|e| bad(format!("input `{INPUT_IMAGES}`: {e}")))?;
            let mut images = Vec::with_capacity(n);
            for (i, e) in elements.into_iter().enumerate() {
                let bytes = tensor::maybe_base64(e)
                    .map_err(|why| bad(format!("input `{INPUT_IMAGES}`, element {i}: {why}")))?;
                if bytes.is_empty() {
                    return Err(bad(format!("input `{INPUT_IMAGES}`, element {i} is empty")));
                }
                images.push(bytes);
            }
            Ok(Batch::Images(images))
        }
        other => Err(bad(format!(
            "model {} has no input `{}`: its inputs are `{INPUT_TENSOR}` (FP32 [N, 3, {size}, {size}]) and `{INPUT_IMAGES}` (BYTES [N])",
            pipeline.name,
            short(other)
        ))),
    }
}

fn check_count(n: usize, max_images: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(bad(
            "the batch dimension is 0: send at least one image".into()
        ));
    }
    if n > max_images {
        return Err(ApiError::TooManyImages { limit: max_images });
    }
    Ok(())
}

/// N from a tensor shape `[N, 3, size, size]`.
fn tensor_batch(shape: &[i64], size: usize) -> Result<usize, ApiError> {
    let want = format!("[N, 3, {size}, {size}]");
    match shape {
        [n, 3, h, w] if *n >= 0 && *h == size as i64 && *w == size as i64 => Ok(*n as usize),
        _ => Err(bad(format!(
            "input `{INPUT_TENSOR}` has shape {}; the model takes {want}",
            shape_str(shape)
        ))),
    }
}

/// N from an images shape `[N]` or `[N, 1]`.
fn images_batch(shape: &[i64]) -> Result<usize, ApiError> {
    match shape {
        [n] | [n, 1] if *n >= 0 => Ok(*n as usize),
        _ => Err(bad(format!(
            "input `{INPUT_IMAGES}` has shape {}; it takes [N] or [N, 1]",
            shape_str(shape)
        ))),
    }
}

fn shape_str(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().take(8).map(i64::to_string).collect();
    let more = if shape.len() > 8 { ", ..." } else { "" };
    format!("[{}{more}]", dims.join(", "))
}

/// Checks the outputs asked for; the answer says, for each output to return, its settings.
pub fn check_outputs(request: &Request, classes: usize) -> Result<Vec<OutputRequest>, ApiError> {
    if request.outputs.is_empty() {
        return Ok(vec![OutputRequest {
            name: OUTPUT.into(),
            ..Default::default()
        }]);
    }
    if request.outputs.len() > 1 {
        return Err(bad(format!(
            "{} outputs asked for; the model has one, `{OUTPUT}`",
            request.outputs.len()
        )));
    }
    let out = &request.outputs[0];
    if out.name != OUTPUT {
        return Err(bad(format!(
            "the model has no output `{}`: its output is `{OUTPUT}`",
            short(&out.name)
        )));
    }
    if out.classification == Some(0) {
        return Err(ApiError::InvalidParameter(
            "`classification` must be at least 1".into(),
        ));
    }
    let mut out = out.clone();
    out.classification = out.classification.map(|k| k.min(classes));
    Ok(vec![out])
}

/// Runs the batch through the pipeline: places for all its images at once (or a refusal), then
/// each image's work; the answers in order.
pub async fn run(pipeline: &Pipeline, batch: Batch) -> Result<Vec<Classified>, ApiError> {
    let places = pipeline.admit(batch.len())?;
    let answers = match batch {
        Batch::Tensors(tensors) => {
            let pending = places
                .into_iter()
                .zip(tensors)
                .map(|(place, t)| pipeline.submit_tensor(place, t));
            futures_util::future::try_join_all(pending).await
        }
        Batch::Images(images) => {
            let pending = places
                .into_iter()
                .zip(images)
                .map(|(place, i)| pipeline.submit(place, i));
            futures_util::future::try_join_all(pending).await
        }
    };
    Ok(answers?)
}

/// The output tensors for the answers, as asked for.
pub fn outputs(
    answers: &[Classified],
    asked: &[OutputRequest],
    labels: &[String],
) -> Vec<OutputTensor> {
    let n = answers.len() as i64;
    asked
        .iter()
        .map(|out| match out.classification {
            None => {
                let classes = answers.first().map_or(0, |a| a.probabilities.len());
                OutputTensor {
                    name: out.name.clone(),
                    datatype: "FP32",
                    shape: vec![n, classes as i64],
                    data: OutputData::Fp32(
                        answers
                            .iter()
                            .flat_map(|a| a.probabilities.iter().copied())
                            .collect(),
                    ),
                    binary: out.binary,
                }
            }
            Some(k) => {
                let mut strings = Vec::with_capacity(answers.len() * k);
                for a in answers {
                    for p in crate::doors::top_k(&a.probabilities, k, labels) {
                        strings.push(format!("{}:{}:{}", p.probability, p.index, p.label));
                    }
                }
                OutputTensor {
                    name: out.name.clone(),
                    datatype: "BYTES",
                    shape: vec![n, k as i64],
                    data: OutputData::Bytes(strings),
                    binary: out.binary,
                }
            }
        })
        .collect()
}

/// The whole request path after decoding: the model, the version, the input, the outputs, the
/// pipeline within the time budget (the server's, or the client's when shorter).
pub async fn infer(
    state: &AppState,
    pipeline: &Arc<Pipeline>,
    request: Request,
) -> Result<Response, ApiError> {
    pipeline.readiness().map_err(|reason| {
        ApiError::Unavailable(format!(
            "model {} is not available: {reason}",
            pipeline.name
        ))
    })?;
    let asked = check_outputs(&request, pipeline.labels().len())?;
    let batch = prepare(&request, pipeline, state.config.max_images_per_request)?;
    let server = state.config.request_timeout();
    let budget = request.timeout.map_or(server, |t| t.min(server));
    let deadline = request.arrived.unwrap_or_else(tokio::time::Instant::now) + budget;
    let answers = match tokio::time::timeout_at(deadline, run(pipeline, batch)).await {
        Ok(answers) => answers?,
        Err(_) => {
            return Err(ApiError::Timeout {
                ms: budget.as_millis() as u64,
            });
        }
    };
    Ok(Response {
        model_name: pipeline.name.clone(),
        model_version: pipeline.version.to_string(),
        id: request.id,
        outputs: outputs(&answers, &asked, pipeline.labels()),
        times: Classified::times(&answers),
    })
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// A client's string, shortened for an error message.
pub fn short(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::pipeline::ImageInfo;

    fn answer(p: Vec<f32>) -> Classified {
        Classified {
            probabilities: p,
            image: ImageInfo {
                width: 1,
                height: 1,
                format: "tensor",
                preprocess_time: Duration::ZERO,
            },
            queue_time: Duration::ZERO,
            inference_time: Duration::ZERO,
            batch_size: 1,
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(tensor_batch(&[2, 3, 32, 32], 32).unwrap(), 2);
        for bad in [
            vec![3, 32, 32],
            vec![1, 3, 32, 33],
            vec![1, 1, 32, 32],
            vec![-1, 3, 32, 32],
            vec![1, 3, 32, 32, 1],
        ] {
            assert!(tensor_batch(&bad, 32).is_err(), "{bad:?}");
        }
        assert_eq!(images_batch(&[4]).unwrap(), 4);
        assert_eq!(images_batch(&[4, 1]).unwrap(), 4);
        for bad in [vec![], vec![4, 2], vec![-3], vec![1, 1, 1]] {
            assert!(images_batch(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(shape_str(&[1; 20]), "[1, 1, 1, 1, 1, 1, 1, 1, ...]");
    }

    #[test]
    fn outputs_probabilities_and_classification() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let answers = [answer(vec![0.2, 0.5, 0.3]), answer(vec![0.6, 0.1, 0.3])];
        let all = outputs(
            &answers,
            &[OutputRequest {
                name: OUTPUT.into(),
                ..Default::default()
            }],
            &labels,
        );
        assert_eq!(all[0].shape, vec![2, 3]);
        assert_eq!(
            all[0].data,
            OutputData::Fp32(vec![0.2, 0.5, 0.3, 0.6, 0.1, 0.3])
        );
        assert_eq!(all[0].raw().len(), 24);
        let top = outputs(
            &answers,
            &[OutputRequest {
                name: OUTPUT.into(),
                classification: Some(2),
                binary: None,
            }],
            &labels,
        );
        assert_eq!(top[0].shape, vec![2, 2]);
        assert_eq!(
            top[0].data,
            OutputData::Bytes(vec![
                "0.5:1:b".into(),
                "0.3:2:c".into(),
                "0.6:0:a".into(),
                "0.3:2:c".into()
            ])
        );
        let raw = top[0].raw();
        assert_eq!(&raw[..4], &7u32.to_le_bytes());
        assert_eq!(&raw[4..11], b"0.5:1:b");
    }

    #[test]
    fn output_requests_are_checked() {
        let req = |outputs: Vec<OutputRequest>| Request {
            outputs,
            ..Default::default()
        };
        let asked = check_outputs(&req(vec![]), 10).unwrap();
        assert_eq!(asked[0].name, OUTPUT);
        let named = |name: &str, k: Option<usize>| OutputRequest {
            name: name.into(),
            classification: k,
            binary: None,
        };
        assert!(check_outputs(&req(vec![named("logits", None)]), 10).is_err());
        assert!(check_outputs(&req(vec![named(OUTPUT, Some(0))]), 10).is_err());
        assert_eq!(
            check_outputs(&req(vec![named(OUTPUT, Some(50))]), 10).unwrap()[0].classification,
            Some(10),
            "k is capped at the number of classes"
        );
        assert!(check_outputs(&req(vec![named(OUTPUT, None), named(OUTPUT, None)]), 10).is_err());
    }
}
