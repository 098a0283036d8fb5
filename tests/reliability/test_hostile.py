"""Hostile clients against one server with default settings:

- stalled uploads: 200 connections send the headers of a 1 MB upload and 10 bytes of it, then
  nothing. While they are held a normal client's requests must all be answered 200; the memory
  they hold is what they sent; each is then answered 408 request_timeout once it falls behind
  the minimum upload rate (--upload-rate-grace-secs, 5 s by default), and the server's open
  file descriptors come back.
- half-open connections, on each door: 3,000 connections each send half a request line (HTTP)
  or the HTTP/2 preface (gRPC) and stay, over --max-connections (1024 by default). Newcomers take
  the place of the connection stuck the longest: the normal client, sending requests while they
  open and after, gets only 200s; the server's connections stay at the cap; its file
  descriptors come back when the clients go.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from adversaries import H2_PREFACE, h2_settings_answered, open_stalled, sequential, upload_head
from harness import HOST, free_port, http_status, metric, metrics, pct, raise_fd_limit, wait_until

CAP = 1024  # --max-connections' default
STALLED_UPLOADS = 200


@pytest.fixture(scope="module")
def server(phase):
    grpc_port = free_port()
    s = phase.server("server", ["--warmup-iterations", "2", "--grpc-port", str(grpc_port)])
    s.grpc_port = grpc_port
    s.wait_healthy()
    return s


@pytest.fixture(scope="module")
def stalled_uploads(server, phase, photo):
    n = STALLED_UPLOADS
    fds0 = server.fds()
    socks = []
    t_open = time.monotonic()
    for _ in range(n):
        s = socket.create_connection((HOST, server.port), timeout=5)
        s.sendall(upload_head(1_000_000) + photo[:10])
        socks.append(s)
    receiving = wait_until(lambda: metric(metrics(server.port), "tch_serve_uploads_in_progress") == n, 10)
    fds_during = server.fds()
    buffered = metric(metrics(server.port), "tch_serve_upload_buffered_bytes")
    lat, bad = sequential(server.port, photo, 10)
    held_after = metric(metrics(server.port), "tch_serve_uploads_in_progress")
    answers: dict[str, int] = {}
    for s in socks:
        s.settimeout(30)
        try:
            data = s.recv(4096)
            line = data.split(b"\r\n")[0].decode(errors="replace") if data else "closed"
            code = "request_timeout" if b'"code":"request_timeout"' in data else "?"
            key = f"{line} {code}" if data else line
        except OSError as e:
            key = type(e).__name__
        answers[key] = answers.get(key, 0) + 1
    answered_in = time.monotonic() - t_open
    for s in socks:
        s.close()
    wait_until(lambda: server.fds() <= fds0 + 5, 15)
    fds_after = server.fds()
    phase.note(f"stalled uploads: {n} held (uploads in progress "
               f"{'= ' + str(n) if receiving else 'never reached ' + str(n)}), upload memory held "
               f"{buffered:.0f} bytes; normal client {len(lat)} x 200, others {bad}, p50 "
               f"{pct(lat, 50) * 1000:.1f} ms")
    phase.note(f"stalled uploads answered: {answers} (all within {answered_in:.1f} s of their start); "
               f"server fds {fds0} before, {fds_during} while held, {fds_after} after")
    phase.figures["stalled_uploads"] = {
        "connections": n, "fds": [fds0, fds_during, fds_after], "upload_bytes_held": buffered,
        "normal_200": len(lat), "normal_other": bad, "answers": answers,
        "all_answered_after_s": round(answered_in, 1)}
    return {"receiving": receiving, "lat": lat, "bad": bad, "held_after": held_after,
            "buffered": buffered, "answers": answers, "fds": (fds0, fds_during, fds_after)}


def test_stalled_uploads_hold_no_place_a_normal_client_needs(stalled_uploads):
    u = stalled_uploads
    assert u["receiving"], f"the server never reported {STALLED_UPLOADS} uploads in progress"
    assert not u["bad"] and len(u["lat"]) == 10, f"normal client: {len(u['lat'])} x 200, others {u['bad']}"
    assert u["held_after"] == STALLED_UPLOADS, f"uploads still held after: {u['held_after']}"


def test_stalled_uploads_hold_the_bytes_they_sent(stalled_uploads):
    assert stalled_uploads["buffered"] == 10 * STALLED_UPLOADS, f"{stalled_uploads['buffered']} bytes held"


def test_stalled_uploads_are_answered_408_once_behind_the_minimum_rate(stalled_uploads):
    answers = stalled_uploads["answers"]
    assert answers.get("HTTP/1.1 408 Request Timeout request_timeout") == STALLED_UPLOADS, answers


def test_stalled_uploads_leave_no_fds(stalled_uploads):
    fds0, during, after = stalled_uploads["fds"]
    assert after <= fds0 + 5, f"{fds0} -> {during} -> {after}"


@pytest.fixture(scope="module", params=["http", "grpc"])
def flood(request, server, phase, photo):
    door = request.param
    door_port = server.grpc_port if door == "grpc" else server.port
    n = min(3000, raise_fd_limit() - 200)  # one descriptor each here; room for the rest
    hello = H2_PREFACE if door == "grpc" else b"GET /predict HT"
    fds0 = server.fds()
    socks: list[socket.socket] = []
    errors: dict[str, int] = {}
    opener = threading.Thread(target=open_stalled, args=(door_port, n, hello, socks, errors), daemon=True)
    peak = {"fds": fds0, "done": False}

    def sample() -> None:
        while not peak["done"]:
            try:
                peak["fds"] = max(peak["fds"], server.fds())
            except OSError:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    opener.start()
    sampler.start()
    during, during_bad = [], []
    while opener.is_alive():  # the normal client, while they open
        lat, bad = sequential(server.port, photo, 1)
        during += lat
        during_bad += bad
    opened_in = time.monotonic() - t0
    text = metrics(server.port)
    open_now = metric(text, f'tch_serve_connections_open{{door="{door}"}}')
    in_headers = metric(text, f'tch_serve_connections_by_state{{door="{door}",state="headers"}}')
    after, after_bad = sequential(server.port, photo, 20)
    door_serves = h2_settings_answered(door_port) if door == "grpc" else True
    text = metrics(server.port)
    evicted = metric(text, f'tch_serve_connections_closed_total{{door="{door}",reason="evicted"}}') or 0
    refused = metric(text, f'tch_serve_connections_refused_total{{door="{door}",reason="max_connections"}}') or 0
    health = http_status(server.port, "/health")
    for s in socks:
        s.close()
    wait_until(lambda: server.fds() <= fds0 + 5, 20)
    peak["done"] = True
    sampler.join()
    fds_during, fds_after = max(peak["fds"], fds0), server.fds()
    lat = during + after
    phase.note(f"half-open ({door} door): opened {n} in {opened_in:.1f} s (client errors {errors}); "
               f"server: {open_now} open ({in_headers} in headers), {evicted:.0f} evicted, {refused:.0f} refused")
    phase.note(f"half-open ({door} door): normal client {len(during)} x 200 while they opened, "
               f"{len(after)} x 200 after, others {during_bad + after_bad}, p50 {pct(lat, 50) * 1000:.1f} ms; "
               f"server fds {fds0} before, {fds_during} at most, {fds_after} after")
    phase.figures[f"half_open_{door}"] = {
        "connections": n, "opened_in_s": round(opened_in, 1), "client_errors": errors,
        "server_connections_open": open_now, "in_headers": in_headers, "evicted": evicted,
        "refused": refused, "fds": [fds0, fds_during, fds_after],
        "normal_200": [len(during), len(after)], "normal_other": during_bad + after_bad}
    return {"door": door, "n": n, "bad": during_bad + after_bad, "after": after, "health": health,
            "door_serves": door_serves, "open": open_now, "evicted": evicted, "refused": refused,
            "fds": (fds0, fds_during, fds_after)}


def test_half_open_flood_leaves_the_normal_client_only_200s(flood):
    assert not flood["bad"] and len(flood["after"]) == 20 and flood["health"] == 200, (
        f"others {flood['bad']}, {len(flood['after'])} of 20 after, /health {flood['health']}")
    assert flood["door_serves"], f"a new connection to the {flood['door']} door was not served"


def test_half_open_flood_is_held_to_max_connections_by_evicting_the_oldest(flood):
    # The server keeps --max-connections places and closes the ones it displaces at once; up to
    # 16 may still be closing when a newcomer is accepted (the scrape of /metrics is one).
    assert flood["open"] is not None and flood["open"] <= CAP + 16, f"{flood['open']} open"
    assert flood["evicted"] >= flood["n"] - CAP and flood["refused"] == 0, (
        f"{flood['evicted']} evicted, {flood['refused']} refused")


def test_half_open_flood_fds_bounded_and_returned(flood):
    fds0, during, after = flood["fds"]
    assert during <= fds0 + CAP + 36 and after <= fds0 + 5, f"{fds0} -> {during} -> {after}"
