"""NVIDIA's perf_analyzer (Triton's load generator; bench/perf-analyzer.sh installs it) against
the real server, as it runs against Triton: it reads the model's metadata and configuration
(the model configuration extension), sends BYTES images at a fixed concurrency through each
door, reads the server's side of the time from the statistics extension, and reports throughput
and latency. A short run here; the figures are in BENCHMARKS.md (make bench, part perf)."""

import base64
import csv
import glob
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import PRETRAINED, ROOT, env


@pytest.fixture(scope="module")
def perf_analyzer():
    binary = Path(env("TCH_SERVE_PERF_ANALYZER", ROOT / ".venv-perf/bin/perf_analyzer"))
    assert binary.is_file(), f"{binary} is missing: run bench/perf-analyzer.sh"
    venv = binary.parent.parent
    libs = glob.glob(str(venv / "lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    environ = dict(os.environ, LD_LIBRARY_PATH=":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]))
    return binary, environ


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_perf_analyzer_drives_each_door(door, perf_analyzer, http_url, grpc_url, accuracy, tmp_path):
    binary, environ = perf_analyzer
    # perf_analyzer sends a b64 BYTES element as it is: the tensor's raw form, a 4-byte
    # little-endian length and then the file.
    data = tmp_path / "images.json"
    data.write_text(json.dumps({"data": [
        {"image": {"b64": base64.b64encode(struct.pack("<I", len(photo)) + photo).decode()}}
        for _, photo, _ in accuracy[:4]
    ]}))
    report = tmp_path / "report.csv"
    # A fixed count of requests, measured once: the test is about the doors, not about how
    # steady a shared 2-core machine is (perf_analyzer's windows search for a stable figure and
    # give up, exit status 2, when the machine is noisy).
    cmd = [str(binary), "-m", PRETRAINED, "-i", door, "-u", http_url if door == "http" else grpc_url,
           "--input-data", str(data), "--concurrency-range", "2", "--request-count", "40",
           "-f", str(report)]
    run = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    (row,) = list(csv.DictReader(report.open()))
    assert float(row["Inferences/Second"]) > 0, row
    assert float(row["p50 latency"]) > 0, row
    # The server's side, from the statistics extension.
    assert "Server:" in out and "Inference count:" in out, out
    server_count = int(out.split("Inference count:")[-1].split()[0])
    assert server_count > 0, out
