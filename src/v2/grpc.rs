//! The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (the protocol's
//! `grpc_predict_v2.proto`, in proto/) and the standard `grpc.health.v1.Health` service (for
//! Kubernetes' gRPC probes: SERVING while the server is ready), served with tonic on their own
//! port (`--grpc-port`).
//!
//! Errors are gRPC statuses: INVALID_ARGUMENT (a malformed request or one over the limits),
//! NOT_FOUND (model or version), UNAVAILABLE (not ready), RESOURCE_EXHAUSTED (at capacity, with
//! `retry-after` metadata), DEADLINE_EXCEEDED (the request's time limit: the server's, the
//! client's deadline or `parameters.timeout`), INTERNAL. Requests are counted in the same
//! metrics as HTTP's, by method path, with the HTTP status the same outcome gets over REST.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_health::ServingStatus;

use super::{Data, InputTensor, OutputRequest};
use crate::error::ApiError;
use crate::server::{AppState, Readiness};
use crate::telemetry::Metrics;

/// The code generated from proto/grpc_predict_v2.proto.
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::infer_parameter::ParameterChoice;
use proto::*;

/// The service's full name, as health checks name it.
pub const SERVICE: &str = "inference.GRPCInferenceService";

/// The gRPC front door.
pub struct Service {
    state: Arc<AppState>,
}

impl Service {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The tonic service, with the server's message size limit.
    pub fn server(state: Arc<AppState>) -> GrpcInferenceServiceServer<Self> {
        let max = state.config.max_body_bytes;
        GrpcInferenceServiceServer::new(Self::new(state))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }
}

/// Serves gRPC on `listener` until `stop_accepting` is cancelled, then lets the calls in flight
/// finish (the caller bounds that wait). The health service turns NOT_SERVING as soon as
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    stop_accepting: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, &state).await;
    tokio::spawn(watch_health(reporter, state.clone(), shutdown));
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(Service::server(state))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop_accepting.cancelled_owned(),
        )
        .await
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, state: &AppState) {
    let status = if state.readiness() == Readiness::Ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE, status).await;
}

/// Follows the server's readiness into the health service until shutdown.
async fn watch_health(
    reporter: tonic_health::server::HealthReporter,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => set_health(&reporter, &state).await,
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
}

/// The gRPC status for an error, with `retry-after` where a retry is invited.
pub fn status(e: &ApiError) -> Status {
    let code = match e.code() {
        "model_not_found" | "not_found" => Code::NotFound,
        "unavailable" => Code::Unavailable,
        "overloaded" => Code::ResourceExhausted,
        "timeout" => Code::DeadlineExceeded,
        "model_control_disabled" => Code::PermissionDenied,
        "unauthorized" => Code::Unauthenticated,
        "internal" | "model_load_failed" => Code::Internal,
        "method_not_allowed" => Code::Unimplemented,
        _ => Code::InvalidArgument,
    };
    let mut s = Status::new(code, e.to_string());
    if let Some(secs) = e.retry_after()
        && let Ok(v) = secs.to_string().parse()
    {
        s.metadata_mut().insert("retry-after", v);
    }
    s
}

/// One call's record in the metrics (counted as 499 if dropped unanswered: the client left).
struct Record {
    metrics: Arc<Metrics>,
    route: &'static str,
    start: Instant,
    done: bool,
}

impl Record {
    fn new(state: &AppState, method: &'static str) -> Self {
        Self {
            metrics: state.metrics.clone(),
            route: method,
            start: Instant::now(),
            done: false,
        }
    }

    fn finish<T>(mut self, model: &str, result: Result<T, ApiError>) -> Result<T, Status> {
        self.done = true;
        let (http, code) = match &result {
            Ok(_) => ("200".to_owned(), None),
            Err(e) => (e.status().as_str().to_owned(), Some(e.code())),
        };
        self.count(&http);
        if let Some(code) = code {
            self.metrics
                .rejections
                .with_label_values(&[model, code])
                .inc();
            tracing::debug!(route = self.route, code, "gRPC request refused");
        }
        result.map_err(|e| status(&e))
    }

    fn count(&self, status: &str) {
        let m = &self.metrics;
        m.requests
            .with_label_values(&[self.route, "POST", status])
            .inc();
        let secs = self.start.elapsed().as_secs_f64();
        m.request_duration
            .with_label_values(&[self.route])
            .observe(secs);
        m.request_processing
            .with_label_values(&[self.route])
            .observe(secs);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            self.count("499");
        }
    }
}

const LIVE: &str = "/inference.GRPCInferenceService/ServerLive";
const READY: &str = "/inference.GRPCInferenceService/ServerReady";
const MODEL_READY: &str = "/inference.GRPCInferenceService/ModelReady";
const SERVER_METADATA: &str = "/inference.GRPCInferenceService/ServerMetadata";
const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

type Reply<T> = Result<tonic::Response<T>, Status>;

/// The API key check of every method but the probes (ServerLive, ServerReady), as over HTTP:
/// `authorization: Bearer <key>` metadata (what tritonclient's `headers=` sends).
fn authorize<T>(state: &AppState, request: &tonic::Request<T>) -> Result<(), ApiError> {
    let authorization = request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes());
    state
        .auth
        .verify(authorization)
        .map_err(ApiError::Unauthorized)
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(&self, _: tonic::Request<ServerLiveRequest>) -> Reply<ServerLiveResponse> {
        let record = Record::new(&self.state, LIVE);
        let live = self.state.repository.stopped_workers().is_empty();
        record
            .finish("", Ok(ServerLiveResponse { live }))
            .map(tonic::Response::new)
    }

    async fn server_ready(
        &self,
        _: tonic::Request<ServerReadyRequest>,
    ) -> Reply<ServerReadyResponse> {
        let record = Record::new(&self.state, READY);
        let ready = self.state.readiness() == Readiness::Ready;
        record
            .finish("", Ok(ServerReadyResponse { ready }))
            .map(tonic::Response::new)
    }

    async fn model_ready(
        &self,
        request: tonic::Request<ModelReadyRequest>,
    ) -> Reply<ModelReadyResponse> {
        let record = Record::new(&self.state, MODEL_READY);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = match super::resolve(&self.state, &r.name, Some(&r.version)) {
            Ok(p) => Ok((p.name.clone(), p.readiness().is_ok())),
            // As Triton: an unknown model or version is not ready, rather than an error.
            Err(ApiError::Unavailable(_) | ApiError::ModelNotFound(_)) => {
                Ok((String::new(), false))
            }
            Err(e) => Err(e),
        };
        let model = result.as_ref().map_or("", |(m, _)| m.as_str()).to_owned();
        record
            .finish(
                &model,
                result.map(|(_, ready)| ModelReadyResponse { ready }),
            )
            .map(tonic::Response::new)
    }

    async fn server_metadata(
        &self,
        request: tonic::Request<ServerMetadataRequest>,
    ) -> Reply<ServerMetadataResponse> {
        let record = Record::new(&self.state, SERVER_METADATA);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let m = super::rest::ServerMetadata::get();
        record
            .finish(
                "",
                Ok(ServerMetadataResponse {
                    name: m.name,
                    version: m.version,
                    extensions: m.extensions,
                }),
            )
            .map(tonic::Response::new)
    }

    async fn model_metadata(
        &self,
        request: tonic::Request<ModelMetadataRequest>,
    ) -> Reply<ModelMetadataResponse> {
        let record = Record::new(&self.state, MODEL_METADATA);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = super::resolve(&self.state, &r.name, Some(&r.version)).map(|p| {
            let m = super::ModelMeta::of(&p);
            let tensors = |v: Vec<super::TensorMeta>| {
                v.into_iter()
                    .map(|t| model_metadata_response::TensorMetadata {
                        name: t.name,
                        datatype: t.datatype,
                        shape: t.shape,
                    })
                    .collect()
            };
            ModelMetadataResponse {
                name: m.name,
                versions: m.versions,
                platform: m.platform,
                inputs: tensors(m.inputs),
                outputs: tensors(m.outputs),
            }
        });
        let model = result.as_ref().map_or(String::new(), |m| m.name.clone());
        record.finish(&model, result).map(tonic::Response::new)
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Reply<ModelInferResponse> {
        let record = Record::new(&self.state, MODEL_INFER);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let r = request.into_inner();
        let pipeline = match super::resolve(&self.state, &r.model_name, Some(&r.model_version)) {
            Ok(p) => p,
            Err(e) => return record.finish("", Err(e)),
        };
        let result = async {
            let mut request = decode(r)?;
            request.timeout = match (request.timeout, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            super::infer(&self.state, &pipeline, request).await
        }
        .await
        .map(encode);
        record
            .finish(&pipeline.name, result)
            .map(tonic::Response::new)
    }
}

/// The protocol-neutral request from a gRPC one.
pub fn decode(r: ModelInferRequest) -> Result<super::Request, ApiError> {
    let raw = r.raw_input_contents;
    if !raw.is_empty() && raw.len() != r.inputs.len() {
        return Err(ApiError::BadRequest(format!(
            "{} raw_input_contents for {} inputs: give one per input, in order",
            raw.len(),
            r.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for input in r.inputs {
        let data = match (raw.next(), input.contents) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` has both contents and raw_input_contents",
                    super::short(&input.name)
                )));
            }
            (Some(bytes), None) => Data::Raw(Bytes::from(bytes)),
            (None, Some(c)) => match input.datatype.as_str() {
                "BYTES" => Data::Elements(c.bytes_contents.into_iter().map(Bytes::from).collect()),
                "FP32" => Data::Numbers(c.fp32_contents),
                "FP64" => Data::Numbers(c.fp64_contents.into_iter().map(|f| f as f32).collect()),
                _ => Data::Missing,
            },
            (None, None) => Data::Missing,
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for out in r.outputs {
        let k = int_param(&out.parameters, "classification")?;
        outputs.push(OutputRequest {
            name: out.name,
            classification: k.map(|k| k.min(u32::MAX as u64) as usize),
            binary: None,
        });
    }
    let timeout = int_param(&r.parameters, "timeout")?;
    if timeout == Some(0) {
        return Err(ApiError::InvalidParameter(
            "parameter `timeout` (microseconds) must be positive".into(),
        ));
    }
    Ok(super::Request {
        id: (!r.id.is_empty()).then_some(r.id),
        timeout: timeout.map(Duration::from_micros),
        inputs,
        outputs,
    })
}

fn int_param(
    params: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<u64>, ApiError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(Some(*v as u64)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v)),
        Some(other) => Err(ApiError::InvalidParameter(format!(
            "parameter `{key}` must be a non-negative integer, got {other:?}"
        ))),
    }
}

/// The gRPC response: every output in `raw_output_contents`.
pub fn encode(response: super::Response) -> ModelInferResponse {
    let mut raw = Vec::with_capacity(response.outputs.len());
    let outputs = response
        .outputs
        .into_iter()
        .map(|o| {
            raw.push(o.raw());
            model_infer_response::InferOutputTensor {
                name: o.name,
                datatype: o.datatype.into(),
                shape: o.shape,
                parameters: Default::default(),
                contents: None,
            }
        })
        .collect();
    ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id.unwrap_or_default(),
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}

/// A `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "m", "10", "10x", "123456789m", "-1m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn statuses() {
        let cases = [
            (ApiError::BadRequest("x".into()), Code::InvalidArgument),
            (ApiError::ModelNotFound("x".into()), Code::NotFound),
            (ApiError::Unavailable("x".into()), Code::Unavailable),
            (ApiError::Overloaded("x".into()), Code::ResourceExhausted),
            (ApiError::Timeout { ms: 1 }, Code::DeadlineExceeded),
            (ApiError::Internal, Code::Internal),
            (ApiError::TooManyImages { limit: 1 }, Code::InvalidArgument),
        ];
        for (e, code) in cases {
            assert_eq!(status(&e).code(), code, "{e:?}");
        }
        assert_eq!(
            status(&ApiError::Overloaded("x".into()))
                .metadata()
                .get("retry-after")
                .unwrap(),
            "1"
        );
    }

    #[test]
    fn raw_and_typed_contents() {
        let input = |contents| model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            parameters: Default::default(),
            contents,
        };
        let typed = ModelInferRequest {
            inputs: vec![input(Some(InferTensorContents {
                bytes_contents: vec![b"abc".to_vec()],
                ..Default::default()
            }))],
            id: "x".into(),
            ..Default::default()
        };
        let d = decode(typed).unwrap();
        assert_eq!(d.id.as_deref(), Some("x"));
        assert!(matches!(&d.inputs[0].data, Data::Elements(e) if e[0] == "abc"));
        let both = ModelInferRequest {
            inputs: vec![input(Some(Default::default()))],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        assert!(decode(both).is_err());
        let miscounted = ModelInferRequest {
            inputs: vec![input(None)],
            raw_input_contents: vec![vec![], vec![]],
            ..Default::default()
        };
        assert!(decode(miscounted).is_err());
        let mut params = std::collections::HashMap::new();
        params.insert(
            "timeout".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("soon".into())),
            },
        );
        let bad = ModelInferRequest {
            parameters: params,
            ..Default::default()
        };
        assert!(decode(bad).is_err());
    }
}
