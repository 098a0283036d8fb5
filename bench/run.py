#!/usr/bin/env python3
"""tch-serve benchmark: every figure side by side with its reference, in one run.

    make bench            (or: .venv/bin/python bench/run.py)

1. Raw forward pass through the project's own model code (examples/forward.rs), fp32 and
   bf16, batch 1..32: the limit of the model on these cores.
2. tch-serve (fp32, then bf16) and the FastAPI peer (../shared/bench/peers/fastapi, its best
   of two configurations) on the same model file and the same JPEG photos, driven by k6 with
   the same closed-loop (N clients) and open-loop (constant arrival rate) load.
3. Server-side stage timings from tch-serve's /metrics beside the client-side figures.

Writes BENCHMARKS.md (tables, ratios, targets) and bench/latency-throughput.png.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/tch-serve")
FORWARD = os.path.join(ROOT, "target/release/examples/forward")
PREPROCESS = os.path.join(ROOT, "target/release/examples/preprocess")
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
VENV_BIN = os.path.join(ROOT, ".venv/bin")
PEER_DIR = os.environ.get("PEER_DIR", os.path.join(ROOT, "..", "shared", "bench", "peers", "fastapi"))
OUT = os.path.join(ROOT, "bench", "out")


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- helpers

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


def wait_healthy(port: int, proc: subprocess.Popen, limit: float = 120.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server on :{port} exited with {proc.returncode}")
        status, _ = http_get(f"http://127.0.0.1:{port}/health", timeout=1)
        if status == 200:
            return time.monotonic() - start
        time.sleep(0.01)
    raise RuntimeError(f"server on :{port} not healthy within {limit}s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), in MB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in out]
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_free(port: int) -> None:
    if http_get(f"http://127.0.0.1:{port}/health", timeout=0.5)[0]:
        raise RuntimeError(f"something already answers on :{port}; stop it first")


def start_tch(port: int, *args: str) -> tuple[subprocess.Popen, float]:
    port_free(port)
    cmd = [BIN, "serve", "--host", "127.0.0.1", "--port", str(port), "--model-dir",
           os.path.join(ROOT, "models/resnet18"), "--max-top-k", "1000", *args]
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(port, proc)


def start_peer(port: int, workers: int, threads: int) -> tuple[subprocess.Popen, float]:
    port_free(port)
    env = dict(os.environ, MODEL_PATH=os.path.join(ROOT, "models/resnet18/model.pt"),
               TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [os.path.join(VENV_BIN, "uvicorn"), "app:app", "--app-dir", PEER_DIR, "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(port, proc)


def k6(url: str, photos: list[str], mode: str, duration: str, vus: int = 1, rate: float = 0) -> dict:
    fd, summary = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, URL=url, PHOTOS=",".join(photos), MODE=mode, DURATION=duration,
               VUS=str(vus), RATE=str(max(1, int(round(rate)))), K6_NO_USAGE_REPORT="true")
    cmd = [shutil.which("k6", path=VENV_BIN) or "k6", "run", "--quiet", "--no-color",
           "--summary-export", summary, os.path.join(ROOT, "bench", "load.js")]
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

    ok = m.get("http_reqs{status:200}", {}).get("count", 0)
    refused = m.get("http_reqs{status:503}", {}).get("count", 0)
    total = m.get("http_reqs", {}).get("count", 0)
    return {
        "ok": ok, "refused": refused, "other": total - ok - refused, "total": total,
        "ok_per_s": ok / secs, "lat_ok": trend("http_req_duration{status:200}"),
        "lat_503": trend("http_req_duration{status:503}"),
        "dropped": m.get("dropped_iterations", {}).get("count", 0),
        # The load generator's share of the machine's cores, which the server did not get.
        "client_share": client_cpu / (secs * (os.cpu_count() or 1)),
    }


def median_of_3(run, key) -> dict:
    """Runs a load phase three times and keeps the median one by `key`: one slow moment of
    a shared machine then moves no figure."""
    runs = sorted((run() for _ in range(3)), key=key)
    return runs[1]


def stage_means(port: int) -> dict:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    text = body.decode()
    out = {}
    for stage in ("queue_wait_seconds", "preprocess_duration_seconds", "inference_duration_seconds", "batch_size"):
        s = re.search(rf"^tch_serve_{stage}_sum (\S+)$", text, re.M)
        c = re.search(rf"^tch_serve_{stage}_count (\S+)$", text, re.M)
        out[stage] = (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)
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


def raw_forward(precision: str, batches: list[int], seconds: float, memory_format: str = "auto") -> list[dict]:
    return json_lines([FORWARD, "--model-dir", os.path.join(ROOT, "models/resnet18"), "--precision", precision,
                       "--memory-format", memory_format,
                       "--batches", ",".join(map(str, batches)), "--seconds", str(seconds)])


def preprocess_cost(photos: list[str], seconds: float) -> list[dict]:
    """Decode + resize + normalise per photo, one thread, through the server's own code."""
    return json_lines([PREPROCESS, "--model-dir", os.path.join(ROOT, "models/resnet18"), "--seconds", str(seconds), *photos])


def sweep(photos: list[str], vus: int, dur: int) -> list[dict]:
    """Saturated throughput and idle latency of tch-serve (fp32) under each SWEEP variant."""
    rows = []
    url = "http://127.0.0.1:8100/predict"
    for label, flags in SWEEP:
        proc, _ = start_tch(8100, *flags)
        try:
            k6(url, photos, "closed", "2s", vus=2)
            idle = k6(url, photos, "closed", f"{dur}s", vus=1)
            before = stage_means(8100)
            sat = k6(url, photos, "closed", f"{dur}s", vus=vus)
            stages = stage_delta(before, stage_means(8100))
        finally:
            stop(proc)
        rows.append({"label": label, "flags": " ".join(flags), "idle": idle, "sat": sat, "stages": stages})
        log(f"  {label}: {sat['ok_per_s']:.1f} img/s (p99 {sat['lat_ok']['p(99)']:.0f} ms), idle p50 {idle['lat_ok']['med']:.1f} ms, "
            f"mean batch {stages['batch_size']:.1f}")
    return rows


def server_suite(name: str, port: int, photos: list[str], proc: subprocess.Popen, vus: int, dur: int,
                 tch: bool, rates: list[float] | None = None, adjacent: tuple[str, list[int]] | None = None) -> dict:
    r: dict = {"name": name, "rss_idle_mb": rss_mb(proc.pid)}
    url = f"http://127.0.0.1:{port}/predict"
    k6(url, photos, "closed", "3s", vus=2)  # warm the connection pools and caches
    if adjacent:
        # The raw forward pass again, right before the server's own phases: these shared
        # machines slow down for a while after minutes of full load, so the reference is
        # measured in the same state as the figures compared with it.
        precision, batches = adjacent
        r["raw_adjacent"] = {str(x["batch"]): x for x in raw_forward(precision, batches, 3.0)}
        log("  raw forward right before: " + ", ".join(f"b{b} {x['images_per_s']:.1f}/s" for b, x in r["raw_adjacent"].items()))
    third = f"{max(3, dur // 3)}s"
    idle = median_of_3(lambda: k6(url, photos, "closed", third, vus=1), key=lambda x: x["lat_ok"]["med"])
    r["idle"] = idle
    before = stage_means(port) if tch else None
    sat = median_of_3(lambda: k6(url, photos, "closed", third, vus=vus), key=lambda x: x["ok_per_s"])
    r["sat"] = sat
    r["rss_loaded_mb"] = rss_mb(proc.pid)
    if tch:
        r["stages"] = stage_delta(before, stage_means(port))
    log(f"  {name}: idle p50 {idle['lat_ok']['med']:.1f} ms; saturated {sat['ok_per_s']:.1f} img/s "
        f"(p50 {sat['lat_ok']['med']:.0f} ms, p99 {sat['lat_ok']['p(99)']:.0f} ms); RSS idle {r['rss_idle_mb']:.0f} MB, loaded {r['rss_loaded_mb']:.0f} MB")
    r["curve"] = []
    for frac in (rates or []):
        rate = frac * sat["ok_per_s"]
        o = k6(url, photos, "open", f"{dur}s", rate=rate)
        r["curve"].append({"frac": frac, "offered": rate, **o})
        log(f"    open loop {frac:.0%} ({rate:.1f}/s): {o['ok_per_s']:.1f} ok/s, p50 {o['lat_ok']['med']:.1f} ms, "
            f"p99 {o['lat_ok']['p(99)']:.1f} ms, 503s {o['refused']}, dropped {o['dropped']}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15, help="length of each load phase")
    ap.add_argument("--vus", type=int, default=16, help="clients of the closed-loop saturation phase")
    ap.add_argument("--forward-seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite BENCHMARKS.md and the plot from bench/out/results.json, measuring nothing")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(OUT, "results.json")) as f:
            results = json.load(f)
        write_report(results)
        plot(results)
        return 0
    if args.quick:
        args.seconds, args.forward_seconds = 5, 1.0
    os.makedirs(OUT, exist_ok=True)
    photos = sorted(glob.glob(os.path.join(ROOT, "target/test-data/photos/*.jpg")))
    if not photos:
        log("no photos: run `make test-data` first")
        return 1
    batches = [1, 2, 4, 8, 16, 32]
    results: dict = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "cpus": os.cpu_count(), "cpu": platform.processor() or cpu_model(), "photos": len(photos)}

    log("raw forward pass (examples/forward.rs, the project's own model code):")
    raw = {}
    for precision in ("fp32", "bf16"):
        raw[precision] = raw_forward(precision, batches, args.forward_seconds)
        log("  " + precision + ": " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in raw[precision]))
    results["raw"] = raw
    contiguous = {}
    for precision in ("fp32", "bf16"):
        contiguous[precision] = raw_forward(precision, [1, 8], args.forward_seconds, "contiguous")
        log(f"  {precision} NCHW: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.1f}/s" for r in contiguous[precision]))
    results["raw_contiguous"] = contiguous

    pre = preprocess_cost(photos, max(0.5, args.forward_seconds / 3))
    results["preprocess"] = pre
    log("preprocessing, one thread: mean %.2f ms per photo" % (sum(p["ms"] for p in pre) / len(pre)))

    dur = args.seconds
    # These shared machines run slower for a while after a minute of full load on every core
    # (seen as the first server phase running 25% slower than the same phase later): let the
    # machine settle before the first server, as it has between the later phases.
    log("settling for 30 s after the raw forward runs")
    time.sleep(30)
    log("tch-serve fp32:")
    proc, startup = start_tch(8100)
    results["startup_s"] = [startup]
    best_batch = lambda prec: max(raw[prec], key=lambda x: x["images_per_s"])["batch"]
    fp32 = server_suite("tch-serve fp32", 8100, photos, proc, args.vus, dur, tch=True,
                        adjacent=("fp32", sorted({1, best_batch("fp32")})),
                        rates=[0.25, 0.5, 0.75, 0.9, 1.0])
    fp32["startup_s"] = startup
    # Overload: twice the saturated throughput, open loop.
    rss_before = rss_mb(proc.pid)
    over = k6("http://127.0.0.1:8100/predict", photos, "open", f"{dur}s", rate=2 * fp32["sat"]["ok_per_s"])
    fp32["overload"] = {**over, "rss_before_mb": rss_before, "rss_after_mb": rss_mb(proc.pid)}
    log(f"  overload 2x: {over['ok_per_s']:.1f} ok/s, {over['refused']} refused (p99 {over['lat_503']['p(99)']:.1f} ms), "
        f"accepted p99 {over['lat_ok']['p(99)']:.0f} ms, RSS {rss_before:.0f} -> {fp32['overload']['rss_after_mb']:.0f} MB")
    answers32 = [post_photo("http://127.0.0.1:8100/predict?top_k=1000", p) for p in photos]
    stop(proc)
    # The same overload with the inference threads at normal priority: what the niceness buys.
    p0, _ = start_tch(8100, "--inference-niceness", "0")
    k6("http://127.0.0.1:8100/predict", photos, "closed", "3s", vus=2)
    over0 = k6("http://127.0.0.1:8100/predict", photos, "open", f"{dur}s", rate=2 * fp32["sat"]["ok_per_s"])
    fp32["overload_nice0"] = over0
    log(f"  overload 2x, --inference-niceness 0: {over0['ok_per_s']:.1f} ok/s, 503 p99 {over0['lat_503']['p(99)']:.1f} ms")
    stop(p0)
    for _ in range(2):  # more start-up samples
        p2, s2 = start_tch(8100)
        results["startup_s"].append(s2)
        stop(p2)
    results["fp32"] = fp32

    log("tch-serve bf16:")
    proc, _ = start_tch(8100, "--precision", "bf16")
    bf16 = server_suite("tch-serve bf16", 8100, photos, proc, args.vus, dur, tch=True, rates=[0.5],
                        adjacent=("bf16", [best_batch("bf16")]))
    answers16 = [post_photo("http://127.0.0.1:8100/predict?top_k=1000", p) for p in photos]
    stop(proc)
    agree, maxdiff = 0, 0.0
    for a, b in zip(answers32, answers16):
        pa = {p["index"]: p["probability"] for p in a["predictions"]}
        pb = {p["index"]: p["probability"] for p in b["predictions"]}
        agree += a["predictions"][0]["index"] == b["predictions"][0]["index"]
        maxdiff = max(maxdiff, max(abs(pa[i] - pb.get(i, 0.0)) for i in pa))
    bf16["top1_agreement"] = agree / len(photos)
    bf16["max_prob_diff"] = maxdiff
    results["bf16"] = bf16

    log("batch policy and thread budget (tch-serve fp32):")
    results["sweep"] = sweep(photos, args.vus, max(5, dur // 2))

    peer = None
    if os.path.exists(os.path.join(PEER_DIR, "app.py")):
        log("FastAPI peer (best of two configurations):")
        best = None
        for workers, threads in ((1, 2), (2, 1)):
            proc, _ = start_peer(8101, workers, threads)
            r = server_suite(f"peer {workers}w x {threads}t", 8101, photos, proc, args.vus, dur, tch=False)
            r["config"] = f"{workers} uvicorn worker(s) x {threads} torch thread(s)"
            stop(proc)
            results.setdefault("peer_configs", []).append(r["sat"]["ok_per_s"])
            if best is None or r["sat"]["ok_per_s"] > best["sat"]["ok_per_s"]:
                best = r
        workers, threads = (1, 2) if best["name"].startswith("peer 1w") else (2, 1)
        proc, _ = start_peer(8101, workers, threads)
        curve = server_suite(best["name"], 8101, photos, proc, args.vus, dur, tch=False,
                             rates=[0.25, 0.5, 0.75, 0.9, 1.0])
        best["curve"] = curve["curve"]
        stop(proc)
        peer = best
    else:
        log(f"peer not found at {PEER_DIR}: skipped")
    results["peer"] = peer

    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results)
    plot(results)
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ---------------------------------------------------------------- report

def write_report(r: dict) -> None:
    raw32 = {x["batch"]: x for x in r["raw"]["fp32"]}
    raw16 = {x["batch"]: x for x in r["raw"]["bf16"]}
    best32 = max(raw32.values(), key=lambda x: x["images_per_s"])
    best16 = max(raw16.values(), key=lambda x: x["images_per_s"])
    fp32, bf16, peer = r["fp32"], r["bf16"], r["peer"]
    e2e32, e2e16 = fp32["sat"]["ok_per_s"], bf16["sat"]["ok_per_s"]
    idle = fp32["idle"]["lat_ok"]["med"]
    half = next((c for c in fp32["curve"] if c["frac"] == 0.5), None)
    over = fp32["overload"]
    startup = max(r["startup_s"])
    pre_mean = sum(p["ms"] for p in r["preprocess"]) / len(r["preprocess"])
    fwd_per_image = best32["ms_per_batch"] / best32["batch"]
    fp32_core = fwd_per_image * r["cpus"]
    bf_core = best16["ms_per_batch"] / best16["batch"] * r["cpus"]
    bf_ref = bf16.get("raw_adjacent", {}).get(str(best16["batch"]), best16)["images_per_s"]

    def ratio_row(what, value, target, ok):
        return f"| {what} | {value} | {target} | {'met' if ok else '**not met**'} |"

    adj = fp32.get("raw_adjacent", {})
    ref_best = adj.get(str(best32["batch"]), best32)["images_per_s"]
    ref_b1 = adj.get("1", raw32[1])["ms_per_batch"]
    rows = [
        ratio_row("fp32 end-to-end / raw forward (best batch, measured right before)",
                  f"{e2e32:.1f} / {ref_best:.1f} = **{e2e32 / ref_best:.2f}x** (raw at the start of the run: {best32['images_per_s']:.1f})",
                  ">= 0.9x", e2e32 >= 0.9 * ref_best),
    ]
    if peer:
        p = peer["sat"]["ok_per_s"]
        rows.append(ratio_row("fp32 end-to-end / FastAPI peer", f"{e2e32:.1f} / {p:.1f} = **{e2e32 / p:.2f}x**", ">= 1.2x", e2e32 >= 1.2 * p))
        rows.append(ratio_row("bf16 end-to-end / FastAPI peer", f"{e2e16:.1f} / {p:.1f} = **{e2e16 / p:.2f}x**", ">= 2.5x", e2e16 >= 2.5 * p))
    rows.append(ratio_row("bf16 raw forward / fp32 raw forward (best batch)", f"{best16['images_per_s']:.1f} / {best32['images_per_s']:.1f} = {best16['images_per_s'] / best32['images_per_s']:.2f}x", "(reference)", True))
    rows.append(ratio_row("bf16 top-1 agreement with fp32", f"{bf16['top1_agreement']:.0%} of {r['photos']} photos; largest probability difference {bf16['max_prob_diff']:.4f}", ">= 99%", bf16["top1_agreement"] >= 0.99))
    if half:
        rows.append(ratio_row("p99 at 50% load / idle latency", f"{half['lat_ok']['p(99)']:.1f} / {idle:.1f} ms = **{half['lat_ok']['p(99)'] / idle:.2f}x**", "<= 2.5x", half["lat_ok"]["p(99)"] <= 2.5 * idle))
    rows.append(ratio_row("idle latency - raw batch-1 forward (measured right before)",
                          f"{idle:.1f} - {ref_b1:.1f} = **{idle - ref_b1:+.1f} ms** (raw at the start of the run: {raw32[1]['ms_per_batch']:.1f} ms)",
                          "<= +5 ms", idle <= ref_b1 + 5))
    rows.append(ratio_row("overload (2x offered): completed / saturated", f"{over['ok_per_s']:.1f} / {e2e32:.1f} = **{over['ok_per_s'] / e2e32:.2f}x**", ">= 0.9x", over["ok_per_s"] >= 0.9 * e2e32))
    rows.append(ratio_row("overload: time to 503, p99", f"{over['lat_503']['p(99)']:.1f} ms ({over['refused']} refused)", "<= 5 ms", over["refused"] > 0 and over["lat_503"]["p(99)"] <= 5))
    rows.append(ratio_row("overload: accepted p99 / RSS before -> after", f"{over['lat_ok']['p(99)']:.0f} ms / {over['rss_before_mb']:.0f} -> {over['rss_after_mb']:.0f} MB", "bounded, flat", over["rss_after_mb"] < over["rss_before_mb"] * 1.5 + 50))
    rows.append(f"| GPU: CUDA fp16, ResNet-50, end-to-end / raw forward | not measured: {'no CUDA device on this machine' if not r.get('cuda') else 'see below'} | >= 0.8x | not measured |")
    rows.append(ratio_row("process start to healthy (ResNet-18, CPU, warm-up included)", f"{startup:.2f} s (worst of {len(r['startup_s'])})", "<= 3 s", startup <= 3))

    def server_row(s):
        lat = s["sat"]["lat_ok"]
        return (f"| {s['name']} | {s['sat']['ok_per_s']:.1f} | {s['idle']['lat_ok']['med']:.1f} | {lat['med']:.0f} | {lat['p(99)']:.0f} "
                f"| {s['rss_idle_mb']:.0f} | {s['rss_loaded_mb']:.0f} |")

    md = [
        "# Benchmarks",
        "",
        "Reproduce with `make bench` (about 15 minutes). Every figure below comes from one run, side by side",
        "with its reference, because absolute times on shared machines drift from run to run: read the ratios.",
        "",
        f"Run: {r['when']}, {r['cpus']} CPUs ({r['cpu']}), ResNet-18 (TorchScript, 224x224), {r['photos']} real JPEG photos",
        f"uploaded as multipart `file` by k6 on the same cores; {r.get('vus', 16)} closed-loop clients for saturation; open-loop phases at a constant arrival rate.",
        "The servers' idle and saturated figures are the median of three runs of a third of a phase each (the batch-policy sweep's are",
        "single runs of half a phase). The raw forward pass is measured at the start",
        "and again right before each tch-serve server's phases; the targets use the latter, because these machines run slower for a while",
        "after minutes of full load (the start-of-run figure is shown beside it).",
        "tch-serve runs with its defaults (`--max-batch-size 8 --max-batch-delay-ms 0`, channels-last weights and input, threads from the CPUs available).",
        "",
        "## Targets",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "What limits the figures:",
        "",
        f"- **End-to-end against the raw forward pass.** Each photo costs {pre_mean:.2f} core-ms of decoding and resizing on top of "
        f"{fp32_core:.1f} core-ms of forward pass (fp32, best batch) or {bf_core:.1f} (bf16), on the same {r['cpus']} cores. "
        f"That alone bounds end-to-end throughput at {fp32_core / (fp32_core + pre_mean):.2f}x the raw forward pass in fp32 "
        f"and {bf_core / (bf_core + pre_mean):.2f}x in bf16. The load generator took {fp32['sat']['client_share']:.0%} of the cores "
        "in the saturated phase; HTTP, multipart parsing, copying the batch and the softmax take the rest. "
        "Making decoding wait while a forward pass runs, so that neither slows the other, was measured too: no gain, and a higher p99.",
        f"- **bf16 against the peer.** bf16 raises the forward pass's speed ({best16['images_per_s'] / best32['images_per_s']:.2f}x fp32 here) "
        "but not the decoding's, so the fixed per-image costs weigh more: end-to-end bf16 reached "
        f"{e2e16 / bf_ref:.2f}x its raw forward pass measured right before ({bf_ref:.1f} images/s)" + (
            f"; the peer's two configurations reached {' and '.join(f'{x:.1f}' for x in r['peer_configs'])} images/s."
            if r.get("peer_configs") else "."),
        f"- **Overload.** At twice the saturated rate the load generator itself took {over['client_share']:.0%} of the cores "
        f"(against {fp32['sat']['client_share']:.0%} when saturated), and every refused request is still received and parsed "
        "before it is refused: the body is read first so that slow uploads never hold a place in the queue.",
        f"- **Idle latency** is the batch-1 forward pass plus decoding ({pre_mean:.1f} ms), the HTTP exchange and waking the idle "
        "threads; a forward pass after an idle gap is slower than back-to-back ones (`examples/forward --gap-ms 200`).",
        "",
        "## Raw forward pass (the project's model code, no HTTP, no decoding)",
        "",
        "| batch | fp32 images/s | fp32 ms/batch | bf16 images/s | bf16 ms/batch |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {b} | {raw32[b]['images_per_s']:.1f} | {raw32[b]['ms_per_batch']:.1f} | {raw16[b]['images_per_s']:.1f} | {raw16[b]['ms_per_batch']:.1f} |" for b in sorted(raw32)],
        "",
        "## Memory format (raw forward pass)",
        "",
        "`--memory-format auto` makes the convolution weights and the input channels-last at load time.",
        "",
        "| precision | batch | NCHW images/s | channels-last images/s | ratio |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {prec} | {c['batch']} | {c['images_per_s']:.1f} | {cl[c['batch']]['images_per_s']:.1f} | {cl[c['batch']]['images_per_s'] / c['images_per_s']:.2f}x |"
          for prec, cl in (("fp32", raw32), ("bf16", raw16)) for c in r["raw_contiguous"][prec]],
        "",
        "## Preprocessing cost (decode, resize, normalise; one thread, the server's own code)",
        "",
        f"Mean {pre_mean:.2f} core-ms per photo, against {fp32_core:.2f} core-ms of forward pass per image at the best fp32 batch "
        f"({fwd_per_image:.2f} ms on all {r['cpus']} cores). Decoding shares the cores with the forward pass, so even with no other cost "
        f"end-to-end fp32 throughput is at most {fp32_core / (fp32_core + pre_mean):.2f}x the raw forward pass "
        f"(bf16: {bf_core / (bf_core + pre_mean):.2f}x); HTTP, multipart parsing and the load generator on the same cores come on top.",
        "",
        "| photo | size | ms | of which decoding |",
        "| --- | --- | --- | --- |",
        *[f"| {os.path.basename(p['file'])} | {p['width']}x{p['height']} | {p['ms']:.2f} | {p['ms_decode']:.2f} |" for p in r["preprocess"]],
        "",
        "## Batch policy and thread budget (tch-serve fp32, shorter phases)",
        "",
        "| variant | flags | saturated images/s | vs defaults | saturated p99 (ms) | idle p50 (ms) | mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {s['label']} | `{s['flags'] or '-'}` | {s['sat']['ok_per_s']:.1f} | {s['sat']['ok_per_s'] / r['sweep'][0]['sat']['ok_per_s']:.2f}x | "
          f"{s['sat']['lat_ok']['p(99)']:.0f} | {s['idle']['lat_ok']['med']:.1f} | {s['stages']['batch_size']:.1f} |" for s in r["sweep"]],
        "",
        "## Servers (client-side, k6)",
        "",
        "| server | saturated images/s | idle latency p50 (ms) | saturated p50 (ms) | saturated p99 (ms) | RSS idle (MB) | RSS loaded (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        server_row(fp32), server_row(bf16),
        *([server_row(peer) + f" ({peer['config']})"] if peer else []),
        "",
        "## Where the time goes (tch-serve, server-side means from /metrics during the saturated phase)",
        "",
        "| server | queue wait (ms) | preprocess per image (ms) | forward per batch (ms) | mean batch size |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {s['name']} | {s['stages']['queue_wait_seconds'] * 1e3:.1f} | {s['stages']['preprocess_duration_seconds'] * 1e3:.1f} | "
          f"{s['stages']['inference_duration_seconds'] * 1e3:.1f} | {s['stages']['batch_size']:.1f} |" for s in (fp32, bf16)],
        "",
        "## Latency against throughput (open loop)",
        "",
        "![latency against throughput](bench/latency-throughput.png)",
        "",
        "| server | offered/s | completed/s | p50 (ms) | p99 (ms) | 503s |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {s['name']} | {c['offered']:.1f} | {c['ok_per_s']:.1f} | {c['lat_ok']['med']:.1f} | {c['lat_ok']['p(99)']:.1f} | {c['refused']} |"
          for s in (fp32, peer) if s for c in s["curve"]],
        "",
        f"The load generator (k6) ran on the same cores: it took {fp32['sat']['client_share']:.0%} of them during the saturated fp32 phase, "
        f"{bf16['sat']['client_share']:.0%} during bf16's, and {over['client_share']:.0%} under overload "
        "(twice the requests, half of them refused), time that neither the raw forward pass nor the server could use.",
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
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(md))
    log("\n".join(md[md.index("## Targets"):md.index("## Targets") + 4 + len(rows)]))
    log("wrote BENCHMARKS.md")


def plot(r: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, color in ((r["fp32"], "tab:blue"), (r["peer"], "tab:orange")):
        if not s:
            continue
        xs = [c["ok_per_s"] for c in s["curve"]]
        ax.plot(xs, [c["lat_ok"]["p(99)"] for c in s["curve"]], "o-", color=color, label=f"{s['name']} p99")
        ax.plot(xs, [c["lat_ok"]["med"] for c in s["curve"]], "s--", color=color, alpha=0.6, label=f"{s['name']} p50")
    ax.set_xlabel("completed requests/s (open loop, 1 image each)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("ResNet-18 on %d CPUs: latency against throughput" % r["cpus"])
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "bench", "latency-throughput.png"), dpi=110)
    log("wrote bench/latency-throughput.png")


if __name__ == "__main__":
    sys.exit(main())
