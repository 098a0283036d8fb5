"""Slow, broken and hostile clients over raw sockets (what no load generator does): slowloris
headers and bodies, uploads and responses abandoned midway, oversized headers, stalled uploads,
half-open connections on the HTTP and gRPC doors. And the normal client measured beside them.
"""

from __future__ import annotations

import socket
import threading
import time

from harness import HOST, post_image

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def upload_head(length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def sequential(port: int, photo: bytes, n: int) -> tuple[list[float], list]:
    """`n` requests one after another: the seconds each 200 took, and what the others got."""
    lat, bad = [], []
    for _ in range(n):
        try:
            status, _, _, took = post_image(port, photo, timeout=30)
        except OSError as e:
            bad.append(type(e).__name__)
            continue
        if status == 200:
            lat.append(took)
        else:
            bad.append(status)
    return lat, bad


class SlowAndBroken:
    """Slowloris headers and bodies, and uploads and responses abandoned midway, on threads
    until stopped; `counts` says what each did and got."""

    def __init__(self, port: int, photo: bytes):
        self.port, self.photo = port, photo
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.counts = {"slow_headers_open": 0, "slow_headers_closed_by_server": 0,
                       "slow_body_open": 0, "slow_body_answers": {}, "upload_aborts": 0,
                       "response_aborts": 0, "rst_aborts": 0}

    def _sock(self) -> socket.socket:
        s = socket.create_connection((HOST, self.port), timeout=5)
        with self.lock:
            self.socks.append(s)
        return s

    def _bump(self, key: str, sub=None) -> None:
        with self.lock:
            if sub is None:
                self.counts[key] += 1
            else:
                self.counts[key][sub] = self.counts[key].get(sub, 0) + 1

    def slow_headers(self) -> None:
        """A header line every second, never the blank line that ends them."""
        try:
            s = self._sock()
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            self._bump("slow_headers_open")
            i = 0
            while not self.stop_event.wait(1.0):
                s.sendall(f"X-Slow-{i}: {'a' * 10}\r\n".encode())
                i += 1
        except OSError:
            self._bump("slow_headers_closed_by_server")

    def slow_body(self) -> None:
        """Complete headers, then the body at 20 bytes a second."""
        try:
            s = self._sock()
            s.sendall(upload_head(len(self.photo)))
            self._bump("slow_body_open")
            sent = 0
            while sent < len(self.photo) and not self.stop_event.wait(0.5):
                s.sendall(self.photo[sent:sent + 10])
                sent += 10
            s.settimeout(0.2)
            try:
                head = s.recv(64)
                if head:
                    self._bump("slow_body_answers", head.split(b"\r\n")[0].decode(errors="replace"))
            except OSError:
                pass
        except OSError as e:
            self._bump("slow_body_answers", type(e).__name__)

    def upload_aborts(self) -> None:
        """Headers and half the body, then close (every other one with a RST)."""
        n = 0
        while not self.stop_event.wait(0.1):
            try:
                s = socket.create_connection((HOST, self.port), timeout=5)
                s.sendall(upload_head(len(self.photo)) + self.photo[: len(self.photo) // 2])
                if n % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self._bump("rst_aborts")
                s.close()
                self._bump("upload_aborts")
                n += 1
            except OSError:
                pass

    def response_aborts(self) -> None:
        """A whole request, then close before (or while) reading the answer."""
        while not self.stop_event.wait(0.1):
            try:
                s = socket.create_connection((HOST, self.port), timeout=5)
                s.sendall(upload_head(len(self.photo)) + self.photo)
                s.close()
                self._bump("response_aborts")
            except OSError:
                pass

    def start(self, slow_headers: int, slow_bodies: int) -> "SlowAndBroken":
        targets = ([self.slow_headers] * slow_headers + [self.slow_body] * slow_bodies
                   + [self.upload_aborts, self.response_aborts])
        for target in targets:
            th = threading.Thread(target=target, daemon=True)
            th.start()
            self.threads.append(th)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for th in self.threads:
            th.join(10)
        with self.lock:
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass


def oversized_header(port: int, size: int) -> tuple[str, float]:
    """A request with one `size`-byte header: the server's status line (or what happened) and
    the seconds it took."""
    t0 = time.monotonic()
    try:
        s = socket.create_connection((HOST, port), timeout=10)
        s.settimeout(10)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        except OSError as e:
            return f"closed while sending ({type(e).__name__})", time.monotonic() - t0
        data = s.recv(256)
        s.close()
        if not data:
            return "connection closed", time.monotonic() - t0
        return data.split(b"\r\n")[0].decode(errors="replace"), time.monotonic() - t0
    except socket.timeout:
        return "hang (no answer in 10 s)", time.monotonic() - t0
    except OSError as e:
        return f"connection reset ({type(e).__name__})", time.monotonic() - t0


def h2_settings_answered(port: int) -> bool:
    """A fresh HTTP/2 connection gets the server's SETTINGS frame: the door accepts and serves
    (what every gRPC client waits for first)."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(H2_PREFACE)
            head = s.recv(9)
            return len(head) == 9 and head[3] == 4
    except OSError:
        return False


def open_stalled(port: int, n: int, hello: bytes, socks: list, errors: dict) -> None:
    """Opens `n` connections that each send `hello` and then nothing; appends them to `socks`."""
    for _ in range(n):
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(hello)
            socks.append(s)
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
