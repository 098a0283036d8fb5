"""A burst of the costliest images at the CPU container limited to 2 GB with 8 decoding
threads: twelve 40-megapixel 16-bit RGBA PNGs (the largest --max-image-pixels allows, about
320 KB each on the wire, 440 MB once decoded and converted) at once. The decode memory budget
(768 MiB by default) lets them through a few at a time: every one is answered and the server
is not OOM-killed. The same burst with the budget lifted shows what it prevents."""

from __future__ import annotations

import time

import pytest

from containers import burst, engine
from containers.engine import WORK

IMAGES = 12
# --decode-memory-bytes far above the container's memory: no budget in effect.
LIFTED = {"TCH_SERVE_DECODE_MEMORY_BYTES": "100000000000"}
RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def burst_png() -> bytes:
    path = WORK / "burst-40mp-rgba16.png"
    burst.write_png(path)
    return path.read_bytes()


def run_burst(containers, image: str, body: bytes, env: dict) -> dict:
    c = containers.run(image, "--memory", "2g", "--memory-swap", "2g", "--cpus", "2",
                       env={"TCH_SERVE_PREPROCESS_THREADS": "8", **env})
    c.wait_healthy(120)
    memory = engine.MemoryPeak(c.name).start()
    t0 = time.monotonic()
    result = burst.send(c.port, body, IMAGES)
    result["seconds"] = round(time.monotonic() - t0, 1)
    time.sleep(1)
    result["peak_bytes"] = memory.stop()
    result["oom_killed"] = engine.inspect(c.name, "{{.State.OOMKilled}}") == "true"
    result["running"] = engine.running(c.name)
    return result


def describe(r: dict) -> str:
    peak = engine.mb(r["peak_bytes"]) if r["peak_bytes"] else "n/a"
    return (f"statuses {r['statuses']}, {r['errors']} without an answer, {r['seconds']} s; "
            f"OOMKilled={str(r['oom_killed']).lower()}, running={str(r['running']).lower()}, peak {peak}")


def test_burst_with_the_decode_budget(cpu_image, containers, burst_png, figures):
    r = RUNS["with_budget"] = run_burst(containers, cpu_image.tag, burst_png, {})
    figures("burst.with_budget", r, f"burst of {IMAGES} 40-MP RGBA16 PNGs at --memory 2g, "
                                    f"with the decode budget: {describe(r)}")
    assert r["statuses"] == {"200": IMAGES} and r["errors"] == 0, describe(r)
    assert not r["oom_killed"] and r["running"], describe(r)


def test_burst_without_the_decode_budget(cpu_image, containers, burst_png, figures):
    """Measured beside it: the same burst with the budget lifted. What the budget prevents
    shows: the server is OOM-killed, or fails requests, or at least takes more memory."""
    r = RUNS["without_budget"] = run_burst(containers, cpu_image.tag, burst_png, LIFTED)
    figures("burst.without_budget", r, "the same burst with the budget lifted "
                                       f"(--decode-memory-bytes 100 GB): {describe(r)}")
    assert sum(r["statuses"].values()) + r["errors"] == IMAGES, describe(r)
    budgeted = RUNS.get("with_budget") or {}
    more_memory = bool(r["peak_bytes"] and budgeted.get("peak_bytes")
                       and r["peak_bytes"] > budgeted["peak_bytes"])
    assert r["oom_killed"] or r["statuses"] != {"200": IMAGES} or more_memory, (
        f"no difference without the budget: {describe(r)}")
