"""The costliest images the server's limits allow, for the memory burst of
test_08_memory.py: a PNG of 40,000,000 (the server's --max-image-pixels) 16-bit RGBA
pixels, 8 bytes each once decoded, and N concurrent POST /predict of it.

The image is a mid-grey square compressed to a few hundred kilobytes, far under the body
limit; decoding it takes 320 MB, and its RGB copy 120 MB more. Python's standard library only.
"""

from __future__ import annotations

import http.client
import math
import struct
import threading
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, pixels: int = 40_000_000) -> tuple[int, int]:
    """Writes a square 16-bit RGBA PNG of about `pixels` pixels; its (width, height)."""
    side = math.isqrt(pixels)
    row = b"\x00" + b"\x80\x00" * 4 * side  # filter byte, then RGBA16 mid-grey
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(side)]
    parts.append(z.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)))
        f.write(_chunk(b"IDAT", b"".join(parts)))
        f.write(_chunk(b"IEND", b""))
    return side, side


def send(port: int, body: bytes, n: int, timeout: float = 300) -> dict:
    """`n` concurrent POST /predict of `body` to 127.0.0.1:`port`:
    {"statuses": {"200": k, ...}, "errors": connections that got no answer}."""
    statuses: dict[str, int] = {}
    errors = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal errors
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            c.request("POST", "/predict", body, {"Content-Type": "image/png"})
            r = c.getresponse()
            r.read()
            status = str(r.status)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        except OSError:
            with lock:
                errors += 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": statuses, "errors": errors}
