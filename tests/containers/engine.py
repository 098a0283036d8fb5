"""Docker and compose through their command lines, for tests/containers: running commands,
inspecting images and containers, waiting for Docker's health status, and a compose project
with its ports and environment. The fixtures built on these are in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import ROOT

CPU_IMAGE = os.environ.get("CPU_IMAGE", "tch-serve:cpu")
GPU_IMAGE = os.environ.get("GPU_IMAGE", "tch-serve:gpu")
# The runtime stage's base, which the CPU image's size budget is counted above.
BASE_IMAGE = "debian:bookworm-slim"
# Logs, copies and figures of the container tests.
WORK = ROOT / "target" / "test-logs" / "containers"
# The parameters of a test run on each image, for the indirect `image` fixture: gpu is marked
# `gpu`, so SKIP_GPU=1 deselects it and the GPU image is not built.
IMAGES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]

# Where each tool comes from: the project venv (tests/requirements.txt) beside this Python.
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """The venv's copy of a tool, else the one on PATH."""
    candidate = VENV_BIN / name
    if candidate.exists() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, cwd: Path = ROOT,
        check: bool = False) -> subprocess.CompletedProcess:
    """Runs `cmd` from the repository root; stdout and stderr captured as text."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=None if env is None else {**os.environ, **env})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{tail(r.stdout + r.stderr)}")
    return r


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def docker(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    return run(["docker", *args], timeout=timeout, check=check)


def inspect(name: str, fmt: str, kind: str = "") -> str:
    """`docker [image] inspect -f FMT NAME`, stripped; "" when it does not exist."""
    args = ["image", "inspect"] if kind == "image" else ["inspect"]
    r = docker(*args, "-f", fmt, name, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else ""


def inspect_json(name: str, kind: str = "") -> dict:
    args = ["image", "inspect"] if kind == "image" else ["inspect"]
    r = docker(*args, name, timeout=60, check=True)
    return json.loads(r.stdout)[0]


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, timeout=60).returncode == 0


def health(name: str) -> str:
    """Docker's health status of a container (healthy, starting, unhealthy), "" without one."""
    return inspect(name, "{{if .State.Health}}{{.State.Health.Status}}{{end}}")


def running(name: str) -> bool:
    return inspect(name, "{{.State.Running}}") == "true"


def wait_healthy(name: str, timeout: float = 180) -> float | None:
    """Seconds until the container's health status is `healthy`; None when it stopped
    running or the time ran out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if health(name) == "healthy":
            return time.monotonic() - t0
        if not running(name):
            return None
        time.sleep(0.5)
    return None


def logs(name: str, lines: int = 30) -> str:
    r = docker("logs", "--tail", str(lines), name, timeout=60)
    return (r.stdout + r.stderr).rstrip()


def remove(*names: str) -> None:
    """docker rm -f, whatever state they are in (or none)."""
    if names:
        docker("rm", "-f", *names, timeout=120)


def in_image(image: str, *cmd: str, entrypoint: str = "/bin/sh", timeout: float = 120
             ) -> subprocess.CompletedProcess:
    """Runs a command in a throwaway container of `image` (removed afterwards)."""
    return docker("run", "--rm", "--network", "none", "--entrypoint", entrypoint, image, *cmd,
                  timeout=timeout)


class MemoryPeak:
    """A running container's peak memory in bytes, from its cgroup's own record (cgroup v2
    with the systemd or the cgroupfs driver, or cgroup v1's memory controller), read every
    50 ms from start() to stop(): the cgroup goes when the container stops (an OOM kill
    included), so the last reading before is kept. `peak` is None when no record is there."""

    def __init__(self, name: str):
        cid = inspect(name, "{{.Id}}")
        candidates = [f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.peak",
                      f"/sys/fs/cgroup/docker/{cid}/memory.peak",
                      f"/sys/fs/cgroup/memory/docker/{cid}/memory.max_usage_in_bytes",
                      f"/sys/fs/cgroup/memory/system.slice/docker-{cid}.scope/memory.max_usage_in_bytes"]
        self.path = next((Path(p) for p in candidates if Path(p).exists()), None)
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> None:
        try:
            value = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError, AttributeError):
            return
        self.peak = max(self.peak or 0, value)

    def _poll(self) -> None:
        while not self._done.wait(0.05):
            self._read()

    def start(self) -> "MemoryPeak":
        self._thread.start()
        return self

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        self._read()
        return self.peak


def mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB ({n / 1048576:.1f} MiB)"


class Compose:
    """One compose project of docker-compose.yml (and overrides) with its own host ports:
    `docker compose` when the CLI plugin is there, else the venv's docker-compose."""

    def __init__(self, project: str, files: list[str], env: dict[str, str]):
        self.project, self.files, self.env = project, files, env
        if run(["docker", "compose", "version"], timeout=30).returncode == 0:
            self.cmd = ["docker", "compose"]
        else:
            binary = tool("docker-compose")
            if binary is None:
                raise RuntimeError("no docker compose plugin and no docker-compose "
                                   "(tests/requirements.txt installs it)")
            self.cmd = [binary]

    def __call__(self, *args: str, timeout: float = 300, files: list[str] | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        fargs = [a for f in (files or self.files) for a in ("-f", f)]
        return run([*self.cmd, "-p", self.project, *fargs, *args], timeout=timeout,
                   env={**self.env, **(env or {})})

    def container(self, service: str) -> str:
        """The id of the service's container ("" when it has none)."""
        return self("ps", "-q", service, timeout=60).stdout.strip()

    def down(self) -> subprocess.CompletedProcess:
        return self("down", "-v", "--remove-orphans", timeout=180)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of the project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for what in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            r = docker(*what, "--filter", label, timeout=60)
            found += r.stdout.split()
        return found

