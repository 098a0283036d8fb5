//! The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (the protocol's
//! `grpc_predict_v2.proto`, in proto/) and the standard `grpc.health.v1.Health` service (for
//! Kubernetes' gRPC probes: SERVING while the server is ready), on their own port
//! (`--grpc-port`), accepted by [`crate::listener`] with the same connection discipline
//! as the HTTP door (cap and eviction, header and idle timeouts, HTTP/2 limits).
//!
//! Every call passes through [`call`], as every HTTP request passes through the HTTP door's
//! layers: a `request` span (the child of the caller's `traceparent`), the caller's
//! `grpc-timeout` from the moment the call arrived (past it the call is dropped, and with it
//! its images' places, and answered DEADLINE_EXCEEDED), the server's request timeout from the
//! same moment (so that it covers the message's upload, as on `/predict`), and the request body
//! drawn from the upload budget as its bytes arrive, under the upload deadlines, and held to
//! `--max-body-bytes` from its length prefix on (RESOURCE_EXHAUSTED, as gRPC's own servers
//! answer a message over their limit). Messages may come gzip or deflate compressed
//! (`grpc-encoding`, tritonclient's `compression_algorithm`), held to the same limit once
//! decompressed.
//!
//! Errors are gRPC statuses: INVALID_ARGUMENT (a malformed request or one over the limits),
//! NOT_FOUND (model or version), UNAVAILABLE (not ready), RESOURCE_EXHAUSTED (at capacity, with
//! `retry-after` metadata, or a message too large), DEADLINE_EXCEEDED (the request's time
//! limit: the server's, the client's deadline or `parameters.timeout`; or an upload too slow),
//! INTERNAL. Requests are counted in the same metrics as HTTP's, by method path, with the HTTP
//! status the same outcome gets over REST.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_health::ServingStatus;
use tracing::Instrument;

use super::{Data, InputTensor, OutputRequest, extensions};
use crate::error::ApiError;
use crate::state::{AppState, Readiness};
use crate::telemetry::Metrics;
use crate::upload::Receiving;

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

    /// The tonic service. The message size is held to `--max-body-bytes` by [`call`] already;
    /// tonic's own limit (OUT_OF_RANGE) is a backstop for what decompression would make.
    pub fn server(state: Arc<AppState>) -> GrpcInferenceServiceServer<Self> {
        let max = state.config.max_body_bytes;
        GrpcInferenceServiceServer::new(Self::new(state))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
    }
}

/// The gRPC door's service: the health and inference services behind [`call`], for
/// [`crate::listener::accept`]. The health service follows the server's readiness and
/// turns NOT_SERVING as soon as `shutdown` is cancelled.
pub async fn door(state: Arc<AppState>, shutdown: CancellationToken) -> axum::Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, &state).await;
    tokio::spawn(watch_health(reporter, state.clone(), shutdown));
    tonic::service::Routes::new(health)
        .add_service(Service::server(state.clone()))
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(state, call))
}

/// When a call arrived, and its deadline (from `grpc-timeout`), for the methods.
#[derive(Debug, Clone, Copy)]
pub struct CallTiming {
    pub arrived: tokio::time::Instant,
    pub deadline: Option<tokio::time::Instant>,
}

/// A gRPC status as a trailers-only response.
fn status_response(status: &Status) -> Response {
    status.clone().into_http::<axum::body::Body>()
}

/// The span of one call: named after its method, with the OpenTelemetry RPC attributes.
fn call_span(request: &Request) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "request",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %super::short(service),
        rpc.method = %super::short(method),
        rpc.grpc.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(&span, request.headers());
    if let Some(trace_id) = crate::telemetry::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    span
}

/// What every call goes through (see the module's notes).
pub async fn call(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let arrived = tokio::time::Instant::now();
    let span = call_span(&request);
    let deadline = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| arrived + t);
    // The message arrives within the server's request timeout too, as a body on /predict does.
    let upload_deadline = Some(
        deadline.map_or(arrived + state.config.request_timeout(), |d| {
            d.min(arrived + state.config.request_timeout())
        }),
    );
    let work = async move {
        let (request, receiving) = match state.uploads.receive(request, upload_deadline) {
            Ok(r) => r,
            Err(e) => return status_response(&status(&e)),
        };
        let max = state.config.max_body_bytes;
        let mut request =
            request.map(|body| axum::body::Body::new(MessageBody::new(body, receiving, max)));
        request
            .extensions_mut()
            .insert(CallTiming { arrived, deadline });
        let mut response = match deadline {
            Some(at) => match tokio::time::timeout_at(at, next.run(request)).await {
                Ok(r) => r,
                Err(_) => status_response(&Status::deadline_exceeded(
                    "the call's deadline (grpc-timeout) passed before it was answered",
                )),
            },
            None => next.run(request).await,
        };
        let span = tracing::Span::current();
        if let Some(code) = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            span.record("rpc.grpc.status_code", code);
            if matches!(
                Code::from_i32(code),
                Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented
            ) {
                span.record("otel.status_code", "error");
            }
        }
        if let Some(id) = crate::telemetry::trace_id(&span)
            && let Ok(v) = axum::http::HeaderValue::from_str(&id)
        {
            response.headers_mut().insert(crate::doors::TRACE_ID, v);
        }
        response
    };
    work.instrument(span).await
}

/// A call's request body: metered by the upload budget (the body [`UploadBudget::receive`]
/// gave), held to the message size limit from the 5-byte length prefix on, its errors as gRPC
/// statuses that tonic answers the call with.
///
/// [`UploadBudget::receive`]: crate::upload::UploadBudget::receive
struct MessageBody {
    inner: axum::body::Body,
    receiving: Receiving,
    max: usize,
    prefix: [u8; 5],
    prefix_len: usize,
    received: usize,
}

impl MessageBody {
    fn new(inner: axum::body::Body, receiving: Receiving, max: usize) -> Self {
        Self {
            inner,
            receiving,
            max,
            prefix: [0; 5],
            prefix_len: 0,
            received: 0,
        }
    }

    fn too_large(&self, bytes: u64) -> axum::BoxError {
        Box::new(Status::resource_exhausted(format!(
            "the request message is {bytes} bytes; the limit is {} bytes (--max-body-bytes)",
            self.max
        )))
    }

    /// Counts `data`; an error once the message is known to be too large.
    fn check(&mut self, data: &[u8]) -> Result<(), axum::BoxError> {
        self.received += data.len();
        if self.prefix_len < 5 {
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            if self.prefix_len == 5 {
                let declared = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                if declared as usize > self.max {
                    return Err(self.too_large(u64::from(declared)));
                }
            }
        }
        if self.received > self.max.saturating_add(5) {
            return Err(self.too_large(self.received as u64 - 5));
        }
        Ok(())
    }
}

impl HttpBody for MessageBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = self.check(data)
                {
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let why = self
                    .receiving
                    .explain(ApiError::BadRequest(format!("reading the call: {e}")));
                Poll::Ready(Some(Err(Box::new(status(&why)))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
        "timeout" | "request_timeout" => Code::DeadlineExceeded,
        "payload_too_large" => Code::ResourceExhausted,
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
const MODEL_CONFIG: &str = "/inference.GRPCInferenceService/ModelConfig";
const MODEL_STATISTICS: &str = "/inference.GRPCInferenceService/ModelStatistics";
const REPOSITORY_INDEX: &str = "/inference.GRPCInferenceService/RepositoryIndex";
const REPOSITORY_LOAD: &str = "/inference.GRPCInferenceService/RepositoryModelLoad";
const REPOSITORY_UNLOAD: &str = "/inference.GRPCInferenceService/RepositoryModelUnload";

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
            let m = super::metadata(&self.state, &p);
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

    async fn model_config(
        &self,
        request: tonic::Request<ModelConfigRequest>,
    ) -> Reply<ModelConfigResponse> {
        let record = Record::new(&self.state, MODEL_CONFIG);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = extensions::model_config(&self.state, &r.name, Some(&r.version));
        let model = result.as_ref().map_or(String::new(), |c| c.name.clone());
        let result = result.map(|c| ModelConfigResponse {
            config: Some(config_message(c)),
        });
        record.finish(&model, result).map(tonic::Response::new)
    }

    async fn model_statistics(
        &self,
        request: tonic::Request<ModelStatisticsRequest>,
    ) -> Reply<ModelStatisticsResponse> {
        let record = Record::new(&self.state, MODEL_STATISTICS);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = extensions::statistics(&self.state, &r.name, Some(&r.version)).map(|all| {
            ModelStatisticsResponse {
                model_stats: all.into_iter().map(statistics_message).collect(),
            }
        });
        record.finish(&r.name, result).map(tonic::Response::new)
    }

    async fn repository_index(
        &self,
        request: tonic::Request<RepositoryIndexRequest>,
    ) -> Reply<RepositoryIndexResponse> {
        let record = Record::new(&self.state, REPOSITORY_INDEX);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let ready = request.into_inner().ready;
        let models = extensions::index(&self.state, ready)
            .into_iter()
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state,
                reason: e.reason,
            })
            .collect();
        record
            .finish("", Ok(RepositoryIndexResponse { models }))
            .map(tonic::Response::new)
    }

    async fn repository_model_load(
        &self,
        request: tonic::Request<RepositoryModelLoadRequest>,
    ) -> Reply<RepositoryModelLoadResponse> {
        let record = Record::new(&self.state, REPOSITORY_LOAD);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = async {
            extensions::check_load_parameters(r.parameters.keys().map(String::as_str))?;
            extensions::load(&self.state, &r.model_name).await
        }
        .await;
        record
            .finish(
                &r.model_name,
                result.map(|()| RepositoryModelLoadResponse {}),
            )
            .map(tonic::Response::new)
    }

    async fn repository_model_unload(
        &self,
        request: tonic::Request<RepositoryModelUnloadRequest>,
    ) -> Reply<RepositoryModelUnloadResponse> {
        let record = Record::new(&self.state, REPOSITORY_UNLOAD);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        let r = request.into_inner();
        let result = extensions::unload(&self.state, &r.model_name).await;
        record
            .finish(
                &r.model_name,
                result.map(|()| RepositoryModelUnloadResponse {}),
            )
            .map(tonic::Response::new)
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Reply<ModelInferResponse> {
        let record = Record::new(&self.state, MODEL_INFER);
        if let Err(e) = authorize(&self.state, &request) {
            return record.finish("", Err(e));
        }
        // The caller's deadline and the server's time limit, both from the call's arrival.
        let timing = request.extensions().get::<CallTiming>().copied();
        let deadline =
            timing.and_then(|t| t.deadline.map(|d| d.saturating_duration_since(t.arrived)));
        let r = request.into_inner();
        let pipeline = match super::resolve(&self.state, &r.model_name, Some(&r.model_version)) {
            Ok(p) => p,
            Err(e) => return record.finish("", Err(e)),
        };
        let result = async {
            let mut request = decode(r)?;
            request.arrived = timing.map(|t| t.arrived);
            request.timeout = match (request.timeout, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            super::infer(&self.state, &pipeline, request).await
        }
        .await;
        let took = timing.map_or(Duration::ZERO, |t| t.arrived.elapsed());
        let answered = result.as_ref().ok().map(|r| r.times);
        self.state
            .metrics
            .record_inference(&pipeline.name, answered, took);
        let result = result.map(encode);
        record
            .finish(&pipeline.name, result)
            .map(tonic::Response::new)
    }
}

/// A model's configuration as the protocol's message.
fn config_message(c: extensions::ModelConfig) -> ModelConfig {
    let data_type = |t: &str| DataType::from_str_name(t).unwrap_or(DataType::TypeInvalid) as i32;
    ModelConfig {
        name: c.name,
        platform: c.platform,
        backend: c.backend,
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(model_version_policy::PolicyChoice::Specific(
                model_version_policy::Specific {
                    versions: c
                        .version_policy
                        .specific
                        .versions
                        .iter()
                        .map(|&v| v as i64)
                        .collect(),
                },
            )),
        }),
        max_batch_size: c.max_batch_size.min(i32::MAX as usize) as i32,
        input: c
            .input
            .into_iter()
            .map(|t| ModelInput {
                name: t.name,
                data_type: data_type(&t.data_type),
                format: t
                    .format
                    .as_deref()
                    .and_then(model_input::Format::from_str_name)
                    .map_or(0, |f| f as i32),
                dims: t.dims,
                optional: t.optional,
            })
            .collect(),
        output: c
            .output
            .into_iter()
            .map(|t| ModelOutput {
                name: t.name,
                data_type: data_type(&t.data_type),
                dims: t.dims,
                label_filename: String::new(),
            })
            .collect(),
        instance_group: c
            .instance_group
            .into_iter()
            .map(|g| ModelInstanceGroup {
                name: g.name,
                count: g.count,
                gpus: g.gpus,
                kind: model_instance_group::Kind::from_str_name(&g.kind).map_or(0, |k| k as i32),
            })
            .collect(),
        dynamic_batching: Some(ModelDynamicBatching {
            preferred_batch_size: Vec::new(),
            max_queue_delay_microseconds: c.dynamic_batching.max_queue_delay_microseconds,
        }),
        parameters: c
            .parameters
            .into_iter()
            .map(|(k, p)| {
                (
                    k,
                    ModelParameter {
                        string_value: p.string_value,
                    },
                )
            })
            .collect(),
    }
}

/// A model's statistics as the protocol's message.
fn statistics_message(s: extensions::ModelStats) -> ModelStatistics {
    let d = |d: extensions::Duration| {
        Some(StatisticDuration {
            count: d.count,
            ns: d.ns,
        })
    };
    let i = s.inference_stats;
    ModelStatistics {
        name: s.name,
        version: s.version,
        last_inference: s.last_inference,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: d(i.success),
            fail: d(i.fail),
            queue: d(i.queue),
            compute_input: d(i.compute_input),
            compute_infer: d(i.compute_infer),
            compute_output: d(i.compute_output),
            cache_hit: d(i.cache_hit),
            cache_miss: d(i.cache_miss),
        }),
        batch_stats: s
            .batch_stats
            .into_iter()
            .map(|b| InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: d(b.compute_input),
                compute_infer: d(b.compute_infer),
                compute_output: d(b.compute_output),
            })
            .collect(),
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
        arrived: None,
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
