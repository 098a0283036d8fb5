//! What the handlers share: settings, model description, the queue, the admission semaphore,
//! the preprocessing pool, the metrics and the readiness state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batcher::BatcherHandle;
use crate::config::{Precision, ServeConfig};
use crate::error::ApiError;
use crate::preprocess::Preprocessor;
use crate::telemetry::Metrics;

/// Lifecycle as /health reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    ShuttingDown = 2,
}

/// The model as clients see it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub device: String,
    pub precision: Precision,
    pub trained: bool,
    pub weights: Option<String>,
    pub labels: Arc<Vec<String>>,
}

pub struct AppState {
    pub config: ServeConfig,
    pub model: ModelInfo,
    pub preprocessor: Arc<Preprocessor>,
    pub batcher: BatcherHandle,
    pub metrics: Arc<Metrics>,
    pub pool: rayon::ThreadPool,
    admission: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
    phase: AtomicU8,
}

impl AppState {
    pub fn new(
        config: ServeConfig,
        model: ModelInfo,
        preprocessor: Arc<Preprocessor>,
        batcher: BatcherHandle,
        metrics: Arc<Metrics>,
        preprocess_threads: usize,
    ) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(preprocess_threads.max(1))
            .thread_name(|i| format!("preprocess-{i}"))
            // A panic in a job must never abort the process (rayon's default).
            .panic_handler(|_| tracing::error!("a preprocessing job panicked"))
            .build()
            .map_err(std::io::Error::other)?;
        metrics.queue_capacity.set(config.queue_capacity as i64);
        Ok(Self {
            admission: Arc::new(Semaphore::new(config.queue_capacity)),
            uploads: Arc::new(Semaphore::new(config.max_pending_uploads)),
            config,
            model,
            preprocessor,
            batcher,
            metrics,
            pool,
            phase: AtomicU8::new(Phase::Starting as u8),
        })
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Ready,
            2 => Phase::ShuttingDown,
            _ => Phase::Starting,
        }
    }

    pub fn set_ready(&self) {
        // Never resurrect a server that is already shutting down.
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.metrics
            .ready
            .set(i64::from(self.phase() == Phase::Ready));
    }

    pub fn begin_shutdown(&self) {
        self.phase
            .store(Phase::ShuttingDown as u8, Ordering::Release);
        self.metrics.ready.set(0);
    }

    /// A place to receive one request body, or a refusal at once: bounds upload memory.
    pub fn begin_upload(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                capacity: self.config.queue_capacity,
            })
    }

    /// Admits `images` images or refuses at once: the bounded queue of the whole pipeline.
    pub fn admit(&self, images: usize) -> Result<Admission, ApiError> {
        match self.admission.clone().try_acquire_many_owned(images as u32) {
            Ok(permit) => {
                self.metrics.inflight_images.add(images as i64);
                Ok(Admission {
                    _permit: permit,
                    images,
                    metrics: self.metrics.clone(),
                })
            }
            Err(_) => Err(ApiError::Overloaded {
                capacity: self.config.queue_capacity,
            }),
        }
    }
}

/// Held while a request's images are in the pipeline; dropping it frees their places.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    images: usize,
    metrics: Arc<Metrics>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.metrics.inflight_images.sub(self.images as i64);
    }
}
