"""Rolling restart under load: two servers (one libtorch thread each, --shutdown-delay-secs 2)
behind HAProxy, which health-checks GET /health every 500 ms and takes a server out after one
failure and back after one success, as a readiness probe and a Service's endpoints do, with no
retries and no redispatch (a request that fails on a server fails for the client, as behind
kube-proxy). Four k6 clients post the photo in a closed loop over keep-alive connections.
Meanwhile: SIGTERM server a; HAProxy sees /health answer 503 and stops routing to it; a exits;
a replacement starts on the same port and is routed to once healthy; then the same for b.
Every request is recorded: anything but a 200, or a connection error, is a failed request.
"""

from __future__ import annotations

import time

import pytest

from harness import HOST, free_port, http_get, ms

SECONDS = 60
ARGS = ["--shutdown-delay-secs", "2", "--shutdown-timeout-secs", "20",
        "--intra-op-threads", "1", "--preprocess-threads", "1", "--warmup-iterations", "1"]

HAPROXY_CFG = """\
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # No retries and no redispatch: a request that fails on a server is a failure for the
    # client, as behind kube-proxy.
    retries 0
listen stats
    bind {host}:{stats_port}
    stats enable
    stats uri /stats
frontend api
    bind {host}:{front_port}
    default_backend servers
backend servers
    balance roundrobin
    # Like a readiness probe: GET /health every 500 ms, out after one failure, in after one
    # success.
    option httpchk GET /health
    http-check expect status 200
    default-server inter 500ms fall 1 rise 1
    server a {host}:{port_a} check
    server b {host}:{port_b} check
"""


def haproxy_servers(stats_port: int) -> dict[str, tuple[str, int]]:
    """{server: (status, total sessions)} from HAProxy's CSV statistics."""
    rows = [line.split(",") for line in http_get(stats_port, "/stats;csv").splitlines()]
    head = rows[0]
    head[0] = head[0].lstrip("# ")
    col = {name: i for i, name in enumerate(head)}
    return {
        r[col["svname"]]: (r[col["status"]], int(r[col["stot"]] or 0))
        for r in rows[1:]
        if len(r) > col["svname"] and r[col["pxname"]] == "servers"
        and r[col["svname"]] not in ("BACKEND", "FRONTEND")
    }


def wait_haproxy(stats_port: int, server: str, want: str, timeout: float = 30.0) -> float:
    """Seconds until HAProxy reports `server` in state `want` (UP, DOWN)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if haproxy_servers(stats_port).get(server, ("?", 0))[0].startswith(want):
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"HAProxy never saw server {server} {want} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def rolling(phase, haproxy_bin):
    a = phase.server("a", ARGS)
    b = phase.server("b", ARGS)
    a.wait_healthy()
    b.wait_healthy()
    front, stats_port = free_port(), free_port()
    cfg = phase.logs / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(host=HOST, stats_port=stats_port, front_port=front,
                                      port_a=a.port, port_b=b.port))
    phase.spawn("haproxy", [haproxy_bin, "-db", "-f", str(cfg)])
    wait_haproxy(stats_port, "a", "UP")
    wait_haproxy(stats_port, "b", "UP")

    load = phase.load(front, vus=4)
    steady = max(4.0, (SECONDS - 30) / 3)
    time.sleep(steady)
    exit_codes = phase.rolling_restart(
        {"a": a, "b": b}, ARGS, steady, "HAProxy",
        taken_out=lambda name: wait_haproxy(stats_port, name, "DOWN", 10),
        put_back=lambda name: wait_haproxy(stats_port, name, "UP", 10))
    stats = load.stop()
    per_server = {k: v[1] for k, v in haproxy_servers(stats_port).items()}

    phase.note(stats.describe())
    phase.note(f"latency of the 200s: p50 {ms(stats.p(200, 'med'))}, p99 {ms(stats.p(200, 'p(99)'))}, "
               f"max {ms(stats.p(200, 'max'))}")
    phase.note(f"sessions per server slot (old + new process): {per_server}")
    phase.figures.update(stats.figures(), exit_codes=exit_codes, per_server_sessions=per_server)
    return {"stats": stats, "exit_codes": exit_codes, "per_server": per_server}


def test_no_request_fails_during_a_rolling_restart(rolling):
    stats = rolling["stats"]
    assert stats.sent > 0 and stats.failed == 0, (
        f"{stats.failed} of {stats.sent} failed; by (status, code) {dict(stats.refusals)}; "
        f"first ones (t, status or error) {stats.failures[:20]}")


def test_old_servers_exit_0_on_sigterm(rolling):
    assert rolling["exit_codes"] == {"a": 0, "b": 0}


def test_traffic_kept_flowing_to_both_slots(rolling):
    stats = rolling["stats"]
    rate = stats.sent / stats.seconds
    assert rate >= 2, f"{rate:.1f} requests/s"
    assert all(n > 0 for n in rolling["per_server"].values()), rolling["per_server"]
