"""Fixtures the Python suites share: the release binary, the exported model, the test photo,
a folder for each test's logs, and servers started for a test and stopped after it, whatever
happens. What is missing is a failure that names the make target that makes it, never a skip.

  TCH_SERVE_BIN        the server binary (target/release/tch-serve; `make build`)
  TCH_SERVE_MODEL_DIR  the exported model the servers serve (models/resnet18; `make model`)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness import ROOT, Server


def _required(path: Path, make: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make {make}`", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tch_serve_bin() -> Path:
    return _required(Path(os.environ.get("TCH_SERVE_BIN") or ROOT / "target/release/tch-serve"), "build")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = Path(os.environ.get("TCH_SERVE_MODEL_DIR") or ROOT / "models/resnet18")
    _required(path / "model.pt", "model")
    return path


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """A real photo: scikit-image's chelsea, 451x300 JPEG (`make test-data`)."""
    return _required(ROOT / "target/test-data/photos/chelsea.jpg", "test-data")


@pytest.fixture(scope="session")
def photo(photo_path) -> bytes:
    return photo_path.read_bytes()


@pytest.fixture
def logs(request) -> Path:
    """target/test-logs/<suite>/<test>/: where a test's servers and tools write."""
    suite = Path(request.node.path).parent.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:120]
    path = ROOT / "target" / "test-logs" / suite / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def start_server(tch_serve_bin, model_dir, logs):
    """start_server(name, args, **kw) starts the release binary on a free port (serving the
    exported model unless args name a model repository) and returns the Server; every server
    a test started is stopped (SIGTERM, then SIGKILL) when it ends."""
    started: list[Server] = []

    def start(name: str, args: list[str] | tuple = (), **kw) -> Server:
        server = Server(tch_serve_bin, logs / f"{name}.log", list(args), model_dir=model_dir, **kw)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop(timeout=30)
