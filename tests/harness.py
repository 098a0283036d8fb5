"""What the Python suites share (tests/reliability, tests/containers): free ports, waiting,
plain HTTP on 127.0.0.1, the Prometheus text format, percentiles, and the release binary run
as a child process. The fixtures built on these are in tests/conftest.py.

Python's standard library only: the protocol suite's venvs import this module too.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, every: float = 0.1) -> bool:
    """Polls `predicate` until it is true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def pct(values, p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# ------------------------------------------------------------------ HTTP ---


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of GET `path`, or None when the connection failed."""
    try:
        c = http.client.HTTPConnection(HOST, port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except OSError:
        return None


def http_get(port: int, path: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def http_json(method: str, port: int, path: str, body: bytes | None = None,
              timeout: float = 120.0) -> tuple[int, dict]:
    """(status, JSON body) of a request; error statuses are answers too."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post_image(port: int, body: bytes, path: str = "/predict", timeout: float = 60.0,
               content_type: str = "image/jpeg") -> tuple[int, dict, bytes, float]:
    """(status, lower-cased headers, body, seconds) of one POST of raw image bytes."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0
    finally:
        c.close()


def metric(text: str, series: str) -> float | None:
    """The value of one series (its name and labels as rendered) in a Prometheus text page."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return None


def metrics(port: int) -> str:
    """The server's /metrics page, or "" when it does not answer."""
    try:
        return http_get(port, "/metrics")
    except OSError:
        return ""


# ------------------------------------------------------------- processes ---


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def raise_fd_limit() -> int:
    """Raises the soft limit on open files to the hard one (the servers started from here
    inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def stop_process(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> int | None:
    """Sends `sig` and waits; kills it after `timeout` s. The exit status, None if killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


class Server:
    """The release binary serving on 127.0.0.1:`port` (a free one by default), as a child
    process logging (JSON) to `log`. Serves `model_dir` unless `args` name what to serve."""

    def __init__(self, binary: Path, log: Path, args: list[str], model_dir: Path | None = None,
                 port: int | None = None, env: dict | None = None):
        self.binary, self.log, self.args = binary, log, list(args)
        self.model_dir = model_dir
        self.port = port or free_port()
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        serves = any(a in self.args for a in ("--model-dir", "--model-repository"))
        cmd = [
            str(self.binary), "serve", "--host", HOST, "--port", str(self.port),
            # Several servers on one host: no fixed gRPC port unless the test gives one.
            *([] if "--grpc-port" in self.args else ["--grpc-port", "0"]),
            *([] if serves or self.model_dir is None else ["--model-dir", str(self.model_dir)]),
            "--log-format", "json", *self.args,
        ]
        env = dict(os.environ, RUST_LOG="info", **self.env)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Seconds until /health answered 200; raises when the server exits or times out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log {self.log}")
            if http_status(self.port, "/health", timeout=1.0) == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s; log {self.log}")

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, then its exit status (None when it had to be killed)."""
        return None if self.proc is None else stop_process(self.proc, timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def predict(self, body: bytes, timeout: float = 60.0) -> tuple[int, dict, bytes, float]:
        return post_image(self.port, body, timeout=timeout)
