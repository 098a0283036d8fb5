"""Phase c, hostile clients, against the real binary (called by reliability.py's test_clients on
its server, default settings):

- slow uploads: 200 connections send the headers of a 1 MB upload and 10 bytes of it, then
  nothing. While they are held, a normal client's requests must all be answered 200 (they held
  64 upload places once, and everyone else got 503 for the whole request timeout); the memory
  they hold is what they sent; each is then answered 408 `request_timeout` once it falls behind
  the minimum upload rate (--upload-rate-grace-secs, 5 s by default), and the server's open
  file descriptors come back.
- half-open connections: 3,000 connections each send half a request line and stay, over
  --max-connections (1024 by default); then 3,000 more to the gRPC port, each sending the
  HTTP/2 preface and stalling (the gRPC door keeps the same cap with its own count). Newcomers take the place of the connection stuck in its
  headers the longest: the normal client, sending requests while they open and after, must
  get only 200s; the server's connections stay at the cap; its file descriptors come back when
  the clients go.

Figures (fds before, during, after; the normal client's answers and latencies) go to
FIGURES["hostile"]. Python's standard library only.
"""

from __future__ import annotations

import resource
import socket
import threading
import time


def raise_fd_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit (the servers it starts
    inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def metrics(R, port: int) -> str:
    try:
        return R.http_get(port, "/metrics")
    except OSError:
        return ""


def wait_for(predicate, timeout: float, every: float = 0.1) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def normal_client(R, port: int, photo: bytes, n: int) -> tuple[list[float], list]:
    """`n` sequential requests: the latencies of the 200s, and what the others got."""
    return R.sequential_latencies(port, photo, n)


def slow_uploads(R, server, port: int, photo: bytes, n: int = 200) -> dict:
    R.note(f"slow uploads: {n} connections send the headers of a 1 MB upload and 10 bytes, then stall")
    fds0 = server.fds()
    socks = []
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    t_open = time.monotonic()
    for _ in range(n):
        s = socket.create_connection((R.HOST, port), timeout=5)
        s.sendall(head + photo[:10])
        socks.append(s)
    receiving = wait_for(lambda: R.metric(metrics(R, port), "tch_serve_uploads_in_progress") == n, 10)
    fds_during = server.fds()
    buffered = R.metric(metrics(R, port), "tch_serve_upload_buffered_bytes")
    lat, bad = normal_client(R, port, photo, 10)
    held_after = R.metric(metrics(R, port), "tch_serve_uploads_in_progress")
    # Then each is answered when it falls behind the minimum rate.
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
    cut_after = time.monotonic() - t_open
    for s in socks:
        s.close()
    wait_for(lambda: server.fds() <= fds0 + 5, 15)
    fds_after = server.fds()
    fig = {
        "connections": n, "fds_before": fds0, "fds_during": fds_during, "fds_after": fds_after,
        "uploads_in_progress": n if receiving else None, "upload_bytes_held": buffered,
        "normal_200": len(lat), "normal_other": bad,
        "normal_p50_ms": round(R.pct(lat, 50) * 1000, 1) if lat else None,
        "normal_max_ms": round(max(lat) * 1000, 1) if lat else None,
        "slow_uploads_still_held_after_normal_requests": held_after,
        "slow_upload_answers": answers, "all_answered_after_s": round(cut_after, 1),
    }
    R.note(f"  held {n} (uploads in progress {'= ' + str(n) if receiving else 'never reached ' + str(n)}), "
           f"upload memory held {buffered:.0f} bytes; normal client: {len(lat)} x 200, others {bad}, "
           f"p50 {fig['normal_p50_ms']} ms, max {fig['normal_max_ms']} ms")
    R.note(f"  slow uploads answered: {answers} (all within {cut_after:.1f} s of their start)")
    R.note(f"  server fds: {fds0} before, {fds_during} while held, {fds_after} after")
    R.check("slow uploads: all held while a normal client is served (10 x 200, none refused)",
            receiving and not bad and len(lat) == 10 and held_after == n,
            f"{len(lat)} x 200, others {bad}, uploads still held {held_after}")
    R.check("slow uploads: they hold the bytes they sent (10 each), not a place each",
            buffered == 10 * n, f"{buffered} bytes held")
    R.check("slow uploads: each answered 408 request_timeout once behind the minimum rate",
            answers.get("HTTP/1.1 408 Request Timeout request_timeout") == n, str(answers))
    R.check("slow uploads: server fds back near the baseline (+5)", fds_after <= fds0 + 5,
            f"{fds0} -> {fds_during} -> {fds_after}")
    return fig


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def h2_settings_answered(R, port: int) -> bool:
    """A fresh HTTP/2 connection to `port` gets the server's SETTINGS frame: the door accepts
    and serves (what every gRPC client waits for first)."""
    try:
        with socket.create_connection((R.HOST, port), timeout=5) as s:
            s.sendall(H2_PREFACE)
            head = s.recv(9)
            return len(head) == 9 and head[3] == 4
    except OSError:
        return False


def half_open_flood(R, server, port: int, photo: bytes, n: int, cap: int,
                    door: str = "http", door_port: int | None = None) -> dict:
    """`n` connections to the door that stall: half a request line on the HTTP door, the
    HTTP/2 preface and SETTINGS on the gRPC door. The normal client uses the HTTP door."""
    door_port = door_port or port
    hello = H2_PREFACE if door == "grpc" else b"GET /predict HT"
    what = "send the HTTP/2 preface" if door == "grpc" else "send half a request line"
    R.note(f"half-open connections ({door} door): {n} connections {what} and stay "
           f"(--max-connections {cap})")
    fds0 = server.fds()
    socks: list[socket.socket] = []
    opened = threading.Event()
    errors: dict[str, int] = {}

    def flood() -> None:
        for _ in range(n):
            try:
                s = socket.create_connection((R.HOST, door_port), timeout=5)
                s.sendall(hello)
                socks.append(s)
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        opened.set()

    peak = {"fds": fds0}

    def sample() -> None:
        while not opened.is_set() or not peak.get("done"):
            peak["fds"] = max(peak["fds"], server.fds())
            time.sleep(0.1)

    t0 = time.monotonic()
    th = threading.Thread(target=flood, daemon=True)
    th.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Meanwhile, and after: the normal client.
    during, during_bad = [], []
    while not opened.is_set():
        lat, bad = normal_client(R, port, photo, 1)
        during += lat
        during_bad += bad
    open_in = time.monotonic() - t0
    text = metrics(R, port)
    open_now = R.metric(text, f'tch_serve_connections_open{{door="{door}"}}')
    headers_now = R.metric(text, f'tch_serve_connections_by_state{{door="{door}",state="headers"}}')
    after, after_bad = normal_client(R, port, photo, 20)
    door_serves = h2_settings_answered(R, door_port) if door == "grpc" else True
    text = metrics(R, port)
    evicted = R.metric(text, f'tch_serve_connections_closed_total{{door="{door}",reason="evicted"}}') or 0
    refused = R.metric(text, f'tch_serve_connections_refused_total{{door="{door}",reason="max_connections"}}') or 0
    fds_during = max(peak["fds"], server.fds())
    health = R.http_status(port, "/health")
    for s in socks:
        s.close()
    wait_for(lambda: server.fds() <= fds0 + 5, 20)
    peak["done"] = True
    fds_after = server.fds()
    lat = during + after
    fig = {
        "connections": n, "opened_in_s": round(open_in, 1), "client_errors": errors,
        "max_connections": cap, "server_connections_open": open_now,
        "server_connections_in_headers": headers_now, "evicted": evicted,
        "refused_max_connections": refused,
        "fds_before": fds0, "fds_during": fds_during, "fds_after": fds_after,
        "normal_200_during_flood": len(during), "normal_200_after_flood": len(after),
        "normal_other": during_bad + after_bad,
        "normal_p50_ms": round(R.pct(lat, 50) * 1000, 1) if lat else None,
        "normal_max_ms": round(max(lat) * 1000, 1) if lat else None,
    }
    R.note(f"  opened {n} in {open_in:.1f} s (client errors {errors}); server: {open_now:.0f} "
           f"connections open ({headers_now:.0f} in headers), {evicted:.0f} evicted, "
           f"{refused:.0f} refused")
    R.note(f"  normal client: {len(during)} x 200 while they opened, {len(after)} x 200 after, "
           f"others {during_bad + after_bad}; p50 {fig['normal_p50_ms']} ms, max {fig['normal_max_ms']} ms")
    R.note(f"  server fds: {fds0} before, {fds_during} at most during, {fds_after} after")
    fig["door"] = door
    fig["door_serves_a_new_connection"] = door_serves
    R.check(f"half-open connections ({door} door): the normal client gets only 200s among {n} of them"
            + (", and a new gRPC connection is served" if door == "grpc" else ""),
            not during_bad and not after_bad and len(after) == 20 and health == 200 and door_serves,
            f"{len(during) + len(after)} x 200, others {during_bad + after_bad}, /health {health}, "
            f"new connection on the door served: {door_serves}")
    # The server keeps --max-connections places, and closes the ones it displaces at once; up
    # to 16 may still be closing when a newcomer is accepted (the scrape of /metrics is one).
    R.check(f"half-open connections ({door} door): the server holds at most --max-connections (+16 closing), "
            "making room by closing the oldest stuck ones (none refused)",
            open_now is not None and open_now <= cap + 16 and evicted >= n - cap and refused == 0,
            f"{open_now} open, {evicted} evicted, {refused} refused")
    R.check(f"half-open connections ({door} door): server fds bounded during (baseline + cap + 16 + 20) and back "
            "near the baseline (+5) after",
            fds_during <= fds0 + cap + 36 and fds_after <= fds0 + 5,
            f"{fds0} -> {fds_during} -> {fds_after}")
    return fig


def test_hostile(R, server, port: int, photo: bytes, grpc_port: int | None = None) -> None:
    limit = raise_fd_limit()
    cap = 1024
    # Each half-open connection is one descriptor here; keep room for the rest.
    n = min(3000, limit - 200)
    R.FIGURES["hostile"] = {
        "slow_uploads": slow_uploads(R, server, port, photo),
        "half_open": half_open_flood(R, server, port, photo, n, cap),
        "open_file_limit": limit,
    }
    if grpc_port:
        R.FIGURES["hostile"]["half_open_grpc"] = half_open_flood(
            R, server, port, photo, n, cap, door="grpc", door_port=grpc_port)
