#!/usr/bin/env python3
"""An int8 export against its fp32 original: answers, accuracy and raw forward-pass speed.

    .venv/bin/python models/export.py --arch efficientnet_lite0 --quantize int8 --out target/models/efficientnet_lite0_int8
    .venv/bin/python bench/quantized.py --fp32 models/efficientnet_lite0 --int8 target/models/efficientnet_lite0_int8

Both models are loaded with torch.jit.load, as the server loads them. Prints:
- the CPU (model name and the SIMD flags that decide int8 and bf16 speed) and torch's threads;
- top-1 agreement of int8 with fp32 on views of the photos shipped with scikit-image and
  scikit-learn (the center crop of each and random crops, with a seed the calibration does not
  use), split into the accuracy set's photos and the others (textures, microscopy, ...);
- top-1/top-5 of both on the accuracy set (tests/data/accuracy.json);
- images/s of the raw forward pass at each batch size for fp32 (contiguous and channels-last),
  bf16 (what the server's --precision bf16 runs) and int8, measured in interleaved rounds in
  this one run (medians), and int8/fp32 ratios.
Figures from one machine say nothing of another: compare ratios, on the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from PIL import Image
from torchvision import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))
import photos  # noqa: E402

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_summary() -> str:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS_OF_INTEREST if f in flags]
    missing = [f for f in FLAGS_OF_INTEREST if f not in flags]
    return f"{model}; {os.cpu_count()} CPUs; flags: {' '.join(have) or '-'} (not: {' '.join(missing) or '-'})"


def load(model_dir: str):
    with open(os.path.join(model_dir, "metadata.json")) as f:
        meta = json.load(f)
    model = torch.jit.load(os.path.join(model_dir, meta.get("file", "model.pt")), map_location="cpu").eval()
    return meta, model


def views(meta: dict, names, random_views: int, seed: int) -> torch.Tensor:
    interp = T.InterpolationMode(meta.get("interpolation", "bilinear"))
    center = T.Compose([T.Resize(meta["resize_size"], interpolation=interp), T.CenterCrop(meta["input_size"])])
    crop = T.Compose([T.RandomResizedCrop(meta["input_size"], scale=(0.2, 1.0), interpolation=interp),
                      T.RandomHorizontalFlip()])
    tensor = T.Compose([T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])
    torch.manual_seed(seed)
    out = []
    for name in names:
        img = Image.fromarray(photos.load(name)).convert("RGB")
        out.append(tensor(center(img)))
        out.extend(tensor(crop(img)) for _ in range(random_views))
    return torch.stack(out)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in x.split(16)])


def images_per_s(model, batch: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        model(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(batch)
            n += 1
        return n * batch.shape[0] / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", default="models/efficientnet_lite0")
    p.add_argument("--int8", required=True)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--views", type=int, default=4, help="random crops per photo for the agreement")
    args = p.parse_args()

    print(f"cpu: {cpu_summary()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
          f"{torch.backends.quantized.engine}")
    meta_f, fp32 = load(args.fp32)
    meta_q, int8 = load(args.int8)
    if not meta_q.get("quantized"):
        raise SystemExit(f"{args.int8}: metadata.json does not say it is quantized")
    for k in ("input_size", "resize_size", "mean", "std"):
        if meta_f[k] != meta_q[k]:
            raise SystemExit(f"the two models preprocess differently ({k})")

    # Agreement: seed 1000 for the random views (calibration uses --seed, 0 by default).
    groups = {
        "accuracy-set photos": list(photos.ACCURACY_SET),
        "other photos": [n for n in photos.PHOTOS if n not in photos.ACCURACY_SET],
    }
    print(f"\ntop-1 agreement of int8 with fp32 (center crop + {args.views} random crops per photo):")
    for label, names in groups.items():
        x = views(meta_f, names, args.views, seed=1000)
        lf, lq = logits(fp32, x), logits(int8, x)
        agree = (lf.argmax(1) == lq.argmax(1)).float()
        pf = lf.softmax(1)
        confident = pf.max(1).values > 0.3
        in_top5 = (lq.topk(5, 1).indices == lf.argmax(1, keepdim=True)).any(1).float()
        tv = 0.5 * (pf - lq.softmax(1)).abs().sum(1)
        print(f"  {label}: {int(agree.sum())}/{len(agree)} = {agree.mean():.1%}; where fp32 is confident "
              f"(p > 0.3): {int(agree[confident].sum())}/{int(confident.sum())}; fp32's top-1 in int8's top-5: "
              f"{in_top5.mean():.1%}; mean total-variation distance of the probabilities {tv.mean():.3f}")

    with open(os.path.join(ROOT, "tests", "data", "accuracy.json")) as f:
        spec = json.load(f)
    x = views(meta_f, [ph["name"] for ph in spec["photos"]], 0, seed=0)
    print("\naccuracy set (center crop, PIL + torchvision preprocessing):")
    for label, model in (("fp32", fp32), ("int8", int8)):
        top5 = logits(model, x).topk(5, 1).indices.tolist()
        t1 = sum(t[0] in ph["expected"] for t, ph in zip(top5, spec["photos"]))
        t5 = sum(bool(set(t) & set(ph["expected"])) for t, ph in zip(top5, spec["photos"]))
        print(f"  {label}: top-1 {t1}/{len(top5)}, top-5 {t5}/{len(top5)}")

    size = meta_f["input_size"]
    fp32_cl = torch.jit.load(os.path.join(args.fp32, meta_f.get("file", "model.pt")), map_location="cpu").eval()
    fp32_cl = fp32_cl.to(memory_format=torch.channels_last)  # as the server loads fp32 weights
    bf16_cl = torch.jit.load(os.path.join(args.fp32, meta_f.get("file", "model.pt")), map_location="cpu").eval()
    bf16_cl = bf16_cl.to(torch.bfloat16).to(memory_format=torch.channels_last)  # --precision bf16
    print(f"\nraw forward pass, images/s (median of {args.rounds} interleaved rounds of {args.seconds:.0f} s):")
    for b in [int(v) for v in args.batches.split(",")]:
        x = torch.randn(b, 3, size, size)
        configs = {"fp32": (fp32, x), "fp32 channels-last": (fp32_cl, x.contiguous(memory_format=torch.channels_last)),
                   "bf16 channels-last": (bf16_cl, x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)),
                   "int8": (int8, x)}
        runs = {k: [] for k in configs}
        for _ in range(args.rounds):
            for k, (model, inp) in configs.items():
                runs[k].append(images_per_s(model, inp, args.seconds))
        med = {k: statistics.median(v) for k, v in runs.items()}
        best_fp32 = max(med["fp32"], med["fp32 channels-last"])
        print(f"  batch {b}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
              + f"; int8/fp32 {med['int8'] / med['fp32']:.2f}x, int8/best fp32 {med['int8'] / best_fp32:.2f}x, "
              f"int8/bf16 {med['int8'] / med['bf16 channels-last']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
