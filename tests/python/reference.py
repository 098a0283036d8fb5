#!/usr/bin/env python3
"""Writes the test photos and the Python reference answers for them.

Photos come from scikit-image and scikit-learn (real photographs shipped inside those
packages). Each is saved as PNG (lossless) and JPEG (quality 92), plus a few format and mode
variants. For every file, the reference is what the project's peer design computes:
PIL `Image.open(...).convert("RGB")`, torchvision `Resize(resize)`, `CenterCrop(crop)`,
`ToTensor()`, `Normalize(mean, std)` (from the model's metadata.json), then the TorchScript
model's logits in fp32.

    python tests/python/reference.py --model-dir models/resnet18 --out target/test-data
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def photos() -> dict[str, np.ndarray]:
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    out = {
        "chelsea": d.chelsea(),
        "coffee": d.coffee(),
        "astronaut": d.astronaut(),
        "rocket": d.rocket(),
        "hubble": d.hubble_deep_field(),
        "immunohistochemistry": d.immunohistochemistry(),
        "camera": d.camera(),  # grayscale
        "page": d.page(),  # grayscale, non-square
    }
    for name, img in zip(["china", "flower"], load_sample_images().images):
        out[name] = img
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="models/resnet18")
    p.add_argument("--out", default="target/test-data")
    args = p.parse_args()

    with open(os.path.join(args.model_dir, "metadata.json")) as f:
        meta = json.load(f)
    model = torch.jit.load(os.path.join(args.model_dir, meta.get("file", "model.pt")), map_location="cpu").eval()
    tf = transforms.Compose([
        transforms.Resize(meta["resize_size"]),
        transforms.CenterCrop(meta["input_size"]),
        transforms.ToTensor(),
        transforms.Normalize(meta["mean"], meta["std"]),
    ])

    photo_dir = os.path.join(args.out, "photos")
    os.makedirs(photo_dir, exist_ok=True)
    files = []
    for name, arr in photos().items():
        img = Image.fromarray(arr)
        for ext, kwargs in (("png", {}), ("jpg", {"quality": 92})):
            path = os.path.join(photo_dir, f"{name}.{ext}")
            img.save(path, **kwargs)
            files.append(path)
    # Other formats and modes, from one photo.
    chelsea = Image.fromarray(photos()["chelsea"])
    variants = {
        "chelsea.webp": (chelsea, {"lossless": True}),
        "chelsea.bmp": (chelsea, {}),
        "chelsea_rgba.png": (chelsea.convert("RGBA"), {}),
        "chelsea_gray.png": (chelsea.convert("L"), {}),
        "chelsea_palette.gif": (chelsea.convert("P"), {}),
    }
    for fname, (img, kwargs) in variants.items():
        path = os.path.join(photo_dir, fname)
        img.save(path, **kwargs)
        files.append(path)

    refs = []
    with torch.inference_mode():
        for path in files:
            img = Image.open(path).convert("RGB")
            x = tf(img).unsqueeze(0)
            logits = model(x)[0]
            refs.append({
                "file": os.path.relpath(path, args.out),
                "width": img.width,
                "height": img.height,
                "logits": [float(v) for v in logits],
                "top5": [int(i) for i in torch.topk(logits, 5).indices],
            })
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"model_dir": args.model_dir, "torch": torch.__version__, "images": refs}, f)
    print(f"wrote {len(refs)} reference answers to {args.out}/reference.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
