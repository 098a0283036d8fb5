//! Models by name and version: discovery in the repository folder, loading, reloading and
//! unloading while serving.
//!
//! A repository is a folder; each subfolder is a model named after it, holding `model.pt` and
//! `metadata.json` directly (version 1) or in numbered version folders (`resnet18/1/`,
//! `resnet18/2/`); the highest version is served unless `--model-version NAME=V` or the model's
//! `config.json` (`"version"`) pins one. A `"version_policy"` in that `config.json` (Triton's:
//! `latest`, `all`, `specific`) serves several versions at once: the pinned or highest one
//! answers requests that name no version, each of the others its own `/versions/{v}`.
//! `--model-dir` serves one model folder instead.
//!
//! A (re)load builds a new [`Pipeline`] beside the one being served, which goes on serving
//! until the new one is loaded and warm; then the new one is swapped in. Requests in flight hold
//! the pipeline they started on and finish on it; the old worker ends once the last of them is
//! done. A version that fails to load is reported and never replaces a working one; the poller
//! tries it again when its files change, or after a backoff (30 s, doubling to 15 min), never
//! on every poll.
//!
//! Each model's state is written only by the holder of its slot's operation lock (a load, an
//! unload, the end of an unload), and the disk is read outside every lock: a scan runs on the
//! blocking pool before the slots are looked at, so a slow volume delays the poll, not
//! `/health`. What is on disk is read by [`discovery`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

mod discovery;

pub use discovery::valid_model_name;
use discovery::{Fingerprint, Found, read_overrides, scan};

use crate::config::{ModelSettings, ModelSource, ServeConfig};
use crate::metadata::{ModelFormat, ModelMetadata};
use crate::model::ModelSpec;
use crate::pipeline::{Pipeline, Shared, WorkerState};

/// What went wrong, for the front doors to translate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    #[error("no model named {name:?}; available: {}", list(available))]
    NotFound {
        name: String,
        available: Vec<String>,
    },
    #[error(
        "several models are served and none is the default: name one with ?model=NAME or /models/NAME/predict (available: {})",
        list(available)
    )]
    NoDefault { available: Vec<String> },
    #[error("model {model} is not available: {reason}")]
    Unavailable { model: String, reason: String },
    #[error("model {model} could not be loaded: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error(
        "model {model} has no version {version} being served (served: {}; a version_policy in the model's config.json serves several)",
        list(&served.iter().map(u64::to_string).collect::<Vec<_>>())
    )]
    VersionNotServed {
        model: String,
        version: u64,
        served: Vec<u64>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A model's state, as `/models` and `tch_serve_model_state` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Loading,
    Ready,
    Failed,
    Unloading,
    /// Not served: unloaded, or its worker stopped, or its forward passes keep failing.
    Unavailable,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Unloading => "unloading",
            Self::Unavailable => "unavailable",
        }
    }
}

/// A model that should be served and is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub model: String,
    pub state: ModelState,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.model.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.model, self.reason)
        }
    }
}

/// One version of a model as the repository knows it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    pub version: u64,
    /// `available` (on disk, not loaded), `loading`, `ready` (being served), `failed`,
    /// `unloaded` (was served, replaced or unloaded).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A model as `/models` describes it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    pub name: String,
    pub state: ModelState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version being served (to requests that name none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Every version served and ready (more than one under a `version_policy`).
    pub served_versions: Vec<u64>,
    pub versions: Vec<VersionStatus>,
    pub default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// How the served version is stored: `torchscript` or `aoti` (an AOTInductor package).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<ModelFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantized: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight_images: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<f64>,
}

/// One model's slot: the pipeline being served and what is known of its versions.
struct Slot {
    serving: RwLock<Option<Arc<Pipeline>>>,
    /// The other versions served under a `version_policy`.
    others: RwLock<BTreeMap<u64, Arc<Pipeline>>>,
    status: Mutex<SlotStatus>,
    /// One load or unload of this model at a time.
    op: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct SlotStatus {
    /// Whether the model should be loaded (counts for readiness).
    wanted: bool,
    loading: Option<u64>,
    unloading: bool,
    /// The last load's failure, while nothing is served.
    failure: Option<String>,
    versions: BTreeMap<u64, VersionStatus>,
    /// Files of the version being served, to notice a change in place.
    fingerprint: Option<Fingerprint>,
    /// The last failed load, until a load succeeds: when and on what to try again.
    retry: Option<Retry>,
    /// The files of each other version as its last load (done or failed) found them: one
    /// that failed is tried again when they change.
    others_files: BTreeMap<u64, Fingerprint>,
}

/// A version that failed to load: the poller tries it again once its files differ from these,
/// or at `at`.
#[derive(Debug)]
struct Retry {
    version: u64,
    files: Fingerprint,
    attempts: u32,
    at: Instant,
}

/// How long the poller waits before it tries a failed version again (with unchanged files):
/// 30 s after the first failure, doubling with each one after, at most 15 minutes.
pub fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(5);
    (Duration::from_secs(30) * (1 << doublings)).min(Duration::from_secs(15 * 60))
}

impl Slot {
    /// The model's state, and why when it is not ready.
    fn state(&self) -> (ModelState, Option<String>) {
        let s = self.status.lock().unwrap();
        let serving = self.serving.read().unwrap().clone();
        state_of(serving.as_deref(), &s)
    }
}

fn state_of(serving: Option<&Pipeline>, s: &SlotStatus) -> (ModelState, Option<String>) {
    match serving {
        Some(p) => match p.readiness() {
            Ok(()) => (ModelState::Ready, None),
            Err(_) if matches!(p.state(), WorkerState::Loading) => (ModelState::Loading, None),
            Err(why) => (ModelState::Unavailable, Some(why)),
        },
        None if s.loading.is_some() => (ModelState::Loading, None),
        None if s.unloading => (ModelState::Unloading, None),
        None if s.failure.is_some() => (ModelState::Failed, s.failure.clone()),
        None if s.wanted => (ModelState::Loading, None),
        None => (ModelState::Unavailable, None),
    }
}

/// Every model being served, by name.
pub struct Repository {
    source: ModelSource,
    defaults: ModelSettings,
    pins: HashMap<String, u64>,
    configured_default: Option<String>,
    max_images_per_request: usize,
    request_timeout_ms: u64,
    shared: Shared,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
}

impl Repository {
    pub fn new(config: &ServeConfig, shared: Shared) -> Self {
        let source = config.model_source();
        // One model is its own default, whatever a repository's default would be.
        let configured_default = match source {
            ModelSource::Repository(_) => config.default_model.clone(),
            ModelSource::Single(_) => None,
        };
        Self {
            source,
            defaults: config.model_defaults(),
            pins: config.model_versions.iter().cloned().collect(),
            configured_default,
            max_images_per_request: config.max_images_per_request,
            request_timeout_ms: config.request_timeout_ms,
            shared,
            slots: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Finds the models and checks the default model's name; loading is left to
    /// [`Repository::load`]. Returns the names found, each wanted from here on (the server
    /// loads them all): readiness waits for them from the start, not from when each load
    /// begins.
    pub fn discover_all(&self) -> anyhow::Result<Vec<String>> {
        let found = self.discover().map_err(anyhow::Error::msg)?;
        let names: Vec<String> = found.keys().cloned().collect();
        if let Some(d) = &self.configured_default
            && !found.contains_key(d)
        {
            anyhow::bail!(
                "--default-model {d:?} is not in the model repository (found: {})",
                list(&names)
            );
        }
        for (name, f) in &found {
            let slot = self.slot_or_new(name);
            let mut s = slot.status.lock().unwrap();
            s.wanted = true;
            s.versions = f
                .versions
                .keys()
                .map(|&v| (v, version_status(v, "available", None)))
                .collect();
        }
        Ok(names)
    }

    fn discover(&self) -> Result<BTreeMap<String, Found>, String> {
        scan(&self.source, &self.pins)
    }

    /// [`Repository::discover`] on the blocking pool: the disk is never read in a task, nor
    /// under a lock.
    async fn scan(&self) -> Result<BTreeMap<String, Found>, String> {
        let (source, pins) = (self.source.clone(), self.pins.clone());
        tokio::task::spawn_blocking(move || scan(&source, &pins))
            .await
            .map_err(|e| format!("scanning the model repository: {e}"))?
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots.read().unwrap().get(name).cloned()
    }

    fn slot_or_new(&self, name: &str) -> Arc<Slot> {
        self.slots
            .write()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    serving: RwLock::new(None),
                    others: RwLock::new(BTreeMap::new()),
                    status: Mutex::new(SlotStatus::default()),
                    op: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.slots.read().unwrap().keys().cloned().collect()
    }

    /// The model `POST /predict` serves without a name.
    pub fn default_model(&self) -> Option<String> {
        if let Some(d) = &self.configured_default {
            return Some(d.clone());
        }
        let slots = self.slots.read().unwrap();
        (slots.len() == 1)
            .then(|| slots.keys().next().cloned())
            .flatten()
    }

    /// The pipeline serving `name` (or the default model), for one request.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Pipeline>, RepoError> {
        let name = match name {
            Some(n) => n.to_owned(),
            None => self.default_model().ok_or_else(|| RepoError::NoDefault {
                available: self.names(),
            })?,
        };
        let slot = self.slot(&name).ok_or_else(|| RepoError::NotFound {
            name: name.clone(),
            available: self.names(),
        })?;
        let serving = slot.serving.read().unwrap().clone();
        serving.ok_or_else(|| {
            let view = self.view_of(&name, &slot);
            let reason = match view.state {
                ModelState::Loading => "it is still loading".to_owned(),
                ModelState::Unloading => "it is being unloaded".to_owned(),
                _ => view.reason.unwrap_or_else(|| "it is not loaded".to_owned()),
            };
            RepoError::Unavailable {
                reason,
                model: name,
            }
        })
    }

    /// Loads the model's chosen version from disk (again), and swaps it in once it is warm.
    /// The load runs as a task of its own, so a caller that goes away (a client that
    /// disconnects, a connection dropped at shutdown) never leaves it half done: the model
    /// ends `ready` or `failed`, not `loading` for ever.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<ModelView, RepoError> {
        let (this, owned) = (self.clone(), name.to_owned());
        match tokio::spawn(async move { this.load_in_place(&owned).await }).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(RepoError::LoadFailed {
                model: name.to_owned(),
                reason: "the load was cancelled (the server is stopping)".to_owned(),
            }),
        }
    }

    /// [`Repository::load`] in the caller's task (the poller's, which is never dropped midway).
    async fn load_in_place(&self, name: &str) -> Result<ModelView, RepoError> {
        let found = self.scan().await.map_err(|reason| RepoError::LoadFailed {
            model: name.to_owned(),
            reason,
        })?;
        let Some(model) = found.get(name) else {
            return Err(RepoError::NotFound {
                name: name.to_owned(),
                available: found.keys().cloned().collect(),
            });
        };
        let slot = self.slot_or_new(name);
        let _op = slot.op.lock().await;
        let version = model.chosen;
        {
            let mut s = slot.status.lock().unwrap();
            s.wanted = true;
            for &v in model.versions.keys() {
                s.versions
                    .entry(v)
                    .or_insert_with(|| version_status(v, "available", None));
            }
            s.versions.retain(|v, _| model.versions.contains_key(v));
            s.loading = Some(version);
            s.versions
                .insert(version, version_status(version, "loading", None));
        }
        self.publish_state(name, &slot);
        let result = self.start_version(name, model, version).await;
        {
            let mut s = slot.status.lock().unwrap();
            s.loading = None;
            match &result {
                Ok(pipeline) => {
                    let old = slot.serving.write().unwrap().replace(pipeline.clone());
                    if let Some(old) = old
                        && old.version != version
                    {
                        if let Some(files) = model.others.get(&old.version) {
                            // Still served under the policy: it goes on answering its version.
                            s.others_files.insert(old.version, files.clone());
                            slot.others.write().unwrap().insert(old.version, old);
                        } else {
                            s.versions
                                .insert(old.version, version_status(old.version, "unloaded", None));
                        }
                    }
                    s.versions
                        .insert(version, version_status(version, "ready", None));
                    s.failure = None;
                    s.fingerprint = Some(model.files.clone());
                    s.retry = None;
                }
                Err(reason) => {
                    s.versions.insert(
                        version,
                        version_status(version, "failed", Some(reason.clone())),
                    );
                    s.failure = Some(format!("version {version} failed to load: {reason}"));
                    let attempts = match &s.retry {
                        Some(r) if r.version == version && r.files == model.files => r.attempts + 1,
                        _ => 1,
                    };
                    s.retry = Some(Retry {
                        version,
                        files: model.files.clone(),
                        attempts,
                        at: Instant::now() + retry_delay(attempts),
                    });
                }
            }
        }
        self.publish_state(name, &slot);
        self.start_others(name, &slot, model).await;
        match result {
            Ok(pipeline) => {
                let s = &pipeline.settings;
                let trained = pipeline.meta.trained.to_string();
                let precision = format!("{:?}", s.precision).to_lowercase();
                let device = match pipeline.state() {
                    WorkerState::Ready(r) => r.device,
                    _ => s.device.clone(),
                };
                let version = version.to_string();
                self.shared
                    .metrics
                    .set_model_info(name, Some([&version, &device, &precision, &trained]));
                tracing::info!(model = name, version = %version, device = %device, "model ready");
                Ok(self.view(name).expect("the slot exists"))
            }
            Err(reason) => {
                tracing::error!(model = name, version, error = %reason, "model failed to load");
                Err(RepoError::LoadFailed {
                    model: name.to_owned(),
                    reason,
                })
            }
        }
    }

    /// Brings the other versions served under the model's policy in line with the disk: those
    /// no longer served are dropped (their requests in flight finish), those missing or changed
    /// since their last load are (re)loaded; one that failed is tried again only once its files
    /// change. The caller holds the slot's operation lock.
    async fn start_others(&self, name: &str, slot: &Slot, model: &Found) {
        let gone: Vec<Arc<Pipeline>> = {
            let mut others = slot.others.write().unwrap();
            let stale: Vec<u64> = others
                .keys()
                .copied()
                .filter(|v| !model.others.contains_key(v))
                .collect();
            stale.iter().filter_map(|v| others.remove(v)).collect()
        };
        {
            let mut s = slot.status.lock().unwrap();
            s.others_files.retain(|v, _| model.others.contains_key(v));
            for p in &gone {
                if p.version != model.chosen {
                    s.versions
                        .insert(p.version, version_status(p.version, "unloaded", None));
                }
            }
        }
        drop(gone);
        for (&v, files) in &model.others {
            let current = {
                let s = slot.status.lock().unwrap();
                s.others_files.get(&v) == Some(files)
                    && (slot.others.read().unwrap().contains_key(&v)
                        || s.versions.get(&v).is_some_and(|st| st.state == "failed"))
            };
            if current {
                continue;
            }
            slot.status
                .lock()
                .unwrap()
                .versions
                .insert(v, version_status(v, "loading", None));
            let result = self.start_version(name, model, v).await;
            let mut s = slot.status.lock().unwrap();
            s.others_files.insert(v, files.clone());
            match result {
                Ok(pipeline) => {
                    slot.others.write().unwrap().insert(v, pipeline);
                    s.versions.insert(v, version_status(v, "ready", None));
                    tracing::info!(model = name, version = v, "version ready");
                }
                Err(reason) => {
                    tracing::error!(model = name, version = v, error = %reason, "version failed to load");
                    s.versions
                        .insert(v, version_status(v, "failed", Some(reason)));
                }
            }
        }
    }

    /// The pipeline serving version `version` of `name`.
    pub fn resolve_version(&self, name: &str, version: u64) -> Result<Arc<Pipeline>, RepoError> {
        if let Some(slot) = self.slot(name)
            && let Some(p) = slot.others.read().unwrap().get(&version)
        {
            return Ok(p.clone());
        }
        match self.resolve(Some(name)) {
            Ok(p) if p.version == version => Ok(p),
            Ok(_) => Err(RepoError::VersionNotServed {
                model: name.to_owned(),
                version,
                served: self
                    .view(name)
                    .map(|v| v.served_versions)
                    .unwrap_or_default(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Builds, starts and warms one version; the pipeline, or why not.
    async fn start_version(
        &self,
        name: &str,
        model: &Found,
        version: u64,
    ) -> Result<Arc<Pipeline>, String> {
        let Some(dir) = model.versions.get(&version) else {
            return Err(format!(
                "version {version} is not in the repository (found: {})",
                model
                    .versions
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let spec = self.spec(name, version, &model.folder, dir)?;
        let pipeline = Arc::new(
            Pipeline::start(spec, &self.shared)
                .map_err(|e| format!("starting its worker thread: {e}"))?,
        );
        let report = pipeline.wait_loaded().await?;
        let m = self.shared.metrics.model(name);
        m.load_seconds.set(report.load_time.as_secs_f64());
        m.warmup_seconds.set(report.warmup_time.as_secs_f64());
        Ok(pipeline)
    }

    fn spec(
        &self,
        name: &str,
        version: u64,
        folder: &Path,
        dir: &Path,
    ) -> Result<ModelSpec, String> {
        let meta = ModelMetadata::load(dir).map_err(|e| format!("{e:#}"))?;
        let mut settings = self.defaults.clone();
        let mut files = vec![folder.join("config.json")];
        if dir != folder {
            files.push(dir.join("config.json"));
        }
        for file in files {
            let o = read_overrides(&file)?;
            settings = settings.with(&o);
        }
        settings
            .validate(self.max_images_per_request, self.request_timeout_ms, |k| {
                format!("`{k}`")
            })
            .map_err(|e| format!("config.json of {name}: {e}"))?;
        if meta.format == ModelFormat::Aoti {
            // A package computes in the precision it was compiled for.
            settings.precision = crate::model::torch::package_precision(&meta, settings.precision)
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(ModelSpec {
            name: name.to_owned(),
            version,
            dir: dir.to_path_buf(),
            meta,
            settings,
        })
    }

    /// Stops serving the model. Requests in flight finish on it; its worker ends after them.
    pub async fn unload(&self, name: &str) -> Result<ModelView, RepoError> {
        let slot = self.slot(name).ok_or_else(|| RepoError::NotFound {
            name: name.to_owned(),
            available: self.names(),
        })?;
        let _op = slot.op.lock().await;
        let old = slot.serving.write().unwrap().take();
        let others = std::mem::take(&mut *slot.others.write().unwrap());
        {
            let mut s = slot.status.lock().unwrap();
            s.wanted = false;
            s.failure = None;
            s.fingerprint = None;
            s.retry = None;
            s.others_files.clear();
            for &v in others.keys() {
                s.versions.insert(v, version_status(v, "unloaded", None));
            }
            if let Some(p) = &old {
                s.unloading = true;
                s.versions
                    .insert(p.version, version_status(p.version, "unloaded", None));
            }
        }
        self.shared.metrics.set_model_info(name, None);
        self.publish_state(name, &slot);
        if let Some(pipeline) = old {
            // Wait for the worker's end without holding the pipeline, whose last holder
            // closes its queue.
            let mut exited = pipeline.exit_watch();
            drop(pipeline);
            let slot = slot.clone();
            let metrics = self.shared.metrics.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                let _ = exited.wait_for(WorkerState::has_exited).await;
                // As the slot's owner: a load since the unload may be serving already, and
                // its state is what is published.
                let _op = slot.op.lock().await;
                slot.status.lock().unwrap().unloading = false;
                metrics.set_model_state(&name, slot.state().0.as_str());
                tracing::info!(model = %name, "model unloaded");
            });
        }
        Ok(self.view(name).expect("the slot exists"))
    }

    /// Waits until no model is being loaded or unloaded (each one's operation is over), so
    /// that a load under way at shutdown ends, and is closed with the rest, before the process
    /// exits: libtorch torn down under a forward pass crashes the exit.
    pub async fn settle(&self) {
        for (_, slot) in self.snapshot() {
            drop(slot.op.lock().await);
        }
    }

    /// Closes every model's queue (shutdown): their workers finish what is queued and end.
    /// Returns the pipelines so that the caller can wait for them.
    pub fn close_all(&self) -> Vec<Arc<Pipeline>> {
        let slots: Vec<Arc<Slot>> = self.slots.read().unwrap().values().cloned().collect();
        slots
            .iter()
            .flat_map(|s| {
                let others = std::mem::take(&mut *s.others.write().unwrap());
                s.serving
                    .write()
                    .unwrap()
                    .take()
                    .into_iter()
                    .chain(others.into_values())
            })
            .inspect(|p| p.close())
            .collect()
    }

    /// Loads what should be loaded: new models and versions, files changed in place; unloads
    /// models whose folder is gone. Models unloaded through the API stay unloaded.
    pub async fn poll(&self) {
        let found = match self.scan().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "scanning the model repository failed");
                return;
            }
        };
        let now = Instant::now();
        for (name, model) in &found {
            let slot = self.slot(name);
            let want = slot.as_ref().is_none_or(|slot| {
                let s = slot.status.lock().unwrap();
                let serving = slot.serving.read().unwrap().clone();
                wants_load(&s, serving.as_deref(), model, now)
            });
            if want {
                tracing::info!(model = %name, "repository change: loading");
                let _ = self.load_in_place(name).await;
            } else if let Some(slot) = slot
                && others_changed(&slot, model)
            {
                tracing::info!(model = %name, "repository change: the other versions served");
                let _op = slot.op.lock().await;
                self.start_others(name, &slot, model).await;
            }
        }
        for name in self.names() {
            let serving = self
                .slot(&name)
                .is_some_and(|s| s.serving.read().unwrap().is_some());
            if !found.contains_key(&name) && serving {
                tracing::info!(model = %name, "repository change: the model's folder is gone; unloading");
                let _ = self.unload(&name).await;
            }
        }
    }

    /// The slots by name, copied out so that no lock on the map is held while each is looked at.
    fn snapshot(&self) -> Vec<(String, Arc<Slot>)> {
        self.slots
            .read()
            .unwrap()
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// `Ok` when every model that should be loaded is served and ready; otherwise what is not.
    pub fn readiness(&self) -> Result<(), Vec<Problem>> {
        let slots = self.snapshot();
        if slots.is_empty() {
            return Err(vec![Problem {
                model: String::new(),
                state: ModelState::Unavailable,
                reason: "no model found in the repository".into(),
            }]);
        }
        let mut problems = Vec::new();
        for (name, slot) in slots {
            let wanted = slot.status.lock().unwrap().wanted;
            let serving = slot.serving.read().unwrap().is_some();
            if !(wanted || serving) {
                continue;
            }
            let v = self.view_of(&name, &slot);
            if v.state != ModelState::Ready {
                problems.push(Problem {
                    model: name,
                    state: v.state,
                    reason: v.reason.unwrap_or_else(|| v.state.as_str().to_owned()),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Whether a served model's worker has stopped (only a reload or a restart helps).
    pub fn stopped_workers(&self) -> Vec<String> {
        self.slots
            .read()
            .unwrap()
            .iter()
            .filter(|(_, s)| {
                s.serving
                    .read()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|p| p.has_stopped())
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn views(&self) -> Vec<ModelView> {
        let slots = self.snapshot();
        slots.iter().map(|(n, s)| self.view_of(n, s)).collect()
    }

    pub fn view(&self, name: &str) -> Option<ModelView> {
        self.slot(name).map(|s| self.view_of(name, &s))
    }

    fn view_of(&self, name: &str, slot: &Slot) -> ModelView {
        let s = slot.status.lock().unwrap();
        let serving = slot.serving.read().unwrap().clone();
        let (state, reason) = match state_of(serving.as_deref(), &s) {
            (ModelState::Unavailable, None) => (
                ModelState::Unavailable,
                Some(format!(
                    "it is not loaded (load it with POST /models/{name}/load)"
                )),
            ),
            other => other,
        };
        // A failed newer version is reported beside the one still being served.
        let reason = reason.or_else(|| {
            serving.as_ref().and(
                s.versions
                    .values()
                    .rev()
                    .find(|v| v.state == "failed")
                    .map(|v| {
                        format!(
                            "version {} failed to load: {}",
                            v.version,
                            v.reason.clone().unwrap_or_default()
                        )
                    }),
            )
        });
        let report = serving.as_ref().and_then(|p| match p.state() {
            WorkerState::Ready(r) => Some(r),
            _ => None,
        });
        let mut served_versions: Vec<u64> = serving
            .iter()
            .filter(|p| p.readiness().is_ok())
            .map(|p| p.version)
            .chain(
                slot.others
                    .read()
                    .unwrap()
                    .values()
                    .filter(|p| p.readiness().is_ok())
                    .map(|p| p.version),
            )
            .collect();
        served_versions.sort_unstable();
        ModelView {
            name: name.to_owned(),
            state,
            reason,
            version: serving.as_ref().map(|p| p.version),
            served_versions,
            versions: s.versions.values().cloned().collect(),
            default: self.default_model().as_deref() == Some(name),
            device: report.as_ref().map(|r| r.device.clone()),
            precision: serving
                .as_ref()
                .map(|p| format!("{:?}", p.settings.precision).to_lowercase()),
            format: serving.as_ref().map(|p| p.meta.format),
            trained: serving.as_ref().map(|p| p.meta.trained),
            quantized: serving.as_ref().and_then(|p| p.meta.quantized.clone()),
            weights: serving.as_ref().and_then(|p| p.meta.weights.clone()),
            max_batch_size: serving.as_ref().map(|p| p.settings.max_batch_size),
            queue_capacity: serving.as_ref().map(|p| p.capacity()),
            inflight_images: serving.as_ref().map(|p| p.places_in_use()),
            load_ms: report.as_ref().map(|r| r.load_time.as_secs_f64() * 1e3),
            warmup_ms: report.as_ref().map(|r| r.warmup_time.as_secs_f64() * 1e3),
        }
    }

    fn publish_state(&self, name: &str, slot: &Slot) {
        let state = self.view_of(name, slot).state;
        self.shared.metrics.set_model_state(name, state.as_str());
    }
}

fn version_status(version: u64, state: &'static str, reason: Option<String>) -> VersionStatus {
    VersionStatus {
        version,
        state,
        reason,
    }
}

/// Whether the poller should (re)load a model it has a slot for: wanted, not loading, and its
/// chosen version failed with other files or is due for a retry, or is not the one served, or
/// has changed in place. Reads nothing but what the scan found.
fn wants_load(s: &SlotStatus, serving: Option<&Pipeline>, model: &Found, now: Instant) -> bool {
    if !s.wanted || s.loading.is_some() {
        return false;
    }
    if let Some(r) = &s.retry
        && r.version == model.chosen
    {
        return r.files != model.files || now >= r.at;
    }
    match serving {
        None => true,
        Some(p) => p.version != model.chosen || s.fingerprint.as_ref() != Some(&model.files),
    }
}

/// Whether the other versions a model's policy serves differ from those its slot has tried:
/// one added, one dropped, or files changed since the last attempt.
fn others_changed(slot: &Slot, model: &Found) -> bool {
    let s = slot.status.lock().unwrap();
    s.wanted && s.loading.is_none() && s.others_files != model.others
}

#[cfg(test)]
mod tests {
    use super::discovery::discover_repository;
    use super::*;

    fn write_model(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("metadata.json"),
            r#"{"name":"m","labels":["a","b"]}"#,
        )
        .unwrap();
    }

    #[test]
    fn finds_flat_and_versioned_models_and_skips_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write_model(&r.join("flat"));
        write_model(&r.join("versioned/1"));
        write_model(&r.join("versioned/3"));
        std::fs::create_dir_all(r.join("versioned/notes")).unwrap();
        std::fs::create_dir_all(r.join("versioned/0")).unwrap();
        std::fs::create_dir_all(r.join("empty")).unwrap();
        std::fs::create_dir_all(r.join("__pycache__")).unwrap();
        write_model(&r.join("bad name!"));
        std::fs::write(r.join("export.py"), "").unwrap();
        let found = discover_repository(r).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["flat", "versioned"]);
        assert_eq!(found["flat"].versions.keys().collect::<Vec<_>>(), [&1]);
        assert_eq!(
            found["versioned"].versions.keys().collect::<Vec<_>>(),
            [&1, &3]
        );
        assert!(discover_repository(&r.join("missing")).is_err());
    }

    #[test]
    fn a_failed_version_waits_longer_after_each_failure() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(retry_delay(u32::MAX).as_secs(), 900);
    }

    #[test]
    fn model_names_are_bounded() {
        for ok in ["resnet18", "efficientnet_lite0", "a-b.c"] {
            assert!(valid_model_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(!valid_model_name(bad), "{bad}");
        }
    }
}
