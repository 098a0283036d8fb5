//! One pipeline per model: admission, decoding, the queue and the worker that owns the model.
//!
//! The front doors ([`crate::api`]) hand a pipeline encoded images and get typed answers; they
//! know nothing of semaphores, pools or channels. For each image:
//!
//! 1. [`Pipeline::admit`] takes a [`Place`] (or refuses at once: the pipeline is full);
//! 2. [`Pipeline::submit`] moves the place and the bytes into a decode job on the shared
//!    decoding pool, which skips the work when the requester is already gone;
//! 3. the decoded pixels and the place move into the model's queue;
//! 4. the worker ([`worker`]) batches them, runs the forward pass and answers each image through
//!    its own channel; the job, and with it the place, is dropped when its work ends.
//!
//! So a request that ends early (client gone, timeout) never frees places whose work is still
//! running or queued, and abandoned work is skipped instead of computed.

pub mod admission;
pub mod batch;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::sync::{oneshot, watch};

pub use admission::Place;
use admission::Places;
use tracing::Span;
use worker::{Health, Input, Job, child_span};
pub use worker::{LoadReport, WorkerState};

use crate::config::ModelSettings;
use crate::metadata::ModelMetadata;
use crate::model::threads::CpuBudget;
use crate::model::{Backend, ModelSpec};
use crate::preprocess::{ExifOrientation, JpegScaledDecode, PreprocessError, Preprocessor};
use crate::telemetry::{Metrics, ModelMetrics, RequestTimes};

/// What every pipeline shares: the decoding pool and its memory budget, the CPU budget, the
/// backend, the metrics.
pub struct Shared {
    pub backend: Arc<dyn Backend>,
    pub pool: Arc<rayon::ThreadPool>,
    pub decode_budget: Arc<DecodeBudget>,
    pub cpu_budget: Arc<CpuBudget>,
    pub metrics: Arc<Metrics>,
    pub max_image_pixels: u64,
    pub exif: ExifOrientation,
    pub jpeg_scaling: JpegScaledDecode,
    pub inter_op_threads: usize,
    pub niceness: u8,
}

/// The memory that the images being decoded may take at once, in bytes, estimated from each
/// image's header before its decoding starts (see [`crate::preprocess::Probe`]). An image waits
/// for its share; one larger than the whole budget is refused.
pub struct DecodeBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
    in_use: IntGauge,
}

/// Memory taken from the decode budget; given back when dropped.
pub struct DecodeShare {
    _permit: tokio::sync::OwnedSemaphorePermit,
    kib: u32,
    in_use: IntGauge,
}

impl DecodeBudget {
    /// `in_use` follows the bytes taken (`tch_serve_decode_memory_bytes`).
    pub fn new(bytes: u64, in_use: IntGauge) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX >> 3);
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
            in_use,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    /// Waits for `bytes` of the budget; `None` when they exceed the whole budget.
    async fn take(&self, bytes: u64) -> Option<DecodeShare> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        if kib > self.total_kib {
            return None;
        }
        let permit = self.kib.clone().acquire_many_owned(kib).await.ok()?;
        self.in_use.add(i64::from(kib) * 1024);
        Some(DecodeShare {
            _permit: permit,
            kib,
            in_use: self.in_use.clone(),
        })
    }
}

impl Drop for DecodeShare {
    fn drop(&mut self) {
        self.in_use.sub(i64::from(self.kib) * 1024);
    }
}

impl Shared {
    /// The decoding pool: `threads` threads whose jobs never take the process down.
    pub fn decode_pool(threads: usize) -> std::io::Result<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("decode-{i}"))
            // A panic in a job must never abort the process (rayon's default).
            .panic_handler(|_| tracing::error!("a decoding job panicked"))
            .build()
            .map_err(std::io::Error::other)
    }
}

/// Why an image got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    #[error("model {model} is at capacity ({capacity} images admitted); retry shortly")]
    Overloaded { model: String, capacity: usize },
    #[error("model {model} is not available: {reason}")]
    Unavailable { model: String, reason: String },
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// Details are for the log, not for the client.
    #[error("the forward pass failed")]
    InferenceFailed { detail: String },
    /// An input tensor of another shape than the model takes: the caller's mistake.
    #[error("{0}")]
    WrongTensor(String),
}

/// What decoding found out about an image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    /// Detected from the content: jpeg, png, webp, bmp or gif.
    pub format: &'static str,
    pub preprocess_time: Duration,
}

/// The answer for one image.
#[derive(Debug, Clone)]
pub struct Classified {
    /// One probability per label.
    pub probabilities: Vec<f32>,
    pub image: ImageInfo,
    pub queue_time: Duration,
    pub inference_time: Duration,
    /// Images in the forward pass that served this one.
    pub batch_size: usize,
}

impl Classified {
    /// Where the time of a request answered with `answers` went.
    pub fn times(answers: &[Classified]) -> RequestTimes {
        RequestTimes {
            queue: answers
                .iter()
                .map(|a| a.queue_time)
                .max()
                .unwrap_or_default(),
            compute_input: answers.iter().map(|a| a.image.preprocess_time).sum(),
            compute_infer: answers
                .iter()
                .map(|a| a.inference_time)
                .max()
                .unwrap_or_default(),
        }
    }
}

/// The sending side of the model's queue. Closing it lets the worker finish what is queued and
/// end.
struct Queue {
    model: String,
    tx: Mutex<Option<SyncSender<Job>>>,
    depth: IntGauge,
    state: watch::Receiver<WorkerState>,
}

impl Queue {
    /// Queues a job without waiting; gives it back if the queue is closed (or, which the places
    /// rule out, full).
    // The job comes back to its sender to be answered, not as an error to propagate.
    #[allow(clippy::result_large_err)]
    fn push(&self, job: Job) -> Result<(), Job> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            return Err(job);
        };
        // Counted before the send, so that the worker's decrement never comes first.
        self.depth.inc();
        tx.try_send(job).map_err(|e| {
            self.depth.dec();
            match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            }
        })
    }

    fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// One version of one model being served.
pub struct Pipeline {
    pub name: String,
    pub version: u64,
    pub meta: Arc<ModelMetadata>,
    pub settings: ModelSettings,
    preprocessor: Arc<Preprocessor>,
    places: Places,
    queue: Arc<Queue>,
    metrics: ModelMetrics,
    pool: Arc<rayon::ThreadPool>,
    decode_budget: Arc<DecodeBudget>,
    state: watch::Receiver<WorkerState>,
    health: Arc<Health>,
}

impl Pipeline {
    /// Starts the model's worker, which loads and warms it; see [`Pipeline::wait_loaded`].
    pub fn start(spec: ModelSpec, shared: &Shared) -> std::io::Result<Self> {
        let metrics = shared.metrics.model(&spec.name);
        let capacity = spec.settings.queue_capacity.max(1);
        metrics.queue_capacity.set(capacity as i64);
        let (tx, rx) = sync_channel(capacity);
        let health = Arc::new(Health::default());
        let state = worker::spawn(&spec, rx, shared, metrics.clone(), health.clone())?;
        Ok(Self {
            preprocessor: Arc::new(
                Preprocessor::for_model(&spec.meta, shared.max_image_pixels)
                    .with_exif(shared.exif)
                    .with_jpeg_scaling(shared.jpeg_scaling),
            ),
            places: Places::new(capacity, metrics.inflight_images.clone()),
            queue: Arc::new(Queue {
                model: spec.name.clone(),
                tx: Mutex::new(Some(tx)),
                depth: metrics.queue_depth.clone(),
                state: state.clone(),
            }),
            pool: shared.pool.clone(),
            decode_budget: shared.decode_budget.clone(),
            name: spec.name,
            version: spec.version,
            meta: Arc::new(spec.meta),
            settings: spec.settings,
            metrics,
            state,
            health,
        })
    }

    pub fn state(&self) -> WorkerState {
        self.state.borrow().clone()
    }

    /// Waits until the worker has loaded and warmed the model (or failed to).
    pub async fn wait_loaded(&self) -> Result<LoadReport, String> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, WorkerState::Loading))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| WorkerState::Stopped("the worker ended".into()));
        match state {
            WorkerState::Ready(report) => Ok(report),
            WorkerState::Failed(why) | WorkerState::Stopped(why) => Err(why),
            WorkerState::Closed => Err("closed".into()),
            WorkerState::Loading => unreachable!("waited for another state"),
        }
    }

    /// Waits until the worker thread has ended.
    pub async fn wait_exited(&self) {
        let _ = self.exit_watch().wait_for(WorkerState::has_exited).await;
    }

    /// The worker's state, to watch for its end without holding the pipeline (the last holder
    /// of a pipeline closes its queue).
    pub fn exit_watch(&self) -> watch::Receiver<WorkerState> {
        self.state.clone()
    }

    /// `Ok` when the model can take images now; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        match &*self.state.borrow() {
            WorkerState::Ready(_) => self.health.problem().map_or(Ok(()), Err),
            WorkerState::Loading => Err("the model is still loading".into()),
            WorkerState::Failed(why) => Err(format!("the model failed to load: {why}")),
            WorkerState::Stopped(why) => Err(format!("its worker stopped: {why}")),
            WorkerState::Closed => Err("the model is being unloaded".into()),
        }
    }

    /// Whether the worker has stopped while serving (a bug: nothing but a reload or a restart
    /// brings the model back).
    pub fn has_stopped(&self) -> bool {
        matches!(&*self.state.borrow(), WorkerState::Stopped(_))
    }

    /// Places for `n` images, all or none, at once.
    pub fn admit(&self, n: usize) -> Result<Vec<Place>, PipelineError> {
        if let Err(reason) = self.readiness() {
            return Err(PipelineError::Unavailable {
                model: self.name.clone(),
                reason,
            });
        }
        self.places
            .try_take(n)
            .ok_or_else(|| PipelineError::Overloaded {
                model: self.name.clone(),
                capacity: self.places.capacity(),
            })
    }

    /// Places taken now.
    pub fn places_in_use(&self) -> usize {
        self.places.in_use()
    }

    pub fn capacity(&self) -> usize {
        self.places.capacity()
    }

    /// Decodes one image on the decoding pool and queues it for the model. The answer comes
    /// through the returned future; dropping that future abandons the work (it is skipped if it
    /// has not started, and its place comes back when whatever is running ends).
    ///
    /// Before decoding, the image's header is read (format, dimensions, limits) and its share of
    /// the decode memory budget is waited for, so that the images being decoded at once never
    /// take more memory than the budget, whatever they are.
    pub fn submit(&self, place: Place, bytes: Bytes) -> Pending {
        let (reply, answer) = oneshot::channel();
        let preprocessor = self.preprocessor.clone();
        let queue = self.queue.clone();
        let metrics = self.metrics.clone();
        let pool = self.pool.clone();
        let budget = self.decode_budget.clone();
        let model = self.name.clone();
        // The request's span, for the image's spans on the decoding pool and the worker.
        let span = Span::current();
        let work = async move {
            let probe = preprocessor.probe(&bytes)?;
            // A large JPEG under scaled decoding takes what the scale needs; should the scaled
            // decode decline it after all, the job comes back here for the full decode's share.
            let mut job = DecodeJob {
                place,
                bytes,
                reply,
                span,
                scaled: probe.scaled_decode_bytes.is_some(),
            };
            loop {
                let needed = match probe.scaled_decode_bytes {
                    Some(b) if job.scaled => b,
                    _ => probe.decode_bytes,
                };
                let Some(share) = budget.take(needed).await else {
                    return Err(PipelineError::Preprocess(PreprocessError::OverBudget {
                        width: probe.width,
                        height: probe.height,
                        needed,
                        budget: budget.total_bytes(),
                    }));
                };
                let (back, returned) = oneshot::channel();
                let (preprocessor, queue, metrics) =
                    (preprocessor.clone(), queue.clone(), metrics.clone());
                pool.spawn(move || {
                    if let Some(job) = decode_and_queue(job, share, &preprocessor, &queue, &metrics)
                    {
                        let _ = back.send(job);
                    }
                });
                match returned.await {
                    Ok(declined) => {
                        job = DecodeJob {
                            scaled: false,
                            ..declined
                        }
                    }
                    Err(_) => break,
                }
            }
            answer.await.unwrap_or_else(|_| {
                Err(PipelineError::Unavailable {
                    model,
                    reason: "its worker stopped".into(),
                })
            })
        };
        Pending {
            work: Box::pin(work),
        }
    }

    /// Floats per input tensor: `3 * input_size * input_size`.
    pub fn tensor_len(&self) -> usize {
        3 * (self.meta.input_size as usize).pow(2)
    }

    /// Queues one input tensor as the model takes it (`[3, input_size, input_size]` floats, CHW,
    /// normalised with the model's mean and std), skipping decoding. A tensor of the wrong size
    /// is refused at once.
    pub fn submit_tensor(&self, place: Place, tensor: Vec<f32>) -> Pending {
        let (reply, answer) = oneshot::channel();
        let model = self.name.clone();
        let pending = Pending {
            work: Box::pin(async move {
                answer.await.unwrap_or_else(|_| {
                    Err(PipelineError::Unavailable {
                        model,
                        reason: "its worker stopped".into(),
                    })
                })
            }),
        };
        if tensor.len() != self.tensor_len() {
            let size = self.meta.input_size;
            let _ = reply.send(Err(PipelineError::WrongTensor(format!(
                "an input tensor of {} floats; model {} takes [3, {size}, {size}] ({} floats)",
                tensor.len(),
                self.name,
                self.tensor_len()
            ))));
            return pending;
        }
        let size = self.meta.input_size;
        let span = Span::current();
        let job = Job {
            queue_span: child_span(
                &span,
                || tracing::info_span!(parent: &span, "queue", trace_id = tracing::field::Empty),
            ),
            span,
            input: Input::Tensor(tensor),
            image: ImageInfo {
                width: size,
                height: size,
                format: "tensor",
                preprocess_time: Duration::ZERO,
            },
            enqueued: Instant::now(),
            reply,
            _place: place,
        };
        if let Err(job) = self.queue.push(job) {
            let _ = job.reply.send(Err(PipelineError::Unavailable {
                model: self.name.clone(),
                reason: "the model is being unloaded".into(),
            }));
        }
        pending
    }

    /// Closes the queue: the worker finishes what is queued (skipping what nobody waits for
    /// any more) and ends. Images submitted afterwards get `Unavailable`.
    pub fn close(&self) {
        self.queue.close();
    }

    pub fn labels(&self) -> &[String] {
        &self.meta.labels
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.close();
    }
}

/// The answer for one submitted image.
pub struct Pending {
    work: Pin<Box<dyn Future<Output = Result<Classified, PipelineError>> + Send>>,
}

impl Future for Pending {
    type Output = Result<Classified, PipelineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.work.as_mut().poll(cx)
    }
}

/// The decoding pool's job for one image: skipped if nobody waits for it any more; otherwise
/// decoded, then queued for the model with its place. The decode budget's share is given back
/// once the decoded image is gone (the crop is small).
struct DecodeJob {
    place: Place,
    bytes: Bytes,
    reply: oneshot::Sender<Result<Classified, PipelineError>>,
    /// The request's span.
    span: Span,
    /// Whether to try the scaled decode (with the budget share it needs) rather than the full.
    scaled: bool,
}

/// Decodes the job's image holding `share` of the decode budget, and queues it for the model
/// or answers its error. Gives the job back when the scaled decode declined the image: it then
/// needs the full decode's share.
fn decode_and_queue(
    job: DecodeJob,
    share: DecodeShare,
    preprocessor: &Preprocessor,
    queue: &Queue,
    metrics: &ModelMetrics,
) -> Option<DecodeJob> {
    if job.reply.is_closed() {
        metrics.cancelled_images.inc();
        return None;
    }
    let span = &job.span;
    let preprocess = child_span(span, || {
        tracing::info_span!(
            parent: span,
            "preprocess",
            image.bytes = job.bytes.len(),
            image.format = tracing::field::Empty,
            image.width = tracing::field::Empty,
            image.height = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    });
    let started = Instant::now();
    let decoded = preprocess.in_scope(|| {
        if job.scaled {
            preprocessor.run_scaled_only(&job.bytes).transpose()
        } else {
            Some(preprocessor.run_full(&job.bytes))
        }
    });
    let Some(decoded) = decoded else {
        // Declined by the scaled decode: the caller takes the full decode's share first.
        return Some(job);
    };
    let DecodeJob {
        place,
        bytes,
        reply,
        span,
        ..
    } = job;
    drop(bytes);
    drop(share);
    let preprocess_time = started.elapsed();
    if let Ok(d) = &decoded {
        preprocess.record("image.format", d.format);
        preprocess.record("image.width", d.width);
        preprocess.record("image.height", d.height);
    }
    drop(preprocess);
    metrics
        .preprocess_duration
        .observe(preprocess_time.as_secs_f64());
    let decoded = match decoded {
        Ok(d) => d,
        Err(e) => {
            let _ = reply.send(Err(e.into()));
            return None;
        }
    };
    if reply.is_closed() {
        metrics.cancelled_images.inc();
        return None;
    }
    let job = Job {
        input: Input::Pixels(decoded.pixels),
        image: ImageInfo {
            width: decoded.width,
            height: decoded.height,
            format: decoded.format,
            preprocess_time,
        },
        enqueued: Instant::now(),
        reply,
        _place: place,
        queue_span: child_span(
            &span,
            || tracing::info_span!(parent: &span, "queue", trace_id = tracing::field::Empty),
        ),
        span,
    };
    if let Err(job) = queue.push(job) {
        let reason = match &*queue.state.borrow() {
            WorkerState::Stopped(why) => format!("its worker stopped: {why}"),
            _ => "the model is being unloaded".into(),
        };
        let _ = job.reply.send(Err(PipelineError::Unavailable {
            model: queue.model.clone(),
            reason,
        }));
    }
    None
}
