"""The CPU image run as a user runs it: the host's exported model mounted read-only on a
read-only root file system. It becomes healthy, answers real photos exactly as the same
server binary run outside the container on the same model file, runs as a non-root PID 1,
and ends cleanly on `docker stop` within the grace period (the last test of the module)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from containers import engine
from containers.engine import WORK
from harness import ROOT, Server, http_status, post_image

GRACE_S = 30
PHOTOS = ROOT / "target" / "test-data" / "photos"
# Real photos (`make test-data`) in the formats and modes the server decodes: JPEG, PNG (RGB,
# grayscale, RGBA) and a phone's EXIF-rotated JPEG.
PARITY_PHOTOS = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "hubble.png",
                 "camera.png", "chelsea_rgba.png", "chelsea_exif6.jpg"]
CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mounted_model(model_dir) -> Path:
    """A world-readable copy of the exported model (the container runs as uid 10001, and an
    export made under a strict umask may be 0600): the same bytes."""
    copy = WORK / "model"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(model_dir, copy)
    for p in [copy, *copy.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return copy


@pytest.fixture(scope="module")
def cpu_container(cpu_image, module_containers, mounted_model):
    """The CPU image serving the host's model, started once for the module; (container, the
    moment `docker run` returned)."""
    c = module_containers.run(cpu_image.tag, "--read-only", "--tmpfs", "/tmp",
                              "-v", f"{mounted_model}:/models/host:ro",
                              env={"TCH_SERVE_MODEL_DIR": "/models/host"})
    return c, time.monotonic()


@pytest.fixture(scope="module")
def host_server(tch_serve_bin, model_dir):
    """The release binary outside the container, on the same model."""
    server = Server(tch_serve_bin, WORK / "host-server.log", ["--device", "cpu"], model_dir=model_dir)
    server.start()
    try:
        server.wait_healthy(120)
        yield server
    finally:
        server.stop(timeout=30)


def test_becomes_healthy(cpu_container, figures):
    c, started = cpu_container
    c.wait_healthy(180)
    took = time.monotonic() - started
    figures("cpu_container.time_to_healthy_s", round(took, 1),
            f"CPU container: time to healthy {took:.1f} s")
    assert engine.health(c.name) == "healthy"
    assert http_status(c.port, "/health") == 200


def test_serves_the_same_model_file(model_dir, mounted_model):
    assert sha256(model_dir / "model.pt") == sha256(mounted_model / "model.pt")


@pytest.mark.parametrize("name", PARITY_PHOTOS)
def test_predict_same_inside_and_outside(name, cpu_container, host_server, figures):
    path = PHOTOS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test-data`", pytrace=False)
    body = path.read_bytes()
    c, _ = cpu_container
    c.wait_healthy(180)
    ctype = CONTENT_TYPES[path.suffix]
    inside = post_image(c.port, body, content_type=ctype)
    outside = post_image(host_server.port, body, content_type=ctype)
    assert (inside[0], outside[0]) == (200, 200), f"{inside[2][:300]!r} / {outside[2][:300]!r}"
    a = json.loads(inside[2])["results"][0]["predictions"]
    b = json.loads(outside[2])["results"][0]["predictions"]
    assert a, "no predictions"
    assert [(p["index"], p["label"]) for p in a] == [(p["index"], p["label"]) for p in b], (
        f"different classes: {[p['label'] for p in a]} vs {[p['label'] for p in b]}")
    diff = max(abs(p["probability"] - q["probability"]) for p, q in zip(a, b))
    figures(("parity", name), {"top1": a[0]["label"], "index": a[0]["index"],
                               "probability": round(a[0]["probability"], 4), "max_abs_dp": diff})
    assert diff <= 1e-4, f"probabilities differ by {diff:.2e}"


def host_pid(name: str) -> int:
    pid = int(engine.inspect(name, "{{.State.Pid}}") or 0)
    assert pid > 0, f"{name} is not running"
    return pid


def status_fields(pid: int) -> dict[str, list[str]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def test_runs_as_non_root_uid(cpu_container):
    c, _ = cpu_container
    c.wait_healthy(180)
    uids = status_fields(host_pid(c.name))["Uid"]  # real, effective, saved, file system
    assert len(uids) == 4 and all(int(u) != 0 for u in uids), f"Uid: {uids}"


def test_server_is_pid_1(cpu_container):
    """The server itself is the container's first process (exec-form entrypoint)."""
    c, _ = cpu_container
    pid = host_pid(c.name)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "tch-serve"
    assert status_fields(pid)["NSpid"][-1] == "1", status_fields(pid)["NSpid"]


def test_docker_stop_exits_cleanly(cpu_container, figures):
    """SIGTERM: exit code 0 within the grace period. Last: it stops the module's container."""
    c, _ = cpu_container
    c.wait_healthy(180)
    t0 = time.monotonic()
    r = engine.docker("stop", "-t", str(GRACE_S), c.name, timeout=GRACE_S + 30)
    took = time.monotonic() - t0
    code = engine.inspect(c.name, "{{.State.ExitCode}}")
    figures("cpu_container.docker_stop", {"exit_code": code, "seconds": round(took, 1), "grace_s": GRACE_S},
            f"docker stop: exit code {code} after {took:.1f} s (grace period {GRACE_S} s)")
    assert r.returncode == 0, r.stderr
    assert code == "0", f"exit code {code}:\n{engine.logs(c.name)}"
    assert took < GRACE_S
