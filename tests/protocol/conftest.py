"""What the protocol tests share: the server, the photos, /predict as the reference.

The session's server is the release binary (TCH_SERVE_BIN, target/release/tch-serve) on the
model repository TCH_SERVE_MODELS (models/), resnet18 and the pretrained efficientnet_lite0 as
`make run` serves them, with --enable-model-control, HTTP and gRPC on free ports of 127.0.0.1.
The fixture starts it, waits for /v2/health/ready, and at the end of the session stops it with
SIGTERM: an exit status other than 0 within its shutdown timeout fails the session. Its log is
target/protocol-test/server-<pid>.log. With TCH_SERVE_HTTP and TCH_SERVE_GRPC (host:port) set,
the tests use that server instead and start none.

  TCH_SERVE_PHOTOS  folder of the accuracy photos (target/test-data/accuracy)
  TCH_SERVE_MODELS  the model repository (models/; for metadata.json too)

scripts/protocol-test.sh makes the venvs and runs the suites.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = "efficientnet_lite0"
SHUTDOWN_TIMEOUT_S = 10


def env(name, default=None):
    value = os.environ.get(name) or default
    if not value:
        pytest.skip(f"{name} is not set: run scripts/protocol-test.sh")
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(http):
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def server():
    """(HTTP host:port, gRPC host:port) of the server the session runs against."""
    if os.environ.get("TCH_SERVE_HTTP") and os.environ.get("TCH_SERVE_GRPC"):
        yield os.environ["TCH_SERVE_HTTP"], os.environ["TCH_SERVE_GRPC"]
        return
    binary = Path(os.environ.get("TCH_SERVE_BIN") or ROOT / "target/release/tch-serve")
    models = Path(os.environ.get("TCH_SERVE_MODELS") or ROOT / "models")
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: run `make build`")
    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    logs = ROOT / "target/protocol-test"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"server-{os.getpid()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "serve", "--model-repository", str(models), "--default-model", "resnet18",
             "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port),
             "--warmup-iterations", "1", "--enable-model-control",
             "--shutdown-timeout-secs", str(SHUTDOWN_TIMEOUT_S)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    http, grpc = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 120
        while not ready(http):
            if proc.poll() is not None:
                pytest.fail(f"the server exited at start with {proc.returncode} (log: {log_path})")
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 120 s (log: {log_path})")
            time.sleep(0.5)
        print(f"\nserver ready: HTTP {http}, gRPC {grpc} (log: {log_path})")
        yield http, grpc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        else:
            rc = proc.returncode
    assert rc == 0, f"the server's exit status after SIGTERM was {rc}, not 0 (log: {log_path})"


@pytest.fixture(scope="session")
def http_url(server):
    return server[0]


@pytest.fixture(scope="session")
def grpc_url(server):
    return server[1]


@pytest.fixture(scope="session")
def accuracy():
    """(name, file bytes, acceptable classes) of each accuracy photo, JPEG."""
    photos = Path(env("TCH_SERVE_PHOTOS", ROOT / "target/test-data/accuracy"))
    spec = json.loads((ROOT / "tests/data/accuracy.json").read_text())
    return [
        (p["name"], (photos / f"{p['name']}.jpg").read_bytes(), set(p["expected"]))
        for p in spec["photos"]
    ]


@pytest.fixture(scope="session")
def metadata():
    models = Path(env("TCH_SERVE_MODELS", ROOT / "models"))
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
