"""Reliability phase e: two tch-serve servers behind nginx, configured as ingress-nginx
configures itself for deploy/kubernetes/components/ingress-nginx/ingress.yaml.

The Ingress's annotations are read from that file and turned into the directives ingress-nginx
generates for them (proxy-body-size -> client_max_body_size, proxy-read-timeout ->
proxy_read_timeout, ...), on top of the controller's own defaults that matter here (HTTP/1.1
keep-alive to the upstreams, 320 idle connections kept, no response buffering, retry on the
next upstream after a connection error). ingress-nginx's `load-balance: ewma` is Lua code of the
controller; plain nginx has no EWMA balancer, so `least_conn`, the nearest load-aware one,
stands in. ingress-nginx learns the ready endpoints from the Kubernetes API; here a small
controller polls each server's /health every 500 ms (as a readiness probe would), rewrites the
upstream list and reloads nginx (gracefully: old workers finish their requests) when it
changes.

Checks:
  - a 5 MB photo (a 12-megapixel JPEG made from scikit-image's astronaut, with sensor-like
    noise) is classified through nginx; the same photo through a server block with the
    controller's default 1 MB limit gets nginx's own 413;
  - a body a little over the server's --max-body-bytes gets the server's JSON 413
    (payload_too_large), not nginx's HTML page; a body over the Ingress's limit gets nginx's;
  - rolling restart under load: SIGTERM one server (--shutdown-delay-secs 2: /health turns 503,
    it keeps serving), the controller takes it out, it exits, its replacement starts on the same
    port and is put back once healthy; then the other. No request may fail. The clients open a
    connection per request to nginx (whose reloads close idle client connections; see below);
    nginx keeps its connections to the servers alive.

Called from reliability.py (`--only nginx`), which passes itself as `rel` for its helpers
(servers, load generator, reporting). Needs nginx (Debian's package) and, for the photo,
Pillow, NumPy and scikit-image (the project's .venv).
"""

from __future__ import annotations

import http.client
import io
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

INGRESS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "components" / "ingress-nginx" / "ingress.yaml"

NGINX_CONF = """\
# nginx as ingress-nginx configures itself for the Ingress in {ingress}
# (written by scripts/reliability/nginx_lb.py).
daemon off;
master_process on;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    log_format upstreaminfo '$remote_addr "$request" $status $request_length $request_time '
                            '[$upstream_addr] [$upstream_status] [$upstream_response_time]';
    access_log {work}/access.log upstreaminfo;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;

    # ingress-nginx's defaults (its ConfigMap options in brackets)
    keepalive_timeout 75s;                 # [keep-alive]
    client_body_buffer_size 8k;            # [client-body-buffer-size]
    proxy_http_version 1.1;                # [proxy-http-version]
    proxy_buffering off;                   # [proxy-buffering]
    proxy_connect_timeout 5s;              # [proxy-connect-timeout]
    proxy_next_upstream error timeout;     # [proxy-next-upstream]
    proxy_next_upstream_tries 3;           # [proxy-next-upstream-tries]

    upstream tch_serve {{
        # ingress-nginx: load-balance: {balance} (a Lua balancer); nginx's nearest: least_conn
        least_conn;
        include {work}/upstreams.conf;
        keepalive 320;                     # [upstream-keepalive-connections]
        keepalive_timeout 60s;             # [upstream-keepalive-timeout]
        keepalive_requests 10000;          # [upstream-keepalive-requests]
    }}

    # The Ingress: its annotations.
    server {{
        listen {host}:{port};
        client_max_body_size {body_size};      # proxy-body-size
        proxy_read_timeout {read_timeout}s;    # proxy-read-timeout
        proxy_send_timeout {send_timeout}s;    # proxy-send-timeout
        proxy_request_buffering {buffering};   # proxy-request-buffering
        location / {{
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_pass http://tch_serve;
        }}
    }}

    # The same Ingress without annotations: the controller's default body limit.
    server {{
        listen {host}:{default_port};
        client_max_body_size 1m;               # ingress-nginx's default proxy-body-size
        location / {{
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_pass http://tch_serve;
        }}
    }}
}}
"""


def ingress_annotations(path: Path = INGRESS) -> dict[str, str]:
    """The nginx.ingress.kubernetes.io annotations of the first Ingress in the file (the HTTP
    one), without a YAML parser (this runs on the standard library)."""
    first = path.read_text().split("\n---")[0]
    return {k: v for k, v in re.findall(
        r'^\s+nginx\.ingress\.kubernetes\.io/([a-z-]+):\s*"?([^"\n]+?)"?\s*$', first, re.M)}


def size_bytes(v: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", v.strip())
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def big_photo(min_bytes: int = 5_000_000) -> bytes:
    """A phone-sized photo: scikit-image's astronaut at 4032x3024 with sensor-like noise, JPEG,
    at least min_bytes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((4032, 3024), Image.BICUBIC)).astype(np.int16)
    rng = np.random.default_rng(0)
    for sigma, quality in ((8, 95), (10, 96), (12, 97)):
        noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=quality)
        if len(buf.getvalue()) >= min_bytes:
            return buf.getvalue()
    raise RuntimeError(f"could not make a JPEG of {min_bytes} bytes")


def post(host: str, port: int, body: bytes, timeout: float = 60) -> tuple[int, dict, bytes, float]:
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0
    finally:
        c.close()


class Endpoints(threading.Thread):
    """Plays the part of Kubernetes' endpoints plus ingress-nginx's sync: every 500 ms, the
    servers whose /health answers 200 are the upstreams; on a change nginx is reloaded."""

    def __init__(self, rel, work: Path, ports: dict[str, int], nginx: subprocess.Popen):
        super().__init__(daemon=True)
        self.rel, self.work, self.ports, self.nginx = rel, work, ports, nginx
        self.ready: tuple[str, ...] = ()
        self.events: list[tuple[float, tuple[str, ...]]] = []
        self.reloads = 0
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def write(self, ready: tuple[str, ...]) -> None:
        lines = [f"server {self.rel.HOST}:{self.ports[n]} max_fails=0;  # {n}" for n in ready]
        # nginx needs one server in an upstream: a placeholder that refuses, marked down.
        (self.work / "upstreams.conf").write_text("\n".join(lines or [f"server {self.rel.HOST}:1 down;"]) + "\n")

    def poll(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.ports.items() if self.rel.http_status(p, "/health", timeout=0.4) == 200)

    def sync(self) -> bool:
        ready = self.poll()
        if ready == self.ready:
            return False
        self.write(ready)
        if self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGHUP)
            self.reloads += 1
        self.ready = ready
        self.events.append((time.monotonic() - self.t0, ready))
        return True

    def wait_for(self, want: tuple[str, ...], timeout: float = 30) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.ready == want:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError(f"upstreams never became {want} (are {self.ready})")

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.sync()


def test_nginx(rel, photo: bytes, duration: float) -> None:
    rel.step("e. Behind nginx as ingress-nginx configures it (components/ingress-nginx)")
    nginx_bin = rel.shutil_which("nginx")
    if not nginx_bin:
        rel.check("nginx: available", False, "nginx not installed (apt-get install nginx)")
        return
    ann = ingress_annotations()
    needed = ("proxy-body-size", "proxy-read-timeout", "proxy-send-timeout", "proxy-request-buffering")
    if not rel.check("nginx: the Ingress's annotations read", all(k in ann for k in needed),
                     ", ".join(f"{k}={ann.get(k)}" for k in (*needed, "load-balance"))):
        return
    try:
        large = big_photo()
    except Exception as e:  # Pillow, NumPy or scikit-image missing
        rel.check("nginx: a 5 MB photo made from scikit-image's astronaut", False, f"{type(e).__name__}: {e}")
        return

    work = rel.WORK / "nginx"
    work.mkdir(parents=True, exist_ok=True)
    for f in ("access.log", "error.log"):
        (work / f).unlink(missing_ok=True)
    port_a, port_b, front, default_front = (rel.free_port() for _ in range(4))
    args = ["--shutdown-delay-secs", "2", "--shutdown-timeout-secs", "20",
            "--intra-op-threads", "1", "--preprocess-threads", "1", "--warmup-iterations", "1"]
    a = rel.Server("nginx-a", port_a, args).start()
    b = rel.Server("nginx-b", port_b, args).start()
    a.wait_healthy()
    b.wait_healthy()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(
        ingress=INGRESS.relative_to(INGRESS.parents[4]), work=work, host=rel.HOST, port=front,
        default_port=default_front, body_size=ann["proxy-body-size"],
        read_timeout=ann["proxy-read-timeout"], send_timeout=ann["proxy-send-timeout"],
        buffering=ann["proxy-request-buffering"], balance=ann.get("load-balance", "round_robin")))
    (work / "upstreams.conf").write_text(f"server {rel.HOST}:1 down;\n")
    test = subprocess.run([nginx_bin, "-t", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
                          capture_output=True, text=True)
    if not rel.check("nginx: configuration accepted (nginx -t)", test.returncode == 0, test.stderr.strip()[-300:]):
        return
    log = open(work / "nginx.out", "wb")
    nginx = subprocess.Popen([nginx_bin, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
                             stdout=log, stderr=subprocess.STDOUT)
    rel.CHILDREN.append(nginx)
    time.sleep(0.3)
    ctl = Endpoints(rel, work, {"a": port_a, "b": port_b}, nginx)
    ctl.sync()
    ctl.wait_for(("a", "b"))
    time.sleep(0.5)  # the reload's new worker takes over
    ctl.start()
    max_body = size_bytes(ann["proxy-body-size"])

    # --- body sizes
    status, headers, data, took = post(rel.HOST, front, large)
    try:
        top = json.loads(data)
    except ValueError:
        top = {}
    rel.check(f"nginx: a {len(large) / 1e6:.1f} MB photo (12 MP JPEG) is classified through nginx",
              status == 200 and bool(top), f"{status} in {rel.ms(took)}, {data[:120]!r}")
    status_d, headers_d, data_d, _ = post(rel.HOST, default_front, large)
    rel.check("nginx: the same photo behind the controller's default 1m limit gets nginx's own 413",
              status_d == 413 and "text/html" in headers_d.get("content-type", "") and b"nginx" in data_d,
              f"{status_d} {headers_d.get('content-type')}")
    server_limit = 16 * 1024 * 1024
    over_server = large + b"\0" * (server_limit + 64 * 1024 - len(large))
    status, headers, data, took = post(rel.HOST, front, over_server)
    try:
        err = json.loads(data)
    except ValueError:
        err = {}
    rel.check(f"nginx: a body of {len(over_server) / (1 << 20):.2f} MiB (over the server's 16 MiB, under "
              f"proxy-body-size {ann['proxy-body-size']}) gets the server's JSON 413",
              status == 413 and err.get("code") == "payload_too_large" and "json" in headers.get("content-type", ""),
              f"{status} {headers.get('content-type')} {data[:100]!r} in {rel.ms(took)}")
    over_nginx = b"\xff\xd8" + b"\0" * (max_body + 1024 * 1024)
    status, headers, data, _ = post(rel.HOST, front, over_nginx)
    rel.check(f"nginx: a body of {len(over_nginx) / (1 << 20):.0f} MiB (over proxy-body-size) is refused by nginx "
              f"itself (413, HTML) without reaching a server",
              status == 413 and "text/html" in headers.get("content-type", ""), f"{status} {headers.get('content-type')}")

    # --- rolling restart under load
    # A new client connection for each request: the stand-in controller reloads nginx on each
    # endpoint change (ingress-nginx changes endpoints without a reload, in Lua), and a reload
    # closes the old workers' idle client connections, which races with a keep-alive client
    # sending its next request on one. What is checked is the servers' side: nginx keeps
    # HTTP/1.1 keep-alive connections to them, as ingress-nginx does.
    load = rel.LoadGenerator(front, photo, clients=4, keep_alive=False).start()
    t0 = time.monotonic()

    def mark(what: str) -> None:
        rel.note(f"t={time.monotonic() - t0:5.1f}s  {what}")

    steady = max(4.0, (duration - 30) / 3)
    time.sleep(steady)
    exit_codes, replacements = {}, []
    for old, name in ((a, "a"), (b, "b")):
        other = "b" if name == "a" else "a"
        mark(f"SIGTERM {name} (pid {old.pid})")
        old.terminate()
        took = ctl.wait_for((other,), timeout=10)
        mark(f"{name} out of the upstreams after {took:.2f} s (nginx reloaded)")
        exit_codes[name] = old.proc.wait(40)
        mark(f"{name} exited with {exit_codes[name]}")
        new = rel.Server(f"nginx-{name}2", old.port, args).start()
        replacements.append(new)
        ready = new.wait_healthy()
        took = ctl.wait_for(("a", "b"), timeout=10)
        mark(f"{name}' healthy after {ready:.1f} s, back in the upstreams {took:.2f} s later")
        time.sleep(steady)
    stats = load.stop()
    elapsed = time.monotonic() - t0
    ctl.stop_event.set()
    ctl.join(5)
    failed = stats.sent - stats.statuses.get(200, 0)
    lat = stats.latencies.get(200, [])
    served = {}
    for line in (work / "access.log").read_text().splitlines():
        m = re.search(r"\[([0-9.:, ]+)\] \[([0-9, -]+)\]", line)
        if m:
            for addr in m.group(1).split(", "):
                served[addr] = served.get(addr, 0) + 1
    upstream_errors = sum(1 for line in (work / "error.log").read_text().splitlines()
                          if "upstream" in line and "[error]" in line)
    rel.FIGURES["nginx"] = {
        "annotations": ann, "photo_bytes": len(large), "sent": stats.sent, "ok": stats.statuses.get(200, 0),
        "failed": failed, "statuses": stats.statuses, "errors": stats.errors, "seconds": round(elapsed, 1),
        "p50_ms": round(rel.pct(lat, 50) * 1000, 1), "p99_ms": round(rel.pct(lat, 99) * 1000, 1),
        "exit_codes": exit_codes, "reloads": ctl.reloads, "upstream_requests": served,
        "upstream_errors_logged": upstream_errors,
        "endpoint_changes": [(round(t, 2), list(r)) for t, r in ctl.events],
    }
    rel.note(f"requests sent {stats.sent}, failed {failed} over {elapsed:.1f} s ({stats.sent / elapsed:.1f} req/s); "
             f"statuses {stats.statuses}, errors {stats.errors}")
    rel.note(f"latency p50 {rel.ms(rel.pct(lat, 50))}, p99 {rel.ms(rel.pct(lat, 99))}; nginx reloads {ctl.reloads}; "
             f"requests per upstream (nginx's log) {served}; upstream errors in nginx's log {upstream_errors}")
    if failed:
        bad = [(round(t, 2), s) for t, s in stats.timeline if s != 200][:20]
        rel.note(f"failures by (status, code): {stats.codes}; first ones (t, status or error): {bad}")
    rel.check("nginx: rolling restart loses no request", failed == 0 and stats.sent > 0,
              f"{stats.sent} sent, {failed} failed")
    rel.check("nginx: both old servers exited 0 on SIGTERM", all(c == 0 for c in exit_codes.values()), str(exit_codes))
    rel.check("nginx: traffic kept flowing (>= 2 req/s) and reached both servers",
              stats.sent / elapsed >= 2 and len([a for a in served if a.endswith((f":{port_a}", f":{port_b}"))]) == 2,
              f"{stats.sent / elapsed:.1f} req/s")
    for s in replacements:
        s.stop()
    nginx.send_signal(signal.SIGQUIT)  # graceful stop
    try:
        nginx.wait(10)
    except subprocess.TimeoutExpired:
        nginx.kill()
