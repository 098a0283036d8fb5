"""Overload: one server with --queue-capacity 8 (and --max-images-per-request 8, which the
capacity must cover) and 64 k6 clients for 20 s, each retrying 100 ms after a refusal: up to
about 600 requests/s offered, more than ten times what the server does on 2 cores. RSS is read
from /proc/PID/status: idle after start-up and 5 warm-up requests, every 200 ms under the
load, and 3 s after it.
"""

from __future__ import annotations

import threading
import time

import pytest

from harness import http_status, metric, metrics, ms

SECONDS = 20
ARGS = ["--queue-capacity", "8", "--max-images-per-request", "8", "--max-batch-size", "8",
        "--warmup-iterations", "2"]


@pytest.fixture(scope="module")
def overload(phase, photo, model_dir):
    s = phase.server("server", ARGS)
    s.wait_healthy()
    for _ in range(5):  # warm the allocator on real requests, then measure idle
        s.predict(photo)
    time.sleep(1)
    idle = s.rss_mb()
    samples: list[float] = []
    sampling = threading.Event()

    def sampler() -> None:
        while not sampling.is_set():
            try:
                samples.append(s.rss_mb())
            except OSError:
                break
            time.sleep(0.2)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    load = phase.load(s.port, vus=64, pause_after_refusal=0.1)
    time.sleep(SECONDS)
    stats = load.stop()
    sampling.set()
    th.join()
    time.sleep(3)
    alive = s.alive()
    after = s.rss_mb() if alive else float("nan")
    health = http_status(s.port, "/health")
    status = s.predict(photo)[0] if alive else None
    series = f'tch_serve_rejections_total{{model="{model_dir.name}",reason="overloaded"}}'
    counted = metric(metrics(s.port), series)
    rc = s.stop()

    peak = max(samples, default=float("nan"))
    phase.note(stats.describe())
    phase.note(f"time to 503: p50 {ms(stats.p(503, 'med'))}, p99 {ms(stats.p(503, 'p(99)'))}, "
               f"max {ms(stats.p(503, 'max'))}; time to 200: p50 {ms(stats.p(200, 'med'))}, "
               f"p99 {ms(stats.p(200, 'p(99)'))}")
    phase.note(f"RSS: idle after warm-up {idle:.1f} MB, peak under load {peak:.1f} MB, 3 s after "
               f"{after:.1f} MB (bound {2 * idle + 200:.1f} MB)")
    phase.note(f"{series} = {counted}")
    phase.figures.update(stats.figures(), rss_idle_mb=round(idle, 1), rss_peak_mb=round(peak, 1),
                         rss_after_mb=round(after, 1), overloaded_metric=counted)
    return {"stats": stats, "idle": idle, "peak": peak, "after": after, "alive": alive,
            "health": health, "status": status, "counted": counted, "rc": rc}


def test_server_survives_and_serves_afterwards(overload):
    assert overload["alive"], "the server died under overload"
    assert (overload["health"], overload["status"]) == (200, 200), "/health and /predict afterwards"


def test_accepted_requests_succeed_and_the_rest_get_503_overloaded(overload):
    stats = overload["stats"]
    assert stats.ok > 0 and stats.statuses.get(503, 0) > 0, stats.describe()
    assert set(stats.statuses) == {200, 503} and not stats.errors, stats.describe()
    assert set(stats.refusals) == {(503, "overloaded")}, f"refusals by (status, code): {dict(stats.refusals)}"


def test_every_503_carries_retry_after(overload):
    stats = overload["stats"]
    assert stats.retry_after_missing == 0, f"{stats.retry_after_missing} of {stats.statuses.get(503)} without"


def test_refusals_are_fast(overload):
    p99 = overload["stats"].p(503, "p(99)")
    assert p99 < 0.25, f"p99 time to a 503 is {ms(p99)}, not under 250 ms"


def test_memory_stays_bounded(overload):
    bound = 2 * overload["idle"] + 200
    assert overload["peak"] < bound and overload["after"] < bound, (
        f"RSS {overload['idle']:.0f} -> {overload['peak']:.0f} -> {overload['after']:.0f} MB, "
        f"bound {bound:.0f} MB")


def test_metrics_count_every_refusal_the_clients_saw(overload):
    seen = overload["stats"].statuses.get(503, 0)
    assert overload["counted"] == seen, f"/metrics says {overload['counted']}, the clients saw {seen}"


def test_clean_exit_on_sigterm(overload):
    assert overload["rc"] == 0
