"""Two servers behind nginx, configured as ingress-nginx configures itself for
deploy/kubernetes/components/ingress-nginx/ingress.yaml.

The Ingress's annotations are read from that file and turned into the directives ingress-nginx
generates for them (proxy-body-size -> client_max_body_size, proxy-read-timeout ->
proxy_read_timeout, ...), on top of the controller's own defaults that matter here (HTTP/1.1
keep-alive to the upstreams, 320 idle connections kept, no response buffering, retry on the next
upstream after a connection error). ingress-nginx's `load-balance: ewma` is Lua code of the
controller; plain nginx has no EWMA balancer, so `least_conn`, the nearest load-aware one, stands
in. ingress-nginx learns the ready endpoints from the Kubernetes API; here a small controller
polls each server's /health every 500 ms (as a readiness probe would), rewrites the upstream list
and reloads nginx (gracefully: old workers finish their requests) when it changes.

The rolling restart's k6 clients open a connection per request to nginx: the stand-in controller
reloads nginx on each endpoint change (ingress-nginx changes endpoints without a reload, in Lua),
and a reload closes the old workers' idle client connections, which races with a keep-alive
client sending its next request on one. What is tested is the servers' side: nginx keeps HTTP/1.1
keep-alive connections to them, as ingress-nginx does.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import threading
import time

import pytest
import yaml

from harness import HOST, ROOT, free_port, http_status, ms, post_image

INGRESS = ROOT / "deploy/kubernetes/components/ingress-nginx/ingress.yaml"
SECONDS = 45
ARGS = ["--shutdown-delay-secs", "2", "--shutdown-timeout-secs", "20",
        "--intra-op-threads", "1", "--preprocess-threads", "1", "--warmup-iterations", "1"]
SERVER_MAX_BODY = 16 * 1024 * 1024  # --max-body-bytes' default
NEEDED = ("proxy-body-size", "proxy-read-timeout", "proxy-send-timeout", "proxy-request-buffering")

NGINX_CONF = """\
# nginx as ingress-nginx configures itself for the Ingress in {ingress}
# (written by tests/reliability/test_nginx.py).
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


def annotations() -> dict[str, str]:
    """The nginx.ingress.kubernetes.io annotations of the file's first Ingress (the HTTP one)."""
    ingress = next(d for d in yaml.safe_load_all(INGRESS.read_text()) if d and d["kind"] == "Ingress")
    prefix = "nginx.ingress.kubernetes.io/"
    return {k.removeprefix(prefix): str(v) for k, v in ingress["metadata"]["annotations"].items()
            if k.startswith(prefix)}


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


class Endpoints(threading.Thread):
    """Kubernetes' endpoints and ingress-nginx's sync, played: every 500 ms, the servers whose
    /health answers 200 are the upstreams; on a change nginx is reloaded (SIGHUP)."""

    def __init__(self, work, ports: dict[str, int], nginx: subprocess.Popen):
        super().__init__(daemon=True)
        self.work, self.ports, self.nginx = work, ports, nginx
        self.ready: tuple[str, ...] = ()
        self.reloads = 0
        self.stop_event = threading.Event()

    def sync(self) -> None:
        ready = tuple(n for n, p in self.ports.items() if http_status(p, "/health", timeout=0.4) == 200)
        if ready == self.ready:
            return
        lines = [f"server {HOST}:{self.ports[n]} max_fails=0;  # {n}" for n in ready]
        # nginx needs one server in an upstream: a placeholder that refuses, marked down.
        (self.work / "upstreams.conf").write_text("\n".join(lines or [f"server {HOST}:1 down;"]) + "\n")
        if self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGHUP)
            self.reloads += 1
        self.ready = ready

    def wait_for(self, want: tuple[str, ...], timeout: float = 30) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.ready == want:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"the upstreams never became {want} (are {self.ready})")

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.sync()


@pytest.fixture(scope="module")
def ingress() -> dict[str, str]:
    ann = annotations()
    missing = [k for k in NEEDED if k not in ann]
    assert not missing, f"{INGRESS} has no {missing} annotation"
    return ann


@pytest.fixture(scope="module")
def nginx(phase, nginx_bin, ingress):
    """nginx in front of servers a and b; (front port, default-limit port, servers, controller)."""
    work = phase.logs / "nginx"
    work.mkdir()
    a, b = phase.server("a", ARGS), phase.server("b", ARGS)
    a.wait_healthy()
    b.wait_healthy()
    front, default_front = free_port(), free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(
        ingress=INGRESS.relative_to(ROOT), work=work, host=HOST, port=front, default_port=default_front,
        body_size=ingress["proxy-body-size"], read_timeout=ingress["proxy-read-timeout"],
        send_timeout=ingress["proxy-send-timeout"], buffering=ingress["proxy-request-buffering"],
        balance=ingress.get("load-balance", "round_robin")))
    (work / "upstreams.conf").write_text(f"server {HOST}:1 down;\n")
    cmd = [nginx_bin, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t: {check.stderr[-500:]}"
    proc = phase.spawn("nginx", cmd)
    time.sleep(0.3)
    ctl = Endpoints(work, {"a": a.port, "b": b.port}, proc)
    ctl.sync()
    ctl.wait_for(("a", "b"))
    time.sleep(0.5)  # the reload's new worker takes over
    ctl.start()
    yield {"front": front, "default_front": default_front, "servers": {"a": a, "b": b}, "ctl": ctl,
           "work": work, "proc": proc}
    ctl.stop_event.set()
    ctl.join(5)
    proc.send_signal(signal.SIGQUIT)  # graceful stop
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def large() -> bytes:
    return big_photo()


def test_a_phone_photo_is_classified_through_nginx(nginx, large, phase):
    status, _, data, took = post_image(nginx["front"], large)
    phase.note(f"{len(large) / 1e6:.1f} MB photo (12 MP JPEG) through nginx: {status} in {ms(took)}")
    assert status == 200 and json.loads(data).get("results"), f"{status}: {data[:200]!r}"


def test_the_controller_default_1m_limit_refuses_it_with_nginx_413(nginx, large):
    status, headers, data, _ = post_image(nginx["default_front"], large)
    assert status == 413 and "text/html" in headers.get("content-type", "") and b"nginx" in data, (
        status, headers.get("content-type"))


def test_a_body_over_the_server_limit_gets_the_server_json_413(nginx, large, ingress):
    body = large + b"\0" * (SERVER_MAX_BODY + 64 * 1024 - len(large))
    assert len(body) < size_bytes(ingress["proxy-body-size"]), "the Ingress's limit must exceed the server's"
    status, headers, data, _ = post_image(nginx["front"], body)
    assert status == 413 and "json" in headers.get("content-type", ""), (status, headers.get("content-type"))
    assert json.loads(data).get("code") == "payload_too_large", data[:200]


def test_a_body_over_proxy_body_size_is_refused_by_nginx_itself(nginx, ingress):
    body = b"\xff\xd8" + b"\0" * (size_bytes(ingress["proxy-body-size"]) + 1024 * 1024)
    status, headers, _, _ = post_image(nginx["front"], body)
    assert status == 413 and "text/html" in headers.get("content-type", ""), (status, headers.get("content-type"))


@pytest.fixture(scope="module")
def rolling(nginx, phase):
    ctl, servers = nginx["ctl"], nginx["servers"]
    load = phase.load(nginx["front"], vus=4, name="rolling", keep_alive=False)
    steady = max(4.0, (SECONDS - 30) / 3)
    time.sleep(steady)
    others = {"a": ("b",), "b": ("a",)}
    exit_codes = phase.rolling_restart(
        dict(servers), ARGS, steady, "nginx (reloaded with the ready upstreams)",
        taken_out=lambda name: ctl.wait_for(others[name], timeout=10),
        put_back=lambda name: ctl.wait_for(("a", "b"), timeout=10))
    stats = load.stop()
    served: dict[str, int] = {}
    for line in (nginx["work"] / "access.log").read_text().splitlines():
        m = re.search(r"\[([0-9.:, ]+)\] \[([0-9, -]+)\]", line)
        if m:
            for addr in m.group(1).split(", "):
                served[addr] = served.get(addr, 0) + 1
    upstream_errors = sum(1 for line in (nginx["work"] / "error.log").read_text().splitlines()
                          if "upstream" in line and "[error]" in line)
    phase.note(f"rolling restart through nginx: {stats.describe()}; p50 {ms(stats.p(200, 'med'))}, "
               f"p99 {ms(stats.p(200, 'p(99)'))}; nginx reloads {ctl.reloads}")
    phase.note(f"requests per upstream (nginx's log) {served}; upstream errors in nginx's log {upstream_errors}")
    phase.figures.update(stats.figures(), exit_codes=exit_codes, reloads=ctl.reloads,
                         upstream_requests=served, upstream_errors_logged=upstream_errors)
    ports = {f":{s.port}" for s in servers.values()}
    return {"stats": stats, "exit_codes": exit_codes,
            "upstreams": [a for a in served if any(a.endswith(p) for p in ports)]}


def test_a_rolling_restart_through_nginx_loses_no_request(rolling):
    stats = rolling["stats"]
    assert stats.sent > 0 and stats.failed == 0, (
        f"{stats.failed} of {stats.sent} failed: {dict(stats.refusals)}, {stats.failures[:20]}")


def test_old_servers_exit_0_on_sigterm(rolling):
    assert rolling["exit_codes"] == {"a": 0, "b": 0}


def test_traffic_kept_flowing_to_both_servers(rolling):
    stats = rolling["stats"]
    assert stats.sent / stats.seconds >= 2, f"{stats.sent / stats.seconds:.1f} requests/s"
    assert len(rolling["upstreams"]) == 2, f"upstreams that served: {rolling['upstreams']}"
