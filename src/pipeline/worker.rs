//! A model's worker: one OS thread that makes its thread settings, builds the model through the
//! backend, warms it up, then forms batches from the model's queue and runs them until the
//! queue closes. It owns the model, its batch policy and its warm-up; nothing calls back into
//! the layers above. Its lifecycle is published on a watch channel ([`WorkerState`]), and
//! forward-pass failures in a row are counted ([`Health`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{oneshot, watch};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::admission::Place;
use super::batch::{BatchPolicy, next_batch};
use super::{Classified, ImageInfo, PipelineError, Shared};
use crate::model::threads::{CpuBudget, configure_worker};
use crate::model::{Classifier, ModelSpec};
use crate::telemetry::ModelMetrics;

/// Forward passes failing in a row before the model reports itself unhealthy.
pub const FAILURES_BEFORE_UNHEALTHY: u32 = 3;

/// What a job holds for the model.
pub(crate) enum Input {
    /// An image's resized and cropped RGB bytes, HWC.
    Pixels(Vec<u8>),
    /// A tensor sent as such: `3 * size * size` floats, CHW, already normalised.
    Tensor(Vec<f32>),
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Self::Pixels(p) => p.len(),
            Self::Tensor(t) => t.len(),
        }
    }
}

/// One decoded image waiting for the model. Its place in the pipeline travels with it and is
/// given back when the job is dropped: after its answer is sent, or when it is skipped.
pub(crate) struct Job {
    pub input: Input,
    pub image: ImageInfo,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Classified, PipelineError>>,
    pub _place: Place,
    /// The span of the request the image came with (none: the caller had no span).
    pub span: Span,
    /// The image's wait in the queue, a child of `span`: it ends when its batch is taken.
    pub queue_span: Span,
}

/// A child span of `parent` made by `make`, or none when `parent` is none (so that work for a
/// caller without a span starts no root spans of its own).
pub(crate) fn child_span(parent: &Span, make: impl FnOnce() -> Span) -> Span {
    if parent.is_none() {
        Span::none()
    } else {
        let span = make();
        crate::telemetry::record_trace_id(&span);
        span
    }
}

/// What loading took.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub load_time: Duration,
    pub warmup_time: Duration,
    /// Where the model runs: `cpu`, `cuda:0`, ...
    pub device: String,
}

/// The worker's lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerState {
    /// Building and warming the model.
    Loading,
    /// Serving.
    Ready(LoadReport),
    /// The model could not be built or warmed; the thread has ended.
    Failed(String),
    /// The thread ended while serving, and not because its queue closed: a bug.
    Stopped(String),
    /// The queue closed and the thread ended normally.
    Closed,
}

impl WorkerState {
    /// Whether the thread has ended.
    pub fn has_exited(&self) -> bool {
        matches!(self, Self::Failed(_) | Self::Stopped(_) | Self::Closed)
    }
}

/// Forward-pass failures in a row, and the last one's message.
#[derive(Default)]
pub struct Health {
    failures_in_a_row: AtomicU32,
    last_failure: Mutex<Option<String>>,
}

impl Health {
    fn success(&self) {
        self.failures_in_a_row.store(0, Ordering::Release);
    }

    fn failure(&self, why: &str) {
        self.failures_in_a_row.fetch_add(1, Ordering::AcqRel);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
    }

    /// Why the model is unhealthy, once its last forward passes all failed.
    pub fn problem(&self) -> Option<String> {
        let n = self.failures_in_a_row.load(Ordering::Acquire);
        (n >= FAILURES_BEFORE_UNHEALTHY).then(|| {
            let last = self
                .last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            format!("its last {n} forward passes failed (last error: {last})")
        })
    }
}

/// The worker thread's niceness. It is lowered so that CPU forward passes leave the HTTP and
/// decoding threads a core at once; a GPU model's worker needs little CPU but needs it at once,
/// to feed the GPU between forward passes, so it keeps the normal priority. Measured on one
/// H200 with 16 cores (ResNet-50 fp16, 128 clients): 1730 images/s at niceness 10 against 2126
/// at 0, with the GPU idle most of the time either way, waiting for decoded images.
fn worker_niceness(configured: u8, on_cpu: bool) -> u8 {
    if on_cpu { configured } else { 0 }
}

/// Starts the worker thread of `spec`. It reads jobs from `rx` until every sender is gone.
pub(crate) fn spawn(
    spec: &ModelSpec,
    rx: Receiver<Job>,
    shared: &Shared,
    metrics: ModelMetrics,
    health: Arc<Health>,
) -> std::io::Result<watch::Receiver<WorkerState>> {
    let (state_tx, state_rx) = watch::channel(WorkerState::Loading);
    let spec = spec.clone();
    let backend = shared.backend.clone();
    let budget = shared.cpu_budget.clone();
    let inter_op = shared.inter_op_threads;
    let niceness = worker_niceness(shared.niceness, backend.runs_on_cpu(&spec.settings));
    std::thread::Builder::new()
        .name(format!("model-{}", spec.name))
        .spawn(move || {
            let s = &spec.settings;
            configure_worker(s.intra_op_threads, inter_op, niceness);
            let policy = BatchPolicy {
                max_batch_size: s.max_batch_size,
                max_batch_delay: s.max_batch_delay(),
            };
            let started = Instant::now();
            let built = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<_> {
                let mut loaded = backend.load(&spec)?;
                let load_time = started.elapsed();
                let warmup_time = warm_up(
                    loaded.classifier.as_mut(),
                    s.max_batch_size,
                    s.warmup_iterations,
                )
                .context("warming up")?;
                Ok((loaded, load_time, warmup_time))
            }));
            let (mut loaded, load_time, warmup_time) = match built {
                Ok(Ok(built)) => built,
                Ok(Err(e)) => {
                    state_tx.send_replace(WorkerState::Failed(format!("{e:#}")));
                    return;
                }
                Err(panic) => {
                    state_tx.send_replace(WorkerState::Failed(format!(
                        "loading panicked: {}",
                        panic_message(&panic)
                    )));
                    return;
                }
            };
            state_tx.send_replace(WorkerState::Ready(LoadReport {
                load_time,
                warmup_time,
                device: loaded.device.clone(),
            }));
            let budget = loaded.on_cpu.then_some(budget.as_ref());
            let served = catch_unwind(AssertUnwindSafe(|| {
                run(
                    loaded.classifier.as_mut(),
                    &rx,
                    policy,
                    &metrics,
                    &health,
                    budget,
                    &spec,
                )
            }));
            state_tx.send_replace(match served {
                Ok(()) => WorkerState::Closed,
                Err(panic) => {
                    let why = format!("the worker panicked: {}", panic_message(&panic));
                    tracing::error!(model = %spec.name, error = %why, "model worker stopped");
                    WorkerState::Stopped(why)
                }
            });
        })?;
    Ok(state_rx)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Batch sizes run during warm-up: powers of two up to the largest batch, and the largest.
pub fn warmup_batch_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..)
        .map(|i| 1usize << i)
        .take_while(|&b| b < max_batch)
        .collect();
    sizes.push(max_batch);
    sizes
}

/// Runs `iterations` forward passes per warm-up batch size on a grey input, so that the first
/// real request is as fast as the hundredth, and checks the output's size. Returns the time.
fn warm_up(
    model: &mut dyn Classifier,
    max_batch: usize,
    iterations: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    if iterations == 0 {
        return Ok(Duration::ZERO);
    }
    let per_image = model.input_size().pow(2) * 3;
    let mut sizes: Vec<usize> = warmup_batch_sizes(max_batch)
        .into_iter()
        .map(|b| model.padded_batch(b))
        .collect();
    sizes.dedup();
    for &b in &sizes {
        let input = vec![128u8; b * per_image];
        for _ in 0..iterations {
            let probs = model.forward(&input, b).context("warm-up forward pass")?;
            if probs.len() != b * model.num_classes() {
                bail!("warm-up produced {} scores for batch {b}", probs.len());
            }
        }
    }
    Ok(start.elapsed())
}

/// The serving loop: batches from the queue until it closes.
fn run(
    model: &mut dyn Classifier,
    rx: &Receiver<Job>,
    policy: BatchPolicy,
    metrics: &ModelMetrics,
    health: &Health,
    budget: Option<&CpuBudget>,
    spec: &ModelSpec,
) {
    let threads = spec.settings.intra_op_threads;
    let per_image = model.input_size().pow(2) * 3;
    let mut pixels: Vec<u8> = Vec::new();
    let mut floats: Vec<f32> = Vec::new();
    while let Some(batch) = next_batch(rx, policy.max_batch_size, policy.max_batch_delay) {
        metrics.queue_depth.sub(batch.len() as i64);
        let taken = Instant::now();
        // Jobs whose request has ended are dropped here, which gives their places back.
        let (live, gone): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .map(|mut job| {
                // The wait in the queue ends here.
                job.queue_span = Span::none();
                job
            })
            .partition(|j| !j.reply.is_closed() && j.input.len() == per_image);
        for job in gone {
            if job.reply.is_closed() {
                metrics.cancelled_images.inc();
            } else {
                let detail = format!("{} input values, expected {per_image}", job.input.len());
                let _ = job
                    .reply
                    .send(Err(PipelineError::InferenceFailed { detail }));
            }
        }
        // Decoded images and tensors sent as such run as separate forward passes.
        let (images, tensors): (Vec<Job>, Vec<Job>) = live
            .into_iter()
            .partition(|j| matches!(j.input, Input::Pixels(_)));
        for group in [images, tensors] {
            if group.is_empty() {
                continue;
            }
            let n = group.len();
            let padded = model.padded_batch(n).max(n);
            // One span per forward pass, linked to the span of every request it serves; each
            // request gets an `inference` child linked back to it.
            let forward = tracing::info_span!(
                parent: None,
                "forward_pass",
                model.name = %spec.name,
                model.version = spec.version,
                batch.size = n,
                batch.padded_size = padded,
                input = if matches!(group[0].input, Input::Pixels(_)) { "pixels" } else { "tensor" },
                otel.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            // The batch's own trace (its requests' traces are linked to it).
            crate::telemetry::record_trace_id(&forward);
            let mut linked = Vec::with_capacity(n);
            for job in &group {
                let cx = crate::telemetry::span_context(&job.span);
                // One link per request, however many of its images the batch holds.
                if cx.is_valid() && !linked.contains(&cx.span_id()) {
                    linked.push(cx.span_id());
                    forward.add_link(cx);
                }
            }
            let forward_cx = crate::telemetry::span_context(&forward);
            let inference: Vec<Span> = group
                .iter()
                .map(|job| {
                    child_span(&job.span, || {
                        let span = tracing::info_span!(
                            parent: &job.span,
                            "inference",
                            model.name = %spec.name,
                            batch.size = n,
                            trace_id = tracing::field::Empty,
                        );
                        if forward_cx.is_valid() {
                            span.add_link(forward_cx.clone());
                        }
                        span
                    })
                })
                .collect();
            let entered = forward.enter();
            let share = budget.map(|b| b.acquire(threads));
            let start = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| match &group[0].input {
                Input::Pixels(_) => {
                    pixels.clear();
                    for job in &group {
                        if let Input::Pixels(p) = &job.input {
                            pixels.extend_from_slice(p);
                        }
                    }
                    pixels.resize(padded * per_image, 0);
                    model.forward(&pixels, padded)
                }
                Input::Tensor(_) => {
                    floats.clear();
                    for job in &group {
                        if let Input::Tensor(t) = &job.input {
                            floats.extend_from_slice(t);
                        }
                    }
                    floats.resize(padded * per_image, 0.0);
                    model.forward_tensor(&floats, padded)
                }
            }))
            .unwrap_or_else(|p| {
                Err(anyhow::anyhow!(
                    "the forward pass panicked: {}",
                    panic_message(&p)
                ))
            });
            let inference_time = start.elapsed();
            drop(share);
            drop(inference);
            answer(
                group,
                result,
                model.num_classes(),
                taken,
                inference_time,
                metrics,
                health,
            );
            drop(entered);
        }
    }
}

/// Sends each job of a forward pass its answer, and counts the pass.
fn answer(
    jobs: Vec<Job>,
    result: anyhow::Result<Vec<f32>>,
    classes: usize,
    taken: Instant,
    inference_time: Duration,
    metrics: &ModelMetrics,
    health: &Health,
) {
    let n = jobs.len();
    metrics.batch_size.observe(n as f64);
    metrics
        .inference_duration
        .observe(inference_time.as_secs_f64());
    {
        let mut batches = metrics.batch_stats.lock().unwrap();
        let (count, seconds) = batches.entry(n).or_default();
        *count += 1;
        *seconds += inference_time.as_secs_f64();
    }
    let failure = match result {
        Ok(probs) if probs.len() >= n * classes => {
            health.success();
            metrics.images.inc_by(n as u64);
            if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                metrics.last_inference.set(now.as_secs_f64());
            }
            for (i, job) in jobs.into_iter().enumerate() {
                let queue_time = taken.saturating_duration_since(job.enqueued);
                metrics.queue_wait.observe(queue_time.as_secs_f64());
                // The image's work is done: its place comes back before the answer goes.
                let Job {
                    reply,
                    image,
                    _place: place,
                    span,
                    ..
                } = job;
                drop(place);
                drop(span);
                let _ = reply.send(Ok(Classified {
                    probabilities: probs[i * classes..(i + 1) * classes].to_vec(),
                    image,
                    queue_time,
                    inference_time,
                    batch_size: n,
                }));
            }
            return;
        }
        Ok(probs) => format!("the model returned {} scores for {n} images", probs.len()),
        Err(e) => format!("{e:#}"),
    };
    health.failure(&failure);
    metrics.inference_failures.inc();
    Span::current().record("otel.status_code", "error");
    tracing::error!(error = %failure, images = n, "forward pass failed");
    for Job {
        reply,
        _place: place,
        span,
        ..
    } in jobs
    {
        drop(place);
        drop(span);
        let _ = reply.send(Err(PipelineError::InferenceFailed {
            detail: failure.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cpu_workers_lower_their_priority() {
        assert_eq!(worker_niceness(10, true), 10);
        assert_eq!(worker_niceness(10, false), 0);
        assert_eq!(worker_niceness(0, true), 0);
    }

    #[test]
    fn warmup_sizes_cover_powers_of_two_and_the_max() {
        assert_eq!(warmup_batch_sizes(1), vec![1]);
        assert_eq!(warmup_batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(warmup_batch_sizes(12), vec![1, 2, 4, 8, 12]);
    }

    #[test]
    fn health_turns_bad_after_failures_in_a_row_and_recovers() {
        let h = Health::default();
        assert_eq!(h.problem(), None);
        h.failure("a");
        h.failure("b");
        assert_eq!(h.problem(), None);
        h.failure("boom");
        let p = h.problem().unwrap();
        assert!(p.contains("3") && p.contains("boom"), "{p}");
        h.success();
        assert_eq!(h.problem(), None);
    }
}
