"""Fixtures of the container tests: the Docker engine with its local base images, the two
images built from this checkout, containers and compose projects started for a test (or a
module) and removed after it whatever happens, and the figures the tests measure, printed at
the end of the run and kept in target/test-logs/containers/figures.json.

  CPU_IMAGE, GPU_IMAGE   the tags built and tested (tch-serve:cpu, tch-serve:gpu)
  SKIP_GPU=1             deselects the tests marked `gpu` (the GPU image is not built)
  HOST_CA                CA bundle for the builds when certs/ holds no *.crt
                         (/etc/ssl/certs/ca-certificates.crt; scripts/build-images.sh
                         copies it; see certs/README.md)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from containers import engine
from containers.engine import BASE_IMAGE, CPU_IMAGE, GPU_IMAGE, WORK
from harness import ROOT, free_port

# ---------------------------------------------------------------- figures ---

# What the tests measured: a nested dict for figures.json, and the lines printed at the end.
FIGURES: dict = {}
FIGURE_LINES: list[str] = []


def record(path: str | tuple, value, line: str | None = None) -> None:
    """Keeps `value` at `path` ("a.b.c", or a tuple of keys) in figures.json and, with
    `line`, prints it in the run's summary."""
    node = FIGURES
    *parents, leaf = path.split(".") if isinstance(path, str) else path
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    if line:
        FIGURE_LINES.append(line)


@pytest.fixture(scope="session")
def figures():
    return record


def pytest_collection_modifyitems(config, items):
    """SKIP_GPU=1: the tests marked `gpu` are deselected, so the GPU image is not built."""
    if os.environ.get("SKIP_GPU") != "1":
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_sessionfinish(session, exitstatus):
    if FIGURES:
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "figures.json").write_text(json.dumps(FIGURES, indent=2, default=str) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURE_LINES:
        return
    rel = (WORK / "figures.json").relative_to(ROOT)
    terminalreporter.section(f"container figures ({rel})")
    for line in FIGURE_LINES:
        terminalreporter.write_line(line)


# ---------------------------------------------------------------- engine ----


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A running Docker engine and the base images the Dockerfiles start FROM, made locally
    when missing (scripts/docker-bases.sh); the engine's version."""
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "docker-bases.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run([str(ROOT / "scripts/docker-bases.sh")], stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT, timeout=3600).returncode
    if rc != 0:
        pytest.fail(f"scripts/docker-bases.sh exited {rc}:\n{engine.tail(log.read_text())}",
                    pytrace=False)
    version = engine.docker("info", "-f", "{{.ServerVersion}} ({{.Driver}})", timeout=60).stdout.strip()
    record("engine", {"version": version, "bases_s": round(time.monotonic() - t0, 1)})
    return version


# ---------------------------------------------------------------- images ----


@pytest.fixture(scope="session")
def vcs_ref() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


@dataclass
class Image:
    kind: str          # cpu or gpu
    tag: str
    dockerfile: str
    build_s: float
    log: Path
    size: int          # bytes, as the engine counts them
    base_size: int     # the runtime base's (debian:bookworm-slim)

    @property
    def above_base(self) -> int:
        return self.size - self.base_size


def build_image(kind: str, tag: str, dockerfile: str, vcs_ref: str) -> Image:
    """The image built by scripts/build-images.sh (docker build --network host --force-rm
    --build-arg VCS_REF=... -t TAG -f FILE .), as `make images` builds it: from Docker's layer
    cache when that ran first."""
    WORK.mkdir(parents=True, exist_ok=True)
    log = ROOT / "target" / "test-logs" / "images" / f"build-{kind}.log"
    cmd = [str(ROOT / "scripts/build-images.sh"), kind]
    env = dict(os.environ, CPU_IMAGE=CPU_IMAGE, GPU_IMAGE=GPU_IMAGE, SKIP_GPU="0")
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    took = time.monotonic() - t0
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode} (log {log.relative_to(ROOT)}):\n"
                    f"{engine.tail(r.stdout + r.stderr)}", pytrace=False)
    assert engine.inspect(tag, "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
                          kind="image") == vcs_ref, f"{tag} was not built from this checkout ({vcs_ref})"
    size = int(engine.inspect(tag, "{{.Size}}", kind="image"))
    base = int(engine.inspect(BASE_IMAGE, "{{.Size}}", kind="image"))
    image = Image(kind, tag, dockerfile, took, log, size, base)
    record(f"images.{kind}", {"tag": tag, "build_s": round(took, 1), "size_bytes": size,
                              "above_base_bytes": image.above_base})
    record(f"images.{kind}.log", str(log.relative_to(ROOT)),
           f"{kind.upper()} image build: {took:.1f} s (log: {log.relative_to(ROOT)}); "
           f"{engine.mb(size)} in all, {engine.mb(image.above_base)} above {BASE_IMAGE}")
    return image


@pytest.fixture(scope="session")
def cpu_image(docker_engine, vcs_ref) -> Image:
    return build_image("cpu", CPU_IMAGE, "Dockerfile", vcs_ref)


@pytest.fixture(scope="session")
def gpu_image(docker_engine, vcs_ref) -> Image:
    return build_image("gpu", GPU_IMAGE, "Dockerfile.gpu", vcs_ref)


@pytest.fixture
def image(request) -> Image:
    """The image a test is parametrized with (`kind`: cpu or gpu), built on first use."""
    return request.getfixturevalue(f"{request.param}_image")


# ------------------------------------------------------------ containers ----


@dataclass
class Container:
    name: str
    port: int          # the host port of its 8000, on 127.0.0.1

    def wait_healthy(self, timeout: float = 180) -> float:
        took = engine.wait_healthy(self.name, timeout)
        if took is None:
            raise AssertionError(f"{self.name} not healthy (status {engine.health(self.name)!r}, "
                                 f"running {engine.running(self.name)}):\n{engine.logs(self.name)}")
        return took


class Containers:
    """Containers started with `docker run -d`, each on a free port of 127.0.0.1; `remove()`
    removes every one (docker rm -f) and keeps its log."""

    def __init__(self, label: str):
        self.label = re.sub(r"[^a-zA-Z0-9_.-]+", "-", label)[-60:].strip("-.")
        self.started: list[Container] = []

    def run(self, image: str, *args: str, suffix: str = "", env: dict | None = None) -> Container:
        name = f"tch-serve-ct-{os.getpid()}-{self.label}{'-' + suffix if suffix else ''}"
        port = free_port()
        engine.remove(name)
        envs = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        container = Container(name, port)
        self.started.append(container)
        r = engine.docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", *envs, *args,
                          image, timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"docker run {name} exited {r.returncode}: {r.stderr.strip()}")
        return container

    def remove(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        for c in self.started:
            r = engine.docker("logs", c.name, timeout=60)
            if r.returncode == 0:
                (WORK / f"{c.name}.log").write_text(r.stdout + r.stderr)
        engine.remove(*(c.name for c in self.started))
        self.started.clear()


@pytest.fixture
def containers(request, docker_engine):
    """containers.run(image, *docker_run_args, env=...) for one test; all removed after it."""
    started = Containers(request.node.name)
    yield started
    started.remove()


@pytest.fixture(scope="module")
def module_containers(request, docker_engine):
    """The same for a whole module: removed when its last test has run."""
    started = Containers(Path(request.node.path).stem.removeprefix("test_"))
    yield started
    started.remove()
