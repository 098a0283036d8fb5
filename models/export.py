#!/usr/bin/env python3
"""Export a torchvision image classifier to TorchScript for tch-serve.

Writes DIR/model.pt (TorchScript: eval mode, batch-norm folded into the
convolutions, traced) and DIR/metadata.json (name, input geometry,
normalisation, class labels, whether the weights are trained).

    python models/export.py --arch resnet18 --out models/resnet18
    python models/export.py --arch resnet50 --weights DEFAULT --out models/resnet50

Without --weights the network is initialised deterministically from --seed:
it runs exactly like a trained one but its predictions are meaningless, and
the metadata says so (``"trained": false``), which /health reports.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch
import torchvision
from torch.fx.experimental.optimization import fuse as fuse_conv_bn
from torchvision.models import get_model, get_model_weights

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_categories() -> list[str]:
    # The class names ship inside torchvision's code: no download needed.
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def build(arch: str, weights: str | None, seed: int):
    if weights:
        enum = get_model_weights(arch)
        w = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
        model = get_model(arch, weights=w)
        categories = list(w.meta["categories"])
        tag = f"{enum.__name__}.{w.name}"
        transforms = w.transforms()
        resize = int(transforms.resize_size[0])
        crop = int(transforms.crop_size[0])
        return model, categories, tag, resize, crop
    torch.manual_seed(seed)
    model = get_model(arch, weights=None)
    return model, imagenet_categories(), None, 256, 224


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="torchvision model name (resnet18, resnet34, resnet50, ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", default=None,
                   help="torchvision pretrained weights (DEFAULT or a name such as IMAGENET1K_V1); "
                        "needs network access to download them. Omit for a deterministic untrained model.")
    p.add_argument("--seed", type=int, default=0, help="seed for the untrained model's initialisation")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    args = p.parse_args(argv)

    model_path = os.path.join(args.out, "model.pt")
    meta_path = os.path.join(args.out, "metadata.json")
    if not args.force and os.path.exists(model_path) and os.path.exists(meta_path):
        print(f"{model_path} exists; use --force to re-export")
        return 0

    model, categories, weights_tag, resize, crop = build(args.arch, args.weights, args.seed)
    model.eval()
    # Fold batch norm into the preceding convolutions (what torch.jit.freeze would do) while
    # keeping the weights as parameters, so the server can cast them to bf16/fp16 at load time.
    model = fuse_conv_bn(model)

    example = torch.randn(1, 3, crop, crop)
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=True)
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
    os.replace(tmp_path, model_path)
    with open(model_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()

    metadata = {
        "name": args.arch,
        "arch": args.arch,
        "format": "torchscript",
        "file": "model.pt",
        "sha256": sha256,
        "trained": weights_tag is not None,
        "weights": weights_tag or f"random-init(seed={args.seed})",
        "input_size": crop,
        "resize_size": resize,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "labels": categories,
        "torch_version": torch.__version__.split("+")[0],
        "torchvision_version": torchvision.__version__.split("+")[0],
    }
    with open(meta_path, "w") as f:
        json.dump(metadata, f, indent=1)
        f.write("\n")
    state = "pretrained " + weights_tag if weights_tag else f"UNTRAINED (seed {args.seed})"
    print(f"exported {args.arch} ({state}) to {model_path} [{os.path.getsize(model_path) / 1e6:.1f} MB]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
