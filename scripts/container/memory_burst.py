"""A burst of the costliest images the server's limits allow, at a container with a memory
limit: called by scripts/container-test.sh (step 8).

    python memory_burst.py write FILE [PIXELS]     a PNG of PIXELS (default 40,000,000, the
                                                   server's --max-image-pixels) 16-bit RGBA
                                                   pixels: 8 bytes each once decoded
    python memory_burst.py send PORT FILE N        N concurrent POST /predict of FILE; prints
                                                   one JSON line {"statuses": {...}, "errors": n}

The image is a mid-grey square compressed to a few hundred kilobytes, far under the body
limit; decoding it takes 320 MB, and its RGB copy 120 MB more. Python's standard library only.
"""

from __future__ import annotations

import http.client
import json
import math
import struct
import sys
import threading
import zlib


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write(path: str, pixels: int) -> None:
    side = math.isqrt(pixels)
    row = b"\x00" + b"\x80\x00" * 4 * side  # filter byte, then RGBA16 mid-grey
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(side)]
    parts.append(z.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))
    print(f"{path}: {side}x{side} RGBA16 ({side * side} pixels)")


def send(port: int, path: str, n: int) -> None:
    body = open(path, "rb").read()
    statuses: dict[str, int] = {}
    errors = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal errors
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            c.request("POST", "/predict", body, {"Content-Type": "image/png"})
            status = str(c.getresponse().status)
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
    print(json.dumps({"statuses": statuses, "errors": errors}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40_000_000)
    else:
        send(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
