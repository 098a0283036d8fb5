"""The CPU image under the tightest `docker run` a hardened host allows (a read-only root file
system with a small /tmp tmpfs, every capability dropped, no new privileges): it becomes healthy
and classifies; killed with SIGKILL (no graceful shutdown at all) and started again, it comes
back healthy, since it keeps no state that a kill could corrupt."""

from __future__ import annotations

import json

import pytest

from containers import engine
from harness import post_image, wait_until

HARDENED = ["--read-only", "--tmpfs", "/tmp:rw,size=64m", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]


@pytest.fixture(scope="module")
def hardened(cpu_image, module_containers):
    return module_containers.run(cpu_image.tag, *HARDENED)


def classify(port: int, photo: bytes) -> tuple[int, dict]:
    status, _, body, _ = post_image(port, photo)
    return status, json.loads(body) if status == 200 else {"body": body[:300]}


def test_hardened_becomes_healthy_and_classifies(hardened, photo, figures):
    host = engine.inspect_json(hardened.name)["HostConfig"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"], host
    assert "no-new-privileges" in host["SecurityOpt"], host["SecurityOpt"]
    took = hardened.wait_healthy(180)
    figures("hardening.healthy_s", round(took, 1),
            f"hardened container (--read-only, --cap-drop ALL, no-new-privileges): healthy after {took:.1f} s")
    status, doc = classify(hardened.port, photo)
    assert status == 200 and doc["predictions"], doc


def test_sigkill_then_start_comes_back_healthy(hardened, photo, figures):
    hardened.wait_healthy(180)
    r = engine.docker("kill", hardened.name, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not engine.running(hardened.name), 30)
    state = engine.inspect(hardened.name, "{{.State.Status}} {{.State.ExitCode}}")
    assert state == "exited 137", state
    r = engine.docker("start", hardened.name, timeout=60)
    assert r.returncode == 0, r.stderr
    again = hardened.wait_healthy(180)
    figures("hardening.after_kill", {"state": state, "healthy_again_s": round(again, 1)},
            f"docker kill: {state}; docker start: healthy again after {again:.1f} s")
    status, doc = classify(hardened.port, photo)
    assert status == 200 and doc["predictions"], doc
