//! The inference queue and dynamic batch formation.
//!
//! One dedicated OS thread owns the model. Handlers send it one [`Job`] per preprocessed image
//! through a bounded channel; the thread forms batches of up to `max_batch_size`, waiting at most
//! `max_batch_delay` for more once a first job is there, runs them and answers each job through
//! its own oneshot channel. Jobs whose client has gone (timeout, disconnect) are dropped before
//! the forward pass.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::model::Classifier;
use crate::telemetry::Metrics;

/// One image waiting for the model.
pub struct Job {
    /// `size * size * 3` normalised floats, HWC.
    pub input: Vec<f32>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, String>>,
}

/// The model's answer for one image.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// One probability per class.
    pub probabilities: Vec<f32>,
    pub queue_time: Duration,
    pub inference_time: Duration,
    pub batch_size: usize,
}

/// Takes the next batch: blocks for a first item, then takes whatever is already queued and
/// waits up to `delay` (from the first item's arrival at the thread) for more, stopping at `max`.
/// Returns `None` once the channel is closed and drained.
pub fn next_batch<T>(rx: &Receiver<T>, max: usize, delay: Duration) -> Option<Vec<T>> {
    let first = rx.recv().ok()?;
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    let deadline = Instant::now() + delay;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => {
                batch.push(item);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(item) => batch.push(item),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

/// Batch formation settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub queue_capacity: usize,
}

/// The sending side of the inference queue, held by the HTTP handlers.
#[derive(Clone)]
pub struct BatcherHandle {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl BatcherHandle {
    /// Queues a job without waiting; gives it back if the queue is full or closed.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job),
        }
    }
}

/// Whatever the worker needs to build its model on its own thread.
pub type ClassifierFactory = Box<dyn FnOnce() -> anyhow::Result<Box<dyn Classifier>> + Send>;

/// Runs the warm-up passes on the freshly loaded model; returns their duration.
pub type WarmUp = Box<dyn FnOnce(&mut dyn Classifier) -> anyhow::Result<Duration> + Send>;

/// Answers once the model is loaded and warmed, or why it could not be.
pub type Ready = oneshot::Receiver<anyhow::Result<LoadReport>>;

/// What the worker reports once the model is loaded and warmed.
#[derive(Debug, Clone, Copy)]
pub struct LoadReport {
    pub load_time: Duration,
    pub warmup_time: Duration,
}

/// Starts the inference thread. `init` runs first on that thread (thread settings), then the
/// factory builds the model, then `warm` warms it; the outcome arrives on the returned receiver.
pub fn spawn(
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
    init: Box<dyn FnOnce() + Send>,
    factory: ClassifierFactory,
    warm: WarmUp,
) -> std::io::Result<(BatcherHandle, Ready, JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Job>(policy.queue_capacity.max(1));
    let (ready_tx, ready_rx) = oneshot::channel();
    let worker_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            init();
            let start = Instant::now();
            let mut model = match factory() {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let load_time = start.elapsed();
            let warmup_time = match warm(model.as_mut()) {
                Ok(d) => d,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if ready_tx
                .send(Ok(LoadReport {
                    load_time,
                    warmup_time,
                }))
                .is_err()
            {
                return;
            }
            run_loop(model.as_mut(), &rx, policy, &worker_metrics);
            tracing::debug!("inference queue closed; inference thread exits");
        })?;
    Ok((BatcherHandle { tx, metrics }, ready_rx, thread))
}

fn run_loop(
    model: &mut dyn Classifier,
    rx: &Receiver<Job>,
    policy: BatchPolicy,
    metrics: &Metrics,
) {
    let classes = model.num_classes();
    while let Some(batch) = next_batch(rx, policy.max_batch_size, policy.max_batch_delay) {
        metrics.queue_depth.sub(batch.len() as i64);
        let taken = Instant::now();
        let (live, gone): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|j| !j.reply.is_closed());
        if !gone.is_empty() {
            metrics.cancelled_images.inc_by(gone.len() as u64);
        }
        if live.is_empty() {
            continue;
        }
        let n = live.len();
        let padded = model.padded_batch(n).max(n);
        let per_image = live[0].input.len();
        let mut input = Vec::with_capacity(padded * per_image);
        for job in &live {
            input.extend_from_slice(&job.input);
        }
        input.resize(padded * per_image, 0.0);
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| model.forward(&input, padded)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the forward pass panicked")));
        let inference_time = start.elapsed();
        metrics.batch_size.observe(n as f64);
        metrics
            .inference_duration
            .observe(inference_time.as_secs_f64());
        match result {
            Ok(probs) if probs.len() >= n * classes => {
                for (i, job) in live.into_iter().enumerate() {
                    let queue_time = taken.saturating_duration_since(job.enqueued);
                    metrics.queue_wait.observe(queue_time.as_secs_f64());
                    let _ = job.reply.send(Ok(JobOutput {
                        probabilities: probs[i * classes..(i + 1) * classes].to_vec(),
                        queue_time,
                        inference_time,
                        batch_size: n,
                    }));
                }
            }
            Ok(probs) => fail_all(
                live,
                &format!("model returned {} scores for {n} images", probs.len()),
            ),
            Err(e) => fail_all(live, &format!("{e:#}")),
        }
    }
}

fn fail_all(jobs: Vec<Job>, why: &str) {
    tracing::error!(error = why, images = jobs.len(), "forward pass failed");
    for job in jobs {
        let _ = job.reply.send(Err(why.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn takes_what_is_queued_up_to_max() {
        let (tx, rx) = sync_channel(16);
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![0, 1, 2, 3]));
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![4, 5, 6, 7]));
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![8, 9]));
    }

    #[test]
    fn zero_delay_does_not_wait_for_more() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        let start = Instant::now();
        let batch = next_batch(&rx, 8, Duration::ZERO).unwrap();
        assert_eq!(batch, vec![1]);
        // Nothing was waited for: the channel still has its sender, so a wait would block.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn waits_up_to_delay_for_late_arrivals() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        // The sender moves to the thread and is dropped after its send, which ends the wait.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
        });
        let batch = next_batch(&rx, 8, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(batch, vec![1, 2]);
    }

    #[test]
    fn stops_waiting_at_the_deadline() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        // The sender stays alive: only the deadline can end this batch.
        let batch = next_batch(&rx, 8, Duration::from_millis(30)).unwrap();
        assert_eq!(batch, vec![1]);
        drop(tx);
    }

    #[test]
    fn full_batch_returns_before_the_deadline() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        // max reached: no wait even though the delay is long and the sender is alive.
        assert_eq!(
            next_batch(&rx, 2, Duration::from_secs(3600)),
            Some(vec![1, 2])
        );
        drop(tx);
    }

    #[test]
    fn closed_channel_ends_after_draining() {
        let (tx, rx) = sync_channel(4);
        tx.send(7).unwrap();
        drop(tx);
        assert_eq!(next_batch(&rx, 8, Duration::from_secs(3600)), Some(vec![7]));
        assert_eq!(next_batch(&rx, 8, Duration::from_secs(3600)), None);
    }
}
