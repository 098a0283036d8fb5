//! Loading, device, precision, warm-up and the forward pass: the only place that touches tch.
//!
//! Everything here runs on the inference thread that owns the model; only plain `Vec<f32>`
//! crosses threads.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tch::{CModule, Device, Kind, Tensor};

use crate::config::{DeviceRequest, MemoryFormat, Precision};
use crate::metadata::ModelMetadata;

/// A batch classifier: `input` holds `n` images of `size * size * 3` floats (HWC); the result
/// holds `n * classes` probabilities.
pub trait Classifier {
    fn forward(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>>;
    fn num_classes(&self) -> usize;
    /// Batch sizes worth warming and padding to (all sizes on CPU, powers of two on CUDA).
    fn padded_batch(&self, n: usize) -> usize {
        n
    }
}

/// Where the model runs, as reported by /health and the build-info metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub is_cuda: bool,
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
        Ok(Self {
            module,
            device,
            kind,
            channels_last,
            size: i64::from(meta.input_size),
            classes: meta.labels.len(),
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

    fn forward_tensor(&self, input: &[f32], n: usize) -> Result<Tensor, tch::TchError> {
        let s = self.size;
        // HWC floats viewed as NHWC, permuted to an NCHW-shaped view with channels-last strides.
        let x = Tensor::f_from_slice(input)?
            .f_view([n as i64, s, s, 3])?
            .f_permute([0, 3, 1, 2])?;
        let x = if self.channels_last {
            x
        } else {
            x.f_contiguous()?
        };
        let x = x.f_to_device(self.device)?.f_to_kind(self.kind)?;
        let logits = self.module.forward_ts(&[x])?;
        logits
            .f_to_kind(Kind::Float)?
            .f_softmax(-1, Kind::Float)?
            .f_to_device(Device::Cpu)
    }
}

impl Classifier for TorchClassifier {
    fn forward(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        let probs = self.forward_tensor(input, n)?;
        let dims = probs.size();
        if dims != [n as i64, self.classes as i64] {
            bail!(
                "model output has shape {dims:?}, expected [{n}, {}] (one score per label in metadata.json)",
                self.classes
            );
        }
        Ok(Vec::<f32>::try_from(probs.f_flatten(0, -1)?)?)
    }

    fn num_classes(&self) -> usize {
        self.classes
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

/// Batch sizes run during warm-up: powers of two up to the largest batch, and the largest.
pub fn warmup_batch_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..)
        .map(|i| 1usize << i)
        .take_while(|&b| b < max_batch)
        .collect();
    sizes.push(max_batch);
    sizes
}

/// Runs `iterations` forward passes per warm-up batch size on a neutral input, so the first
/// real request is as fast as the hundredth. Returns the time taken.
pub fn warm_up(
    model: &mut dyn Classifier,
    input_size: u32,
    max_batch: usize,
    iterations: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let per_image = (input_size as usize).pow(2) * 3;
    let mut sizes: Vec<usize> = warmup_batch_sizes(max_batch)
        .into_iter()
        .map(|b| model.padded_batch(b))
        .collect();
    sizes.dedup();
    for &b in &sizes {
        let input = vec![0f32; b * per_image];
        for _ in 0..iterations.max(1) {
            let probs = model.forward(&input, b).context("warm-up forward pass")?;
            if probs.len() != b * model.num_classes() {
                bail!("warm-up produced {} scores for batch {b}", probs.len());
            }
        }
    }
    Ok(start.elapsed())
}

/// A stand-in classifier for fast tests of the HTTP layer: its scores are a deterministic
/// function of the image's per-channel means, and it can be made slow.
pub struct FakeClassifier {
    pub classes: usize,
    pub delay: Duration,
    pub input_size: usize,
}

impl Classifier for FakeClassifier {
    fn forward(&mut self, input: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
        std::thread::sleep(self.delay);
        let per = self.input_size * self.input_size * 3;
        if input.len() != n * per {
            bail!("fake classifier got {} floats for {n} images", input.len());
        }
        let mut out = Vec::with_capacity(n * self.classes);
        for img in input.chunks_exact(per) {
            let mut mean = [0f64; 3];
            for px in img.chunks_exact(3) {
                for c in 0..3 {
                    mean[c] += f64::from(px[c]);
                }
            }
            let pixels = (per / 3) as f64;
            let logits: Vec<f64> = (0..self.classes)
                .map(|k| {
                    let k = k as f64;
                    (mean[0] / pixels) * (k + 1.0).sin() * 3.0
                        + (mean[1] / pixels) * (k * 0.7).cos() * 2.0
                        + (mean[2] / pixels) * (k * 1.3 + 0.5).sin()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            out.extend(logits.iter().map(|l| ((l - max).exp() / sum) as f32));
        }
        Ok(out)
    }

    fn num_classes(&self) -> usize {
        self.classes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_sizes_cover_powers_of_two_and_the_max() {
        assert_eq!(warmup_batch_sizes(1), vec![1]);
        assert_eq!(warmup_batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(warmup_batch_sizes(12), vec![1, 2, 4, 8, 12]);
    }

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
    fn cpu_device_always_resolves() {
        assert_eq!(resolve_device(DeviceRequest::Cpu).unwrap(), Device::Cpu);
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }

    #[test]
    fn cuda_without_gpu_is_an_error_that_says_why() {
        if tch::Cuda::is_available() {
            return; // this check is about machines without a GPU
        }
        let err = resolve_device(DeviceRequest::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(err.contains("CUDA"), "{err}");
    }

    #[test]
    fn fake_classifier_is_deterministic_and_normalised() {
        let mut f = FakeClassifier {
            classes: 10,
            delay: Duration::ZERO,
            input_size: 2,
        };
        let a = vec![0.5f32; 12];
        let b = vec![-0.5f32; 12];
        let both: Vec<f32> = a.iter().chain(&b).copied().collect();
        let out = f.forward(&both, 2).unwrap();
        assert_eq!(out.len(), 20);
        assert!((out[..10].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(f.forward(&a, 1).unwrap(), out[..10].to_vec());
        assert_ne!(out[..10], out[10..]);
    }
}
