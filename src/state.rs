//! What the front doors share: the configuration, the model repository, the metrics, the
//! upload budget, the API keys, and whether the server is shutting down. Below both doors
//! ([`crate::api`], [`crate::v2`]) and the assembly that builds it ([`crate::server`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::auth::ApiKeys;
use crate::config::ServeConfig;
use crate::repository::{ModelState, Repository};
use crate::telemetry::Metrics;
use crate::upload::UploadBudget;

/// What the front doors share.
pub struct AppState {
    pub config: ServeConfig,
    pub repository: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    /// The memory of request bodies being received, and their deadlines.
    pub uploads: UploadBudget,
    /// The API keys (none: every route is open), re-read as `--api-key-file` changes.
    pub auth: Arc<ApiKeys>,
}

/// Whether the server takes traffic, as `/health` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// A model that should be loaded is still loading.
    Starting(Vec<String>),
    /// A model that should be served is not: failed, stopped, failing.
    Unhealthy(Vec<String>),
    ShuttingDown,
}

impl AppState {
    pub fn new(
        config: ServeConfig,
        repository: Arc<Repository>,
        metrics: Arc<Metrics>,
        uploads: UploadBudget,
        auth: Arc<ApiKeys>,
    ) -> Self {
        Self {
            config,
            repository,
            metrics,
            shutting_down: AtomicBool::new(false),
            uploads,
            auth,
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.metrics.ready.set(0);
    }

    pub fn readiness(&self) -> Readiness {
        let r = if self.is_shutting_down() {
            Readiness::ShuttingDown
        } else {
            match self.repository.readiness() {
                Ok(()) => Readiness::Ready,
                Err(problems) => {
                    let loading = problems.iter().all(|p| p.state == ModelState::Loading);
                    let problems = problems.iter().map(ToString::to_string).collect();
                    if loading {
                        Readiness::Starting(problems)
                    } else {
                        Readiness::Unhealthy(problems)
                    }
                }
            }
        };
        self.metrics
            .ready
            .set(i64::from(matches!(r, Readiness::Ready)));
        r
    }
}
