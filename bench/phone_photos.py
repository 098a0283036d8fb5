#!/usr/bin/env python3
"""Phone-sized JPEG photos for the benchmark, made from real photographs, deterministically.

    .venv/bin/python bench/phone_photos.py [--out target/phone-photos]

Writes OUT/3mp/*.jpg (2016x1512) and OUT/12mp/*.jpg (4032x3024), the sizes phones write at
3 and 12 megapixels, and OUT/manifest.json (file sizes, dimensions, EXIF orientation). A
second run with the same packages writes the same bytes (everything is seeded); it takes about
20 s on 2 cores.

How each photo is made:

1. Source: six real photographs shipped inside scikit-image (`chelsea`, `coffee`, `astronaut`,
   `rocket`) and scikit-learn (`load_sample_images()`: `china`, `flower`), 451x300 to 640x427.
2. Crop the centre to 4:3 (landscape) or 3:4 (portrait: `astronaut` and `rocket`).
3. Upscale to the target size with Pillow's Lanczos filter (`Image.LANCZOS`), a factor of
   about 3 to 5 (3 MP) and 7 to 10 (12 MP).
4. Add sensor-like noise, seeded (`numpy.random.default_rng(seed)`, seed from the photo's
   name and size): per pixel, a luminance component shared by the three channels with a
   standard deviation of 8 * sqrt(0.3 + mean(R, G, B) / 255) levels (signal-dependent, as
   photon shot noise plus read noise), plus an independent chroma component of 3 levels per
   channel. An upscaled image alone has almost no fine detail and compresses several times
   smaller than a phone's photo of the same size; the noise gives back the high-frequency
   content that makes a phone JPEG 1 to 5 MB.
5. Save as baseline JPEG with Pillow at quality 90, 4:2:0 chroma subsampling, with an EXIF
   block (Make, Model, DateTime, Orientation). Portrait photos are stored the way phones
   store them: the pixels rotated 90 degrees counter-clockwise into a landscape buffer, with
   EXIF Orientation 6 ("rotate 90 CW to display"); applying the orientation gives back the
   upright portrait photo. Landscape photos carry Orientation 1.

Resulting sizes (Pillow 13, x86-64): 3 MP 0.9 to 1.2 MB, 12 MP 3.4 to 4.3 MB.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"3mp": (2016, 1512), "12mp": (4032, 3024)}
# name -> portrait (stored rotated with EXIF Orientation 6)
PHOTOS = {"chelsea": False, "coffee": False, "china": False, "flower": False,
          "astronaut": True, "rocket": True}
LUMA_NOISE = 8.0
CHROMA_NOISE = 3.0
QUALITY = 90
ORIENTATION_TAG = 0x0112


def sources() -> dict[str, np.ndarray]:
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    out = {"chelsea": d.chelsea(), "coffee": d.coffee(), "astronaut": d.astronaut(), "rocket": d.rocket()}
    for name, img in zip(["china", "flower"], load_sample_images().images):
        out[name] = img
    return out


def crop_to(img: Image.Image, aspect_w: int, aspect_h: int) -> Image.Image:
    w, h = img.size
    if w * aspect_h > h * aspect_w:  # too wide
        cw = h * aspect_w // aspect_h
        return img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    ch = w * aspect_h // aspect_w
    return img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))


def seed_of(name: str, size: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}/{size}".encode()).digest()[:8], "little")


def upright_photo(src: np.ndarray, width: int, height: int, seed: int) -> Image.Image:
    """Steps 2 to 4: the photo as it should be displayed, width x height."""
    img = crop_to(Image.fromarray(src).convert("RGB"), width, height).resize((width, height), Image.LANCZOS)
    a = np.asarray(img, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sigma = LUMA_NOISE * np.sqrt(0.3 + a.mean(axis=2, keepdims=True) / 255.0)
    a = a + rng.standard_normal((height, width, 1), dtype=np.float32) * sigma
    a = a + rng.standard_normal((height, width, 3), dtype=np.float32) * CHROMA_NOISE
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def jpeg(upright: Image.Image, portrait: bool) -> bytes:
    """Step 5: a portrait photo is stored rotated, with Orientation 6."""
    stored = upright.transpose(Image.Transpose.ROTATE_90) if portrait else upright
    exif = Image.Exif()
    exif[0x010F] = "tch-serve"  # Make
    exif[0x0110] = "bench/phone_photos.py"  # Model
    exif[0x0132] = "2024:01:01 12:00:00"  # DateTime
    exif[ORIENTATION_TAG] = 6 if portrait else 1
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=QUALITY, subsampling=2, exif=exif.tobytes())
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "phone-photos"))
    args = ap.parse_args()
    src = sources()
    manifest = []
    for size, (w, h) in SIZES.items():
        folder = os.path.join(args.out, size)
        os.makedirs(folder, exist_ok=True)
        for name, portrait in PHOTOS.items():
            upright = upright_photo(src[name], h if portrait else w, w if portrait else h, seed_of(name, size))
            data = jpeg(upright, portrait)
            # The stored photo, displayed as its EXIF orientation says, is the upright one.
            shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            assert shown.size == upright.size, (name, size, shown.size, upright.size)
            path = os.path.join(folder, f"{name}.jpg")
            with open(path, "wb") as f:
                f.write(data)
            stored_w, stored_h = Image.open(io.BytesIO(data)).size
            manifest.append({"file": os.path.relpath(path, args.out), "size": size, "bytes": len(data),
                             "stored": [stored_w, stored_h], "displayed": list(upright.size),
                             "orientation": 6 if portrait else 1, "source": name})
            print(f"{path}: {stored_w}x{stored_h}, orientation {6 if portrait else 1}, {len(data) / 1e6:.2f} MB", flush=True)
    method = {"filter": "Lanczos", "luma_noise": LUMA_NOISE, "chroma_noise": CHROMA_NOISE, "quality": QUALITY,
              "subsampling": "4:2:0", "portrait_orientation": 6}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"method": method, "files": manifest}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
