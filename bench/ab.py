#!/usr/bin/env python3
"""Two builds of tch-serve side by side, end to end on the small photos, in turns (A B A B) so
that both see the machine in the same state: saturated images/s and idle p50 latency of each
turn (bench/run.py's server phases, k6), then the ratios B / A.

    .venv/bin/python bench/ab.py "thin LTO=/tmp/tch-serve-lto" "no LTO=target/release/tch-serve"

Options: --model models/resnet18, --rounds 2, --seconds 30, --vus 8.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs=2, metavar="NAME=BINARY")
    ap.add_argument("--model", default=os.path.join(bench.ROOT, "models", "resnet18"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--vus", type=int, default=8)
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.builds]
    photos = sorted(glob.glob(os.path.join(bench.ROOT, "target/test-data/photos/*.jpg")))
    if not photos or any(len(b) != 2 or not os.access(b[1], os.X_OK) for b in builds):
        ap.error("needs two NAME=BINARY arguments naming executables, and the test photos (make test-data)")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in builds}
    for turn in range(args.rounds):
        for name, binary in builds:
            bench.BIN = binary
            server = bench.start_tch(args.model, name=f"{name} #{turn + 1}")
            try:
                r = bench.server_suite(server, photos, args.vus, args.seconds)
            finally:
                bench.stop(server)
            runs[name].append((r["sat"]["ok_per_s"], r["idle"]["lat_ok"]["med"]))
    (a, _), (b, _) = builds
    for name, rows in runs.items():
        print(f"{name}: saturated {', '.join(f'{x[0]:.1f}' for x in rows)} images/s; "
              f"idle p50 {', '.join(f'{x[1]:.1f}' for x in rows)} ms")
    sat = sum(x[0] for x in runs[b]) / sum(x[0] for x in runs[a])
    idle = sum(x[1] for x in runs[b]) / sum(x[1] for x in runs[a])
    print(f"{b} / {a}: saturated throughput {sat:.3f}x, idle p50 latency {idle:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
