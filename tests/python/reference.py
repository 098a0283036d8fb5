#!/usr/bin/env python3
"""Writes the test photos and the Python reference answers for them.

Photos come from scikit-image and scikit-learn (real photographs shipped inside those
packages). Each is saved as PNG (lossless) and JPEG (quality 92), plus a few format and mode
variants. For every file, the reference is what the project's peer design computes:
PIL `Image.open(...).convert("RGB")`, torchvision `Resize(resize)`, `CenterCrop(crop)`,
`ToTensor()`, `Normalize(mean, std)` (from the model's metadata.json), then the TorchScript
model's logits in fp32.

    python tests/python/reference.py --model-dir models/resnet18 --out target/test-data
    python tests/python/reference.py --model-dir models/resnet18 --repository models --out target/test-data

--model-dir writes OUT/photos/ and OUT/reference.json for that model. --repository also writes
OUT/accuracy/ (the accuracy set of tests/data/accuracy.json as PNG, grayscale PNG and JPEG)
and, for every model in the repository, OUT/<model>/reference.json: the logits for every photo
and accuracy file, each file's top 5 with probabilities, and the top-1/top-5 counts on the
accuracy set, which it prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "models"))
import photos as photo_library  # noqa: E402  (models/photos.py)

ACCURACY_JSON = os.path.join(ROOT, "tests", "data", "accuracy.json")
TEST_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble", "immunohistochemistry",
               "camera", "page", "china", "flower")
# How each accuracy photo is written: the Rust tests send each file as it is.
ACCURACY_VARIANTS = {
    "png": ("png", lambda img: img, {}),
    "gray": ("png", lambda img: img.convert("L"), {}),
    "jpeg": ("jpg", lambda img: img, {"quality": 92}),
}


def photos() -> dict[str, np.ndarray]:
    return {name: photo_library.load(name) for name in TEST_PHOTOS}


def load_model(model_dir: str):
    with open(os.path.join(model_dir, "metadata.json")) as f:
        meta = json.load(f)
    if meta.get("format") == "aoti":
        model = torch._inductor.aoti_load_package(os.path.join(model_dir, meta.get("file", "model.pt2")))
    else:
        model = torch.jit.load(os.path.join(model_dir, meta.get("file", "model.pt")), map_location="cpu").eval()
    interpolation = transforms.InterpolationMode(meta.get("interpolation", "bilinear"))
    tf = transforms.Compose([
        transforms.Resize(meta.get("resize_size", 256), interpolation=interpolation),
        transforms.CenterCrop(meta.get("input_size", 224)),
        transforms.ToTensor(),
        transforms.Normalize(meta.get("mean", [0.485, 0.456, 0.406]), meta.get("std", [0.229, 0.224, 0.225])),
    ])
    return meta, model, tf


def answer(model, tf, path: str, out_dir: str) -> dict:
    # Upright by the EXIF orientation tag, as the server's --exif-orientation apply (its
    # default) does; files without the tag are unchanged.
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    with torch.inference_mode():
        logits = model(tf(img).unsqueeze(0))[0]
    top = torch.topk(torch.softmax(logits, 0), 5)
    return {
        "file": os.path.relpath(path, out_dir),
        "width": img.width,
        "height": img.height,
        "logits": [float(v) for v in logits],
        "top5": [int(i) for i in top.indices],
        "top5_probabilities": [float(v) for v in top.values],
    }


def write_photos(out: str) -> list[str]:
    photo_dir = os.path.join(out, "photos")
    os.makedirs(photo_dir, exist_ok=True)
    files = []
    arrays = photos()
    for name, arr in arrays.items():
        img = Image.fromarray(arr)
        for ext, kwargs in (("png", {}), ("jpg", {"quality": 92})):
            path = os.path.join(photo_dir, f"{name}.{ext}")
            img.save(path, **kwargs)
            files.append(path)
    # Other formats and modes, from one photo.
    chelsea = Image.fromarray(arrays["chelsea"])
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
    # As a phone stores a portrait photo: the pixels turned a quarter counter-clockwise, with the
    # EXIF orientation 6 ("turn 90 degrees clockwise to show") that puts it upright again.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = os.path.join(photo_dir, "chelsea_exif6.jpg")
    chelsea.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif.tobytes())
    files.append(path)
    return files


def write_accuracy_photos(out: str) -> list[dict]:
    """The accuracy set's photos in each variant: [{name, variant, file (path), expected}]."""
    with open(ACCURACY_JSON) as f:
        spec = json.load(f)
    acc_dir = os.path.join(out, "accuracy")
    os.makedirs(acc_dir, exist_ok=True)
    entries = []
    for photo in spec["photos"]:
        img = Image.fromarray(photo_library.load(photo["name"]))
        for variant, (ext, convert, kwargs) in ACCURACY_VARIANTS.items():
            suffix = "" if variant != "gray" else "_gray"
            path = os.path.join(acc_dir, f"{photo['name']}{suffix}.{ext}")
            convert(img).save(path, **kwargs)
            entries.append({"name": photo["name"], "variant": variant, "path": path,
                            "expected": photo["expected"]})
    return entries


def repository_models(repo: str) -> dict[str, str]:
    """name -> directory holding metadata.json (the highest numbered version, if versioned)."""
    found = {}
    for name in sorted(os.listdir(repo)):
        d = os.path.join(repo, name)
        if not os.path.isdir(d):
            continue
        if os.path.exists(os.path.join(d, "metadata.json")):
            found[name] = d
            continue
        versions = [v for v in os.listdir(d) if v.isdigit() and os.path.exists(os.path.join(d, v, "metadata.json"))]
        if versions:
            found[name] = os.path.join(d, max(versions, key=int))
    return found


def model_reference(name: str, model_dir: str, files: list[str], accuracy: list[dict], out: str) -> dict:
    meta, model, tf = load_model(model_dir)
    images = [answer(model, tf, path, out) for path in files]
    by_file = {}
    acc_rows = []
    for entry in accuracy:
        ref = answer(model, tf, entry["path"], out)
        images.append(ref)
        by_file[ref["file"]] = ref
        expected = set(entry["expected"])
        acc_rows.append({
            "name": entry["name"],
            "variant": entry["variant"],
            "file": ref["file"],
            "expected": entry["expected"],
            "top5": ref["top5"],
            "top5_labels": [meta["labels"][i] for i in ref["top5"]],
            "top5_probabilities": ref["top5_probabilities"],
            "top1_correct": ref["top5"][0] in expected,
            "top5_correct": bool(expected & set(ref["top5"])),
        })
    summary = {}
    for variant in ACCURACY_VARIANTS:
        rows = [r for r in acc_rows if r["variant"] == variant]
        summary[variant] = {"photos": len(rows), "top1": sum(r["top1_correct"] for r in rows),
                            "top5": sum(r["top5_correct"] for r in rows)}
    return {
        "model": name,
        "model_dir": model_dir,
        "torch": torch.__version__,
        "trained": meta.get("trained", True),
        "quantized": meta.get("quantized", False),
        "preprocessing": {k: meta.get(k) for k in ("resize_size", "input_size", "interpolation", "mean", "std")},
        "images": images,
        "accuracy": {"expected_from": os.path.relpath(ACCURACY_JSON, ROOT), "summary": summary, "photos": acc_rows},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="models/resnet18")
    p.add_argument("--repository", default=None,
                   help="also write OUT/<model>/reference.json for every model in this repository")
    p.add_argument("--out", default="target/test-data")
    args = p.parse_args()

    files = write_photos(args.out)
    meta, model, tf = load_model(args.model_dir)
    refs = [answer(model, tf, path, args.out) for path in files]
    for r in refs:
        del r["top5_probabilities"]  # the file's format stays as the parity test knows it
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"model_dir": args.model_dir, "torch": torch.__version__, "images": refs}, f)
    print(f"wrote {len(refs)} reference answers to {args.out}/reference.json")

    if args.repository:
        accuracy = write_accuracy_photos(args.out)
        for name, model_dir in repository_models(args.repository).items():
            ref = model_reference(name, model_dir, files, accuracy, args.out)
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            with open(os.path.join(args.out, name, "reference.json"), "w") as f:
                json.dump(ref, f)
            counts = ", ".join(f"{v} top-1 {s['top1']}/{s['photos']} top-5 {s['top5']}/{s['photos']}"
                               for v, s in ref["accuracy"]["summary"].items())
            note = "" if ref["trained"] else " (untrained: chance level expected)"
            print(f"{name}: {len(ref['images'])} reference answers to {args.out}/{name}/reference.json; "
                  f"accuracy set: {counts}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
