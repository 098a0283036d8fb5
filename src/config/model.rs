//! One model's serving settings: the command line's defaults, overridden key by key by the
//! model's `config.json` (unknown keys refused), checked together; and which versions of it
//! are served at once (Triton's version policies).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{MemoryFormat, Precision, parse_device};

/// The serving settings of one model: the command line's, then its `config.json`'s.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSettings {
    pub device: String,
    pub precision: Precision,
    /// bf16 may run emulated on a CPU without native bf16 (`--allow-emulated-bf16`).
    pub allow_emulated_bf16: bool,
    pub memory_format: MemoryFormat,
    pub max_batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub queue_capacity: usize,
    /// libtorch threads of this model's forward passes (its share of the CPU budget).
    pub intra_op_threads: usize,
    pub warmup_iterations: usize,
    /// The version to serve instead of the highest.
    pub version: Option<u64>,
}

/// A model's `config.json`: any of the serving settings, each overriding the command line's for
/// that model. Unknown keys are an error, so a misspelt one is not silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    pub device: Option<String>,
    pub precision: Option<Precision>,
    pub memory_format: Option<MemoryFormat>,
    pub max_batch_size: Option<usize>,
    pub max_batch_delay_ms: Option<u64>,
    pub queue_capacity: Option<usize>,
    pub intra_op_threads: Option<usize>,
    pub warmup_iterations: Option<usize>,
    pub version: Option<u64>,
    /// Which versions are served at once (in the model's folder's `config.json`).
    pub version_policy: Option<VersionPolicy>,
}

/// Which versions of a model are served at once, in Triton's terms (a model's `config.json`):
/// `{"latest": {"num_versions": N}}` (the default, with N = 1), `{"all": {}}`, or
/// `{"specific": {"versions": [1, 3]}}`. Requests without a version go to the pinned version
/// (`version`, `--model-version`) or else the highest one served; the others answer at
/// `/v2/models/{name}/versions/{v}/...`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum VersionPolicy {
    Latest { num_versions: u32 },
    All {},
    Specific { versions: Vec<u64> },
}

impl VersionPolicy {
    /// The versions served, of those the repository holds (ascending).
    pub fn select(policy: Option<&Self>, held: &[u64]) -> Vec<u64> {
        match policy {
            None => held.last().copied().into_iter().collect(),
            Some(Self::Latest { num_versions }) => {
                let n = (*num_versions).max(1) as usize;
                held[held.len().saturating_sub(n)..].to_vec()
            }
            Some(Self::All {}) => held.to_vec(),
            Some(Self::Specific { versions }) => held
                .iter()
                .copied()
                .filter(|v| versions.contains(v))
                .collect(),
        }
    }
}

impl ModelSettings {
    pub fn with(mut self, o: &ModelOverrides) -> Self {
        if let Some(v) = &o.device {
            self.device = v.clone();
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        take!(
            precision,
            memory_format,
            max_batch_size,
            max_batch_delay_ms,
            queue_capacity,
            intra_op_threads,
            warmup_iterations
        );
        if o.version.is_some() {
            self.version = o.version;
        }
        self
    }

    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    /// Checks that the settings fit together; `name` spells a setting as the message should
    /// (a flag for the command line, a key for `config.json`).
    pub fn validate(
        &self,
        max_images_per_request: usize,
        timeout_ms: u64,
        name: impl Fn(&str) -> String,
    ) -> Result<(), String> {
        if self.max_batch_size == 0 || self.max_batch_size > 1024 {
            return Err(format!(
                "{} must be between 1 and 1024",
                name("max_batch_size")
            ));
        }
        if self.queue_capacity < max_images_per_request {
            return Err(format!(
                "{} ({}) must be at least {} ({}), or no request of that size could ever be admitted",
                name("queue_capacity"),
                self.queue_capacity,
                name("max_images_per_request"),
                max_images_per_request
            ));
        }
        if self.max_batch_delay_ms >= timeout_ms {
            return Err(format!(
                "{} ({}) must be below {} ({})",
                name("max_batch_delay_ms"),
                self.max_batch_delay_ms,
                name("request_timeout_ms"),
                timeout_ms
            ));
        }
        if self.intra_op_threads == 0 {
            return Err(format!("{} must be at least 1", name("intra_op_threads")));
        }
        parse_device(&self.device).map_err(|e| e.replace("--device", &name("device")))?;
        Ok(())
    }
}
