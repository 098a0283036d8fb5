//! The model directory's `metadata.json`, as written by `models/export.py`.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

fn default_resize() -> u32 {
    256
}
fn default_input() -> u32 {
    224
}
fn default_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}
fn default_trained() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Name reported by /predict, /health and the build-info metric.
    pub name: String,
    /// How the network is stored: a TorchScript file or an AOTInductor package.
    #[serde(default)]
    pub format: ModelFormat,
    /// The model file, relative to the model directory (`model.pt`, or `model.pt2` for an
    /// AOTInductor package, when absent).
    #[serde(default)]
    pub file: Option<String>,
    /// An AOTInductor package's compiled-in properties: the device kind (`cpu`, `cuda`) and
    /// precision (`fp32`, `bf16`, `fp16`) it was compiled for, and the largest batch its dynamic
    /// batch dimension takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// A CPU package's kernels use the vector instructions of the CPU that compiled it: the
    /// /proc/cpuinfo flags they need (`avx512f`, `amx_tile`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_flags: Vec<String>,
    /// The torch version that exported the model (an AOTInductor package runs only on the
    /// libtorch version that compiled it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_version: Option<String>,
    /// Side of the square input the network takes (CenterCrop size).
    #[serde(default = "default_input")]
    pub input_size: u32,
    /// Shorter-side length the image is resized to before the crop.
    #[serde(default = "default_resize")]
    pub resize_size: u32,
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Class names, index = output position.
    pub labels: Vec<String>,
    /// False for a randomly initialised network: its predictions are meaningless.
    #[serde(default = "default_trained")]
    pub trained: bool,
    /// Where the weights came from.
    #[serde(default)]
    pub weights: Option<String>,
    /// The resize filter the model was trained with. The server resizes bilinearly, as
    /// torchvision's `Resize` does by default; another filter is served with a warning.
    #[serde(default)]
    pub interpolation: Option<String>,
    /// The quantization scheme (`int8`) of a quantized model, which runs only in the precision
    /// it was quantized to; absent or `false` for a float model.
    #[serde(
        default,
        deserialize_with = "quantized",
        skip_serializing_if = "Option::is_none"
    )]
    pub quantized: Option<String>,
}

/// The stored form of a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// `torch.jit` TorchScript (`model.pt`), run by libtorch's interpreter.
    #[default]
    Torchscript,
    /// A `torch.export` program compiled ahead of time by AOTInductor (`model.pt2`).
    Aoti,
}

impl ModelFormat {
    /// The Open Inference Protocol platform name (Triton's for TorchScript; AOTInductor
    /// packages have none in Triton, so ours follows its pattern).
    pub fn platform(self) -> &'static str {
        match self {
            Self::Torchscript => "pytorch_libtorch",
            Self::Aoti => "pytorch_aoti",
        }
    }

    fn default_file(self) -> &'static str {
        match self {
            Self::Torchscript => "model.pt",
            Self::Aoti => "model.pt2",
        }
    }
}

/// `"quantized"`: `false`/`null` (a float model), `true` (int8) or the scheme's name.
fn quantized<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Q {
        Flag(bool),
        Scheme(String),
    }
    Ok(match Option::<Q>::deserialize(d)? {
        None | Some(Q::Flag(false)) => None,
        Some(Q::Flag(true)) => Some("int8".into()),
        Some(Q::Scheme(s)) if s.is_empty() || s == "none" => None,
        Some(Q::Scheme(s)) => Some(s),
    })
}

impl ModelMetadata {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("metadata.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (export a model with `python models/export.py --out {}`)",
                path.display(),
                dir.display()
            )
        })?;
        let meta: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        meta.validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(meta)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.labels.is_empty() {
            bail!("`labels` is empty");
        }
        if self.input_size == 0 || self.input_size > 4096 {
            bail!("`input_size` {} is out of range 1..=4096", self.input_size);
        }
        if self.resize_size < self.input_size || self.resize_size > 8192 {
            bail!(
                "`resize_size` {} must be between `input_size` ({}) and 8192",
                self.resize_size,
                self.input_size
            );
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!("`std` must be positive");
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            bail!("`mean` must be finite");
        }
        if self.max_batch == Some(0) {
            bail!("`max_batch` must be at least 1");
        }
        Ok(())
    }

    pub fn model_path(&self, dir: &Path) -> std::path::PathBuf {
        dir.join(
            self.file
                .as_deref()
                .unwrap_or_else(|| self.format.default_file()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_metadata_gets_imagenet_defaults() {
        let m: ModelMetadata = serde_json::from_str(r#"{"name":"x","labels":["a","b"]}"#).unwrap();
        assert_eq!((m.resize_size, m.input_size), (256, 224));
        assert_eq!(m.model_path(Path::new("d")), Path::new("d/model.pt"));
        assert_eq!(m.format, ModelFormat::Torchscript);
        assert!(m.trained);
        assert_eq!(m.quantized, None);
        m.validate().unwrap();
    }

    #[test]
    fn an_aoti_package_defaults_to_model_pt2() {
        let m: ModelMetadata =
            serde_json::from_str(r#"{"name":"x","labels":["a"],"format":"aoti","max_batch":32}"#)
                .unwrap();
        assert_eq!(m.format, ModelFormat::Aoti);
        assert_eq!(m.model_path(Path::new("d")), Path::new("d/model.pt2"));
        assert_eq!(m.format.platform(), "pytorch_aoti");
        m.validate().unwrap();
        let err =
            serde_json::from_str::<ModelMetadata>(r#"{"name":"x","labels":["a"],"format":"onnx"}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("torchscript") && err.contains("aoti"), "{err}");
    }

    #[test]
    fn quantized_flag_or_scheme() {
        let q = |v: &str| {
            serde_json::from_str::<ModelMetadata>(&format!(
                r#"{{"name":"x","labels":["a"],"quantized":{v}}}"#
            ))
            .unwrap()
            .quantized
        };
        assert_eq!(q("false"), None);
        assert_eq!(q("null"), None);
        assert_eq!(q("true").as_deref(), Some("int8"));
        assert_eq!(q("\"int8\"").as_deref(), Some("int8"));
    }

    #[test]
    fn rejects_inconsistent_geometry() {
        let m: ModelMetadata = serde_json::from_str(
            r#"{"name":"x","labels":["a"],"input_size":224,"resize_size":200}"#,
        )
        .unwrap();
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("resize_size")
        );
        let m: ModelMetadata = serde_json::from_str(r#"{"name":"x","labels":[]}"#).unwrap();
        assert!(m.validate().is_err());
        let m: ModelMetadata =
            serde_json::from_str(r#"{"name":"x","labels":["a"],"std":[1,0,1]}"#).unwrap();
        assert!(m.validate().is_err());
    }
}
