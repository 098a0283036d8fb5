"""k6 as the reliability tests' load generator: closed-loop clients POSTing a photo, started
when a test says and stopped when it says (bench/load.js in MODE=until-stopped, stopped through
k6's REST API: the clients stop starting requests, those in flight finish, then the run ends).

Every request is in k6's JSON output (target/test-logs/reliability/<test>/<name>.k6.json):
what each got, and when; the latency percentiles are k6's own summary's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from harness import HOST, ROOT, free_port, stop_process

SCRIPT = ROOT / "bench" / "load.js"


@dataclass
class LoadStats:
    """What the clients saw. `statuses` counts HTTP answers, `errors` the requests that got
    none (connection refused or reset, timeouts) by k6's error; `refusals` counts the answers
    other than 200 by (status, the error body's code); `latency[status]` holds k6's med, p99
    and max in seconds."""

    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    retry_after_missing: int = 0
    failures: list = field(default_factory=list)  # (seconds since the start, status or error)
    latency: dict = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    def p(self, status: int, stat: str) -> float:
        """k6's `stat` (med, p(99), max) of the answers with `status`, in seconds."""
        return self.latency.get(status, {}).get(stat, float("nan"))

    def describe(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (f"{self.sent} requests in {self.seconds:.1f} s ({rate:.1f}/s): statuses "
                f"{dict(self.statuses)}, errors {dict(self.errors)}")

    def figures(self) -> dict:
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed,
            "seconds": round(self.seconds, 1), "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "refusals": {f"{s} {c}": n for (s, c), n in self.refusals.items()},
            "latency_ms": {s: {k: round(v * 1000, 1) for k, v in st.items()}
                           for s, st in self.latency.items()},
            "first_failures": self.failures[:20],
        }


def _time(stamp: str) -> float:
    """Seconds since the epoch of k6's RFC 3339 time with nanoseconds."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


class K6Load:
    """`vus` clients POSTing the photo to http://127.0.0.1:`port``path` as the raw body
    (image/jpeg), each sending its next request when the last returns."""

    def __init__(self, k6: Path, port: int, photo: Path, vus: int, logs: Path, name: str,
                 pause_after_refusal: float = 0.0, keep_alive: bool = True,
                 path: str = "/predict"):
        self.k6, self.logs, self.name = k6, logs, name
        self.api = f"{HOST}:{free_port()}"
        self.out = logs / f"{name}.k6.json"
        self.summary = logs / f"{name}.k6-summary.json"
        self.env = dict(
            os.environ, K6_NO_USAGE_REPORT="true", MODE="until-stopped", BODY="raw", REFUSALS="1",
            VUS=str(vus), URL=f"http://{HOST}:{port}{path}", PHOTOS=str(photo),
            PAUSE_AFTER_REFUSAL=str(pause_after_refusal), KEEP_ALIVE="1" if keep_alive else "0",
        )
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.stats: LoadStats | None = None

    def _status(self, attributes: dict | None = None, timeout: float = 5.0) -> dict:
        body = None
        if attributes is not None:
            body = json.dumps({"data": {"type": "status", "id": "default", "attributes": attributes}}).encode()
        req = urllib.request.Request(f"http://{self.api}/v1/status", data=body,
                                     method="PATCH" if body else "GET")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["data"]["attributes"]

    def start(self) -> "K6Load":
        self.out.unlink(missing_ok=True)
        self.summary.unlink(missing_ok=True)
        with open(self.logs / f"{self.name}.k6.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.k6), "run", "--quiet", "--no-color", "--address", self.api,
                 "--system-tags", "status,error,error_code", "--out", f"json={self.out}",
                 "--summary-export", str(self.summary), str(SCRIPT)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=SCRIPT.parent)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"k6 exited with {self.proc.returncode}: {self.logs / self.name}.k6.log")
            try:
                if self._status().get("running"):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"k6 did not start within 30 s: {self.logs / self.name}.k6.log")
            time.sleep(0.05)
        self.started = time.monotonic()
        return self

    def stop(self) -> LoadStats:
        """Stops the clients (requests in flight finish) and reads what they saw."""
        if self.stats is not None:
            return self.stats
        seconds = time.monotonic() - self.started
        try:
            self._status({"paused": True}, timeout=90)  # returns once the requests in flight end
            self._status({"stopped": True})
        except (OSError, ValueError):
            pass
        try:
            rc = self.proc.wait(60)  # 103: stopped through the REST API, as asked
        except subprocess.TimeoutExpired:
            rc = stop_process(self.proc, 10)
        if rc not in (0, 103):
            raise RuntimeError(f"k6 ended with {rc}: {self.logs / self.name}.k6.log")
        self.stats = self._read(seconds)
        return self.stats

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _read(self, seconds: float) -> LoadStats:
        stats = LoadStats(seconds=seconds)
        t0 = None
        with open(self.out) as f:
            for line in f:
                if '"type":"Point"' not in line:
                    continue
                point = json.loads(line)
                metric, data = point["metric"], point["data"]
                tags = data.get("tags") or {}
                if metric == "http_req_duration":
                    t = _time(data["time"])
                    t0 = t if t0 is None else min(t0, t)
                    status = int(tags.get("status") or 0)
                    if status:
                        stats.statuses[status] += 1
                        if status != 200:
                            stats.failures.append((t, status))
                    else:
                        error = tags.get("error") or f"error {tags.get('error_code', '?')}"
                        stats.errors[error] += 1
                        stats.failures.append((t, error))
                elif metric == "refusals":
                    stats.refusals[(int(tags.get("status") or 0), tags.get("code", "?"))] += int(data["value"])
                elif metric == "retry_after_missing":
                    stats.retry_after_missing += int(data["value"])
        stats.failures = sorted(((round(t - (t0 or t), 2), what) for t, what in stats.failures),
                                key=lambda x: x[0])
        metrics = json.loads(self.summary.read_text())["metrics"]
        for key, values in metrics.items():
            m = re.fullmatch(r"http_req_duration\{status:(\d+)\}", key)
            if m and values.get("count"):
                stats.latency[int(m.group(1))] = {
                    k: values[k] / 1000 for k in ("med", "p(99)", "max") if k in values}
        return stats
