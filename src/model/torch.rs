//! Loading, device, precision and the forward pass through libtorch: with [`super::aoti`], the
//! only place that touches tch. A model is a TorchScript module or an AOTInductor package; both
//! get the same input and output handling.
//!
//! Everything here runs on the worker thread that owns the model; only plain bytes and floats
//! cross threads.

use std::path::Path;

use anyhow::{Context, bail};
use tch::{CModule, Device, Kind, Tensor};

use super::aoti::{AotiModel, package_metadata};
use super::{Backend, Classifier, Loaded, ModelSpec};
use crate::config::{DeviceRequest, MemoryFormat, ModelSettings, Precision, parse_device};
use crate::metadata::{ModelFormat, ModelMetadata};

/// Builds [`TorchClassifier`]s from TorchScript files on the device their settings ask for.
#[derive(Debug, Default, Clone, Copy)]
pub struct TorchBackend;

impl Backend for TorchBackend {
    fn load(&self, spec: &ModelSpec) -> anyhow::Result<Loaded> {
        let s = &spec.settings;
        let device = resolve_device(parse_device(&s.device).map_err(anyhow::Error::msg)?)?;
        let precision = match spec.meta.format {
            ModelFormat::Torchscript => s.precision,
            ModelFormat::Aoti => {
                let p = package_precision(&spec.meta, s.precision)?;
                check_package(
                    &spec.meta,
                    device,
                    s.max_batch_size,
                    &libtorch_version(),
                    crate::config::cpu_flags(),
                )?;
                p
            }
        };
        if device == Device::Cpu && precision == Precision::Bf16 && !s.allow_emulated_bf16 {
            check_native_bf16(&spec.name, crate::config::cpu_features())?;
        }
        let model =
            TorchClassifier::load(&spec.dir, &spec.meta, device, precision, s.memory_format)?;
        Ok(Loaded {
            classifier: Box::new(model),
            device: device_name(device),
            on_cpu: device == Device::Cpu,
        })
    }

    fn runs_on_cpu(&self, settings: &ModelSettings) -> bool {
        // A device that cannot be resolved fails in `load`, which says why.
        parse_device(&settings.device)
            .map_err(anyhow::Error::msg)
            .and_then(resolve_device)
            .map_or(true, |d| d == Device::Cpu)
    }
}

/// The precision an AOTInductor package computes in: the one it was compiled for. Asking for
/// another (other than the default fp32) is an error that says how to get it.
pub fn package_precision(meta: &ModelMetadata, asked: Precision) -> anyhow::Result<Precision> {
    let compiled = match meta.precision.as_deref().unwrap_or("fp32") {
        "fp32" => Precision::Fp32,
        "bf16" => Precision::Bf16,
        "fp16" => Precision::Fp16,
        other => bail!(
            "model {}: metadata.json names an unknown precision {other:?}",
            meta.name
        ),
    };
    if asked != Precision::Fp32 && asked != compiled {
        bail!(
            "model {}: its AOTInductor package was compiled for {}; a package runs in the precision it \
             was compiled for: remove --precision {} (or `precision` in its config.json), or export it \
             again with `models/export.py --format aoti --precision {}`",
            meta.name,
            precision_name(compiled),
            precision_name(asked),
            precision_name(asked),
        );
    }
    Ok(compiled)
}

fn precision_name(p: Precision) -> String {
    format!("{p:?}").to_lowercase()
}

/// Checks that an AOTInductor package can run here: compiled for this device kind, by this
/// libtorch's major.minor version, with a batch dimension that takes the largest batch.
pub fn check_package(
    meta: &ModelMetadata,
    device: Device,
    max_batch_size: usize,
    libtorch: &str,
    cpu_flags: Option<&[String]>,
) -> anyhow::Result<()> {
    let here = if device.is_cuda() { "cuda" } else { "cpu" };
    if let Some(compiled) = meta.device.as_deref()
        && compiled != here
    {
        bail!(
            "model {}: its AOTInductor package was compiled for {compiled} and this model is set to \
             run on {}: serve it with --device {compiled} (or `device` in its config.json), or export \
             it again for {here} (`models/export.py --format aoti --device {here}`)",
            meta.name,
            device_name(device),
        );
    }
    let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    if let Some(exported) = meta.torch_version.as_deref()
        && libtorch != "unknown"
        && major_minor(exported) != major_minor(libtorch)
    {
        bail!(
            "model {}: its AOTInductor package was compiled by torch {exported}, and this server runs \
             libtorch {libtorch}: a package runs only on the torch version that compiled it; export it \
             again with torch {}",
            meta.name,
            major_minor(libtorch),
        );
    }
    if let Some(have) = cpu_flags
        && !device.is_cuda()
    {
        let missing: Vec<&str> = meta
            .cpu_flags
            .iter()
            .filter(|f| !have.contains(f))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            bail!(
                "model {}: its AOTInductor package was compiled for a CPU with {}, and this CPU lacks \
                 {}: export it again on a CPU like the ones it is served on (the oldest of them)",
                meta.name,
                meta.cpu_flags.join(", "),
                missing.join(", "),
            );
        }
    }
    if let Some(max) = meta.max_batch
        && max_batch_size > max as usize
    {
        bail!(
            "model {}: its AOTInductor package takes batches of at most {max}, and max_batch_size is \
             {max_batch_size}: set --max-batch-size (or `max_batch_size` in its config.json) to at most \
             {max}, or export it again with `--max-batch {max_batch_size}`",
            meta.name,
        );
    }
    Ok(())
}

/// bf16 on a CPU that only emulates it is refused, with the reason and what to use instead.
pub fn check_native_bf16(model: &str, features: &[&str]) -> anyhow::Result<()> {
    if crate::config::native_bf16(features) {
        return Ok(());
    }
    bail!(
        "model {model}: --precision bf16 on this CPU would be about 10x slower than fp32: it has no \
         native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo; it has: {}), so libtorch \
         would emulate it. Use --precision fp32 (the default), or an int8 model \
         (models/export.py --quantize int8) for a faster CPU path; --allow-emulated-bf16 serves bf16 anyway",
        if features.is_empty() {
            "none of those checked".to_owned()
        } else {
            features.join(", ")
        }
    )
}

/// Resolves the requested device; CUDA asked for but unusable is an error that says why,
/// never a silent CPU fallback.
pub fn resolve_device(req: DeviceRequest) -> anyhow::Result<Device> {
    match req {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceRequest::Cuda(n) => {
            if !tch::utils::has_cuda() {
                bail!(
                    "--device cuda:{n} was requested, but this build's libtorch has no CUDA support \
                     (libtorch_cuda is not loaded: build against a CUDA libtorch, e.g. with Dockerfile.gpu)"
                );
            }
            let count = tch::Cuda::device_count();
            if count == 0 {
                bail!(
                    "--device cuda:{n} was requested, but no CUDA device is visible \
                     (check the NVIDIA driver, `nvidia-smi`, and that the container was started with a GPU)"
                );
            }
            if n as i64 >= count {
                bail!(
                    "--device cuda:{n} was requested, but only {count} CUDA device(s) are visible"
                );
            }
            Ok(Device::Cuda(n))
        }
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The libtorch version this binary runs against, as reported by the build-info metric.
pub fn libtorch_version() -> String {
    option_env!("TCH_SERVE_LIBTORCH_VERSION")
        .unwrap_or("unknown")
        .to_string()
}

/// Gives every 4-D parameter (convolution weights) channels-last strides, in place. With the
/// input channels-last as well, oneDNN and cuDNN run the convolutions without reordering the
/// weights on every call (with channels-last input and NCHW weights, bf16 ran slower than fp32
/// on CPU).
fn to_channels_last(module: &CModule) -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, mut p) in module.named_parameters()? {
        if p.dim() == 4 {
            let nhwc = p.f_permute([0, 2, 3, 1])?.f_contiguous()?;
            p.f_set_data(&nhwc.f_permute([0, 3, 1, 2])?)
                .with_context(|| format!("making parameter {name} channels-last"))?;
        }
    }
    Ok(())
}

/// Whether an NCHW-shaped tensor is laid out NHWC: channels innermost, then width, height and
/// batch. Dimensions of size 1 may have any stride, as in libtorch's own check.
fn is_channels_last(size: &[i64], stride: &[i64]) -> bool {
    let mut expected = 1;
    for d in [1, 3, 2, 0] {
        if size[d] != 1 && stride[d] != expected {
            return false;
        }
        expected *= size[d];
    }
    true
}

/// The network itself.
enum Program {
    Script(CModule),
    /// With the largest batch its batch dimension takes.
    Aoti(AotiModel, Option<usize>),
}

impl Program {
    fn run(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        match self {
            Self::Script(m) => Ok(m.forward_ts(&[x])?),
            Self::Aoti(m, max) => {
                let n = x.size().first().copied().unwrap_or(0) as usize;
                if let Some(max) = max
                    && n > *max
                {
                    bail!("a batch of {n}: this AOTInductor package takes at most {max}");
                }
                let mut out = m.run(&[x])?;
                if out.len() != 1 {
                    bail!(
                        "the AOTInductor package returned {} outputs, expected 1 (the logits)",
                        out.len()
                    );
                }
                Ok(out.remove(0))
            }
        }
    }
}

/// A classifier on one device: a TorchScript module or an AOTInductor package.
pub struct TorchClassifier {
    program: Program,
    device: Device,
    kind: Kind,
    channels_last: bool,
    size: i64,
    classes: usize,
    /// `[1, 3, 1, 1]` float tensors on the device: `ToTensor()` and `Normalize(mean, std)` as
    /// one multiply-add, `x * scale + shift` with `scale = 1 / (255 std)` and
    /// `shift = -mean / std`.
    scale: Tensor,
    shift: Tensor,
}

impl TorchClassifier {
    /// Loads `model.pt` onto `device` and casts it to `precision`, or opens an AOTInductor
    /// package (which runs in the precision it was compiled for: `precision` only sets the input
    /// cast, which its compiled graph does itself, so the input stays fp32). Call on the
    /// inference thread, after the thread settings.
    pub fn load(
        dir: &Path,
        meta: &ModelMetadata,
        device: Device,
        precision: Precision,
        memory_format: MemoryFormat,
    ) -> anyhow::Result<Self> {
        if meta.quantized.is_some() && device.is_cuda() {
            bail!(
                "the model {} is quantized ({}): its kernels run on the CPU only; serve it with --device cpu (or `device` in its config.json)",
                meta.name,
                meta.quantized.as_deref().unwrap_or_default()
            );
        }
        if meta.quantized.is_some() && precision != Precision::Fp32 {
            bail!(
                "the model {} is quantized ({}): it runs in the precision it was quantized to; \
                 remove --precision {} (or `precision` in its config.json)",
                meta.name,
                meta.quantized.as_deref().unwrap_or_default(),
                format!("{precision:?}").to_lowercase()
            );
        }
        if let Some(f) = &meta.interpolation
            && !f.eq_ignore_ascii_case("bilinear")
        {
            tracing::warn!(
                model = %meta.name,
                interpolation = %f,
                "the model was trained with {f} resizing; the server resizes bilinearly, so its answers may differ slightly from the reference"
            );
        }
        let path = meta.model_path(dir);
        let (program, kind, channels_last) = match meta.format {
            ModelFormat::Torchscript => {
                let mut module = CModule::load_on_device(&path, device)
                    .with_context(|| format!("loading TorchScript model {}", path.display()))?;
                module.f_set_eval()?;
                let kind = match precision {
                    Precision::Fp32 => Kind::Float,
                    Precision::Bf16 => Kind::BFloat16,
                    Precision::Fp16 => Kind::Half,
                };
                if kind != Kind::Float {
                    module.to(device, kind, false);
                }
                let channels_last = match memory_format {
                    MemoryFormat::Contiguous => false,
                    MemoryFormat::ChannelsLast | MemoryFormat::Auto => true,
                };
                if channels_last {
                    to_channels_last(&module)?;
                }
                (Program::Script(module), kind, channels_last)
            }
            ModelFormat::Aoti => {
                // What the package says of itself outranks metadata.json.
                let compiled = package_metadata(&path)?;
                let here = if device.is_cuda() { "cuda" } else { "cpu" };
                if let Some(kind) = compiled.get("AOTI_DEVICE_KEY")
                    && kind != here
                {
                    bail!(
                        "model {}: {} was compiled for {kind}, and this model is set to run on {}",
                        meta.name,
                        path.display(),
                        device_name(device)
                    );
                }
                let index = match device {
                    Device::Cuda(n) => Some(n),
                    _ => None,
                };
                let model = AotiModel::load(&path, index)?;
                // The compiled graph takes the contiguous fp32 input it was exported with.
                let max = meta.max_batch.map(|m| m as usize);
                (Program::Aoti(model, max), Kind::Float, false)
            }
        };
        let per_channel = |v: [f32; 3]| {
            Tensor::f_from_slice(&v)?
                .f_view([1, 3, 1, 1])?
                .f_to_device(device)
        };
        let scale = per_channel(std::array::from_fn(|c| 1.0 / (255.0 * meta.std[c])))?;
        let shift = per_channel(std::array::from_fn(|c| -meta.mean[c] / meta.std[c]))?;
        Ok(Self {
            program,
            device,
            kind,
            channels_last,
            size: i64::from(meta.input_size),
            classes: meta.labels.len(),
            scale,
            shift,
        })
    }

    /// Whether every convolution weight has channels-last strides (the layout the input gets).
    /// An AOTInductor package's weights are compiled in: never.
    pub fn weights_channels_last(&self) -> anyhow::Result<bool> {
        let Program::Script(module) = &self.program else {
            return Ok(false);
        };
        Ok(module
            .named_parameters()?
            .iter()
            .filter(|(_, p)| p.dim() == 4)
            .all(|(_, p)| is_channels_last(&p.size(), &p.stride())))
    }

    fn normalised_pixels(&self, pixels: &[u8], n: usize) -> Result<Tensor, tch::TchError> {
        let s = self.size;
        // HWC bytes viewed as NHWC, permuted to an NCHW-shaped view with channels-last strides,
        // moved to the device as bytes (a quarter of the traffic of floats), then scaled and
        // normalised there in f32, as torchvision does, before the cast to the model's kind.
        let x = Tensor::f_from_slice(pixels)?
            .f_view([n as i64, s, s, 3])?
            .f_permute([0, 3, 1, 2])?
            .f_to_device(self.device)?
            .f_to_kind(Kind::Float)?
            .f_mul(&self.scale)?
            .f_add(&self.shift)?;
        if self.channels_last {
            Ok(x)
        } else {
            x.f_contiguous()
        }
    }

    /// NCHW floats, given channels-last strides when the weights have them.
    fn tensor_input(&self, input: &[f32], n: usize) -> Result<Tensor, tch::TchError> {
        let s = self.size;
        let x = Tensor::f_from_slice(input)?.f_view([n as i64, 3, s, s])?;
        let x = if self.channels_last {
            x.f_permute([0, 2, 3, 1])?
                .f_contiguous()?
                .f_permute([0, 3, 1, 2])?
        } else {
            x
        };
        x.f_to_device(self.device)
    }

    /// Probabilities for a batch already on the device, in f32, on the CPU.
    fn probabilities(&mut self, x: Tensor) -> anyhow::Result<Tensor> {
        let x = x.f_to_kind(self.kind)?;
        let logits = self.program.run(&x)?;
        Ok(logits
            .f_to_kind(Kind::Float)?
            .f_softmax(-1, Kind::Float)?
            .f_to_device(Device::Cpu)?)
    }
}

impl Classifier for TorchClassifier {
    fn forward(&mut self, pixels: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
        self.check_len(pixels.len(), n)?;
        let probs = self.probabilities(self.normalised_pixels(pixels, n)?)?;
        self.flatten(probs, n)
    }

    fn forward_tensor(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        self.check_len(input.len(), n)?;
        let probs = self.probabilities(self.tensor_input(input, n)?)?;
        self.flatten(probs, n)
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn input_size(&self) -> usize {
        self.size as usize
    }

    fn padded_batch(&self, n: usize) -> usize {
        // cuDNN tunes per shape: keep to a few warmed shapes on CUDA. On CPU padding only costs.
        // Never past what an AOTInductor package takes.
        if self.device.is_cuda() {
            let padded = n.next_power_of_two();
            match self.program {
                Program::Aoti(_, Some(max)) => padded.min(max).max(n),
                _ => padded,
            }
        } else {
            n
        }
    }
}

impl TorchClassifier {
    fn check_len(&self, len: usize, n: usize) -> anyhow::Result<()> {
        let expected = n * (self.size as usize).pow(2) * 3;
        if len != expected {
            bail!(
                "{len} input values for {n} images of {}x{}",
                self.size,
                self.size
            );
        }
        Ok(())
    }

    fn flatten(&self, probs: Tensor, n: usize) -> anyhow::Result<Vec<f32>> {
        let dims = probs.size();
        if dims != [n as i64, self.classes as i64] {
            bail!(
                "model output has shape {dims:?}, expected [{n}, {}] (one score per label in metadata.json)",
                self.classes
            );
        }
        Ok(Vec::<f32>::try_from(probs.f_flatten(0, -1)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_layout_is_recognised() {
        // [N, C, H, W] = [2, 3, 4, 5]
        assert!(is_channels_last(&[2, 3, 4, 5], &[60, 1, 15, 3]));
        assert!(!is_channels_last(&[2, 3, 4, 5], &[60, 20, 5, 1]));
        // 1x1 kernels: the size-1 dimensions' strides do not matter.
        assert!(is_channels_last(&[128, 64, 1, 1], &[64, 1, 1, 1]));
        assert!(!is_channels_last(&[128, 64, 1, 1], &[64, 2, 1, 1]));
    }

    #[test]
    fn bf16_needs_a_cpu_that_computes_it_natively() {
        let zen3 = ["avx2"];
        let err = check_native_bf16("resnet18", &zen3)
            .unwrap_err()
            .to_string();
        for needle in [
            "resnet18",
            "avx512_bf16",
            "--precision fp32",
            "--allow-emulated-bf16",
            "avx2",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert!(check_native_bf16("m", &[]).is_err());
        assert!(check_native_bf16("m", &["avx2", "avx512f", "avx512_bf16"]).is_ok());
        assert!(check_native_bf16("m", &["amx_bf16"]).is_ok());
    }

    fn package(precision: &str) -> ModelMetadata {
        serde_json::from_str(&format!(
            r#"{{"name":"m","labels":["a"],"format":"aoti","device":"cpu","precision":"{precision}",
                "max_batch":16,"torch_version":"2.11.0","cpu_flags":["avx512f","amx_tile"]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_package_runs_only_where_it_was_compiled_for() {
        let flags: Vec<String> = ["avx2", "avx512f", "amx_tile"].map(String::from).to_vec();
        let ok =
            |m: &ModelMetadata, d, b, v: &str, f: Option<&[String]>| check_package(m, d, b, v, f);
        let m = package("fp32");
        ok(&m, Device::Cpu, 16, "2.11.0", Some(&flags)).unwrap();
        // A patch release of the same minor version runs it; unknown flags are not checked.
        ok(&m, Device::Cpu, 8, "2.11.1", None).unwrap();
        let err = |r: anyhow::Result<()>| r.unwrap_err().to_string();
        let e = err(ok(&m, Device::Cuda(0), 8, "2.11.0", Some(&flags)));
        assert!(
            e.contains("compiled for cpu") && e.contains("--device cpu"),
            "{e}"
        );
        let e = err(ok(&m, Device::Cpu, 8, "2.10.0", Some(&flags)));
        assert!(
            e.contains("torch 2.11.0") && e.contains("libtorch 2.10.0"),
            "{e}"
        );
        let e = err(ok(&m, Device::Cpu, 32, "2.11.0", Some(&flags)));
        assert!(
            e.contains("at most 16") && e.contains("--max-batch-size"),
            "{e}"
        );
        let avx2: Vec<String> = vec!["avx2".into()];
        let e = err(ok(&m, Device::Cpu, 8, "2.11.0", Some(&avx2)));
        assert!(e.contains("lacks avx512f, amx_tile"), "{e}");
    }

    #[test]
    fn a_package_computes_in_its_own_precision() {
        let m = package("bf16");
        assert_eq!(
            package_precision(&m, Precision::Fp32).unwrap(),
            Precision::Bf16
        );
        assert_eq!(
            package_precision(&m, Precision::Bf16).unwrap(),
            Precision::Bf16
        );
        let e = package_precision(&m, Precision::Fp16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("compiled for bf16") && e.contains("--precision fp16"),
            "{e}"
        );
        let m = package("int4");
        assert!(package_precision(&m, Precision::Fp32).is_err());
    }

    #[test]
    fn cpu_device_always_resolves() {
        assert_eq!(resolve_device(DeviceRequest::Cpu).unwrap(), Device::Cpu);
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }

    #[test]
    fn cuda_without_gpu_is_an_error_that_says_why() {
        if tch::Cuda::is_available() {
            eprintln!("SKIP: a GPU is present; this checks the error on machines without one");
            return;
        }
        let err = resolve_device(DeviceRequest::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(err.contains("CUDA"), "{err}");
    }
}
