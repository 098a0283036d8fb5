//! Models: what a classifier is to the rest of the server, and the backend that builds one.
//!
//! [`torch`] is the only code that touches libtorch (with [`aoti`], its bridge to AOTInductor
//! packages); [`threads`] holds the thread settings and
//! the CPU budget that the models' workers share. A [`Backend`] builds a [`Classifier`] on the
//! model's own worker thread; the worker owns it from then on (see [`crate::pipeline`]).

pub mod aoti;
pub mod threads;
pub mod torch;

use std::path::PathBuf;

use crate::config::ModelSettings;
use crate::metadata::ModelMetadata;

pub use torch::{TorchBackend, TorchClassifier};

/// A batch classifier. `pixels` holds `n` images of `input_size * input_size * 3` RGB bytes in
/// HWC order, as [`crate::preprocess`] produces them; the classifier scales and normalises them
/// itself and returns `n * num_classes()` probabilities.
pub trait Classifier: Send {
    fn forward(&mut self, pixels: &[u8], n: usize) -> anyhow::Result<Vec<f32>>;
    /// The same on `n` input tensors already scaled and normalised: `[n, 3, size, size]`
    /// floats, NCHW (the Open Inference Protocol's preprocessed input).
    fn forward_tensor(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>>;
    fn num_classes(&self) -> usize;
    /// Side of the square input, in pixels.
    fn input_size(&self) -> usize;
    /// Batch sizes worth warming and padding to (all sizes on CPU, powers of two on CUDA).
    fn padded_batch(&self, n: usize) -> usize {
        n
    }
}

/// One version of one model, as the repository found it: what a backend needs to build it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    /// The directory holding `metadata.json` and the TorchScript file.
    pub dir: PathBuf,
    pub meta: ModelMetadata,
    /// The effective serving settings: command-line defaults, then the model's `config.json`.
    pub settings: ModelSettings,
}

/// A classifier built by a backend, with where it runs.
pub struct Loaded {
    pub classifier: Box<dyn Classifier>,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// Whether its forward passes run on the CPU's cores (and so share the CPU budget).
    pub on_cpu: bool,
}

/// Builds classifiers. `load` runs on the model's worker thread, after that thread's settings
/// (libtorch threads, priority) are made, and before its first forward pass.
pub trait Backend: Send + Sync + 'static {
    fn load(&self, spec: &ModelSpec) -> anyhow::Result<Loaded>;
    /// Whether the model's forward passes will run on the CPU's cores, asked before `load` so
    /// the worker thread's priority can be set first (a thread cannot raise it again).
    fn runs_on_cpu(&self, _settings: &ModelSettings) -> bool {
        true
    }
}
