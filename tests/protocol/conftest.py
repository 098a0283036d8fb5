"""What the protocol tests share: where the server is, the photos, /predict as the reference.

scripts/protocol-test.sh starts the release binary on the repository `models/` and sets:
  TCH_SERVE_HTTP   host:port of the HTTP port (REST, /predict)
  TCH_SERVE_GRPC   host:port of the gRPC port
  TCH_SERVE_PHOTOS folder of the accuracy photos (target/test-data/accuracy)
  TCH_SERVE_MODELS folder of the model repository (for metadata.json)
"""

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = "efficientnet_lite0"


def env(name):
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: run scripts/protocol-test.sh")
    return value


@pytest.fixture(scope="session")
def http_url():
    return env("TCH_SERVE_HTTP")


@pytest.fixture(scope="session")
def grpc_url():
    return env("TCH_SERVE_GRPC")


@pytest.fixture(scope="session")
def accuracy():
    """(name, file bytes, acceptable classes) of each accuracy photo, JPEG."""
    photos = Path(env("TCH_SERVE_PHOTOS"))
    spec = json.loads((ROOT / "tests/data/accuracy.json").read_text())
    return [
        (p["name"], (photos / f"{p['name']}.jpg").read_bytes(), set(p["expected"]))
        for p in spec["photos"]
    ]


@pytest.fixture(scope="session")
def metadata():
    models = Path(env("TCH_SERVE_MODELS"))
    return json.loads((models / PRETRAINED / "metadata.json").read_text())


def predict(http_url, image, model=PRETRAINED, top_k=5):
    """/predict's answer for one image: [(index, probability)], best first."""
    req = urllib.request.Request(
        f"http://{http_url}/predict?model={model}&top_k={top_k}",
        data=image,
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.load(r)
    return [(p["index"], p["probability"]) for p in body["results"][0]["predictions"]]


def top(probs, k=5):
    """[(index, probability)] of the k best classes."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


def assert_same_ranking(got, want, tol=1e-5, what=""):
    assert [i for i, _ in got] == [i for i, _ in want], f"{what}: {got} vs {want}"
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) <= tol, f"{what}: {got} vs {want}"


def preprocess(image_bytes, meta):
    """The model's input tensor, made in Python as torchvision's Resize + CenterCrop +
    Normalize make it (PIL bilinear resize of the shorter side, centre crop)."""
    import io

    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    w, h = img.size
    size, crop = meta["resize_size"], meta["input_size"]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top_ = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    img = img.crop((left, top_, left + crop, top_ + crop))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(meta["mean"], dtype=np.float32)) / np.array(meta["std"], dtype=np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)
