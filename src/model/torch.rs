//! Loading, device, precision and the forward pass through libtorch: the only place that
//! touches tch.
//!
//! Everything here runs on the worker thread that owns the model; only plain bytes and floats
//! cross threads.

use std::path::Path;

use anyhow::{Context, bail};
use tch::{CModule, Device, Kind, Tensor};

use super::{Backend, Classifier, Loaded, ModelSpec};
use crate::config::{DeviceRequest, MemoryFormat, ModelSettings, Precision, parse_device};
use crate::metadata::ModelMetadata;

/// Builds [`TorchClassifier`]s from TorchScript files on the device their settings ask for.
#[derive(Debug, Default, Clone, Copy)]
pub struct TorchBackend;

impl Backend for TorchBackend {
    fn load(&self, spec: &ModelSpec) -> anyhow::Result<Loaded> {
        let s = &spec.settings;
        let device = resolve_device(parse_device(&s.device).map_err(anyhow::Error::msg)?)?;
        if device == Device::Cpu && s.precision == Precision::Bf16 && !s.allow_emulated_bf16 {
            check_native_bf16(&spec.name, crate::config::cpu_features())?;
        }
        let model =
            TorchClassifier::load(&spec.dir, &spec.meta, device, s.precision, s.memory_format)?;
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

/// A TorchScript classifier on one device.
pub struct TorchClassifier {
    module: CModule,
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
    /// Loads `model.pt` onto `device` and casts it to `precision`. Call on the inference thread,
    /// after the thread settings.
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
        let per_channel = |v: [f32; 3]| {
            Tensor::f_from_slice(&v)?
                .f_view([1, 3, 1, 1])?
                .f_to_device(device)
        };
        let scale = per_channel(std::array::from_fn(|c| 1.0 / (255.0 * meta.std[c])))?;
        let shift = per_channel(std::array::from_fn(|c| -meta.mean[c] / meta.std[c]))?;
        Ok(Self {
            module,
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
    pub fn weights_channels_last(&self) -> anyhow::Result<bool> {
        Ok(self
            .module
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
    fn probabilities(&self, x: Tensor) -> Result<Tensor, tch::TchError> {
        let x = x.f_to_kind(self.kind)?;
        let logits = self.module.forward_ts(&[x])?;
        logits
            .f_to_kind(Kind::Float)?
            .f_softmax(-1, Kind::Float)?
            .f_to_device(Device::Cpu)
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
        if self.device.is_cuda() {
            n.next_power_of_two()
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
