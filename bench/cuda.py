#!/usr/bin/env python3
"""CUDA rows: tch-serve end-to-end against the raw forward pass, on one GPU, in one run.

    make bench-cuda                      # builds, exports ResNet-50, runs this
    python3 bench/cuda.py --bin target/release/tch-serve --forward target/release/examples/forward

Needs only the Python standard library and a python with torch + torchvision (for the export),
so it runs on a bare GPU machine beside a copied release build. It

1. exports ResNet-50 (deterministic untrained weights: speed does not depend on them) with
   models/export.py, unless --model-dir names an export;
2. measures the raw forward pass (examples/forward: the server's own model code, 8-bit crops in,
   no HTTP, no decoding) at several batch sizes, fp16 and fp32;
3. starts `tch-serve --device cuda` and drives it with closed-loop HTTP clients uploading JPEGs
   as multipart `file` (several processes of keep-alive connections, on the same machine),
   reading the server's stage histograms from /metrics before and after;
4. prints a JSON summary and a Markdown table with the ratios, and writes both to --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import http.client
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import stage_delta, stage_means  # noqa: E402  (standard library only, as here)
ROOT = os.path.dirname(HERE)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "gpu": sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "torch": sh([sys.executable, "-c", "import torch; print(torch.__version__, 'cuda', torch.version.cuda)"]),
    }


def json_lines(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return 0, b""


# ---------------------------------------------------------------- load generator

def multipart(path: str) -> tuple[bytes, str]:
    boundary = "tchservebench7d1c"
    with open(path, "rb") as f:
        data = f.read()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{os.path.basename(path)}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def client_process(port: int, photos: list[str], threads: int, start_at: float, stop_at: float, q) -> None:
    bodies = [multipart(p) for p in photos]
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = k
        mine, bad = [], 0
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            now = time.time()
            if now >= stop_at:
                break
            body, ctype = bodies[i % len(bodies)]
            i += 1
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            done = time.time()
            if done > stop_at:
                break
            if ok:
                mine.append(done - now)
            else:
                bad += 1
        with lock:
            lat.extend(mine)
            errors[0] += bad

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    cpu = os.times()
    q.put({"lat": lat, "errors": errors[0], "cpu_s": cpu.user + cpu.system})


def drive(port: int, photos: list[str], clients: int, seconds: float, procs: int) -> dict:
    procs = max(1, min(procs, clients))
    per = [clients // procs + (1 if k < clients % procs else 0) for k in range(procs)]
    q = mp.Queue()
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    ps = [mp.Process(target=client_process, args=(port, photos, n, start_at, stop_at, q)) for n in per if n]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    lat = sorted(x for r in results for x in r["lat"])
    n = len(lat)

    def pct(p: float) -> float | None:
        return round(lat[min(n - 1, int(p * n))] * 1000, 1) if n else None

    return {
        "clients": clients,
        "seconds": seconds,
        "images_per_s": round(n / seconds, 1),
        "errors": sum(r["errors"] for r in results),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "client_cpu_share": round(sum(r["cpu_s"] for r in results) / seconds / len(os.sched_getaffinity(0)), 3),
    }


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds used by process `pid`, busy CPU seconds of the whole machine) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    proc = (int(fields[11]) + int(fields[12])) / tick
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return proc, (sum(vals[:8]) - idle) / tick


class GpuSampler:
    """nvidia-smi utilisation samples while a phase runs."""

    def __init__(self):
        self.proc = None
        self.samples: list[float] = []

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "250"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


# ---------------------------------------------------------------- phases

def start_server(binary: str, model_dir: str, port: int, device: str, args: list[str]) -> tuple[subprocess.Popen, float]:
    cmd = [binary, "serve", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
           "--model-dir", model_dir, "--device", device, *args]
    log("+", " ".join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=dict(os.environ, RUST_LOG="warn"))
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"tch-serve exited with {proc.returncode} before it was healthy")
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        if status == 200:
            return proc, time.time() - t0
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("tch-serve was not healthy within 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def predict(port: int, path: str, top_k: int = 5) -> list[dict]:
    body, ctype = multipart(path)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", f"/predict?top_k={top_k}", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise SystemExit(f"/predict answered {r.status}: {data}")
    return data["predictions"]


def parity(a: dict, binary: str, model_dir: str, photos: list[str]) -> dict:
    """Top-1 agreement and the largest top-5 probability difference, CUDA server against a CPU fp32 one."""
    ref_proc, _ = start_server(binary, model_dir, a.port + 1, "cpu", ["--precision", "fp32"])
    try:
        ref = {p: predict(a.port + 1, p) for p in photos}
    finally:
        stop_server(ref_proc)
    out = {}
    for prec in dict.fromkeys(["fp32", a.precision]):
        proc, _ = start_server(binary, model_dir, a.port, a.device, ["--precision", prec])
        try:
            got = {p: predict(a.port, p) for p in photos}
        finally:
            stop_server(proc)
        agree = sum(got[p][0]["index"] == ref[p][0]["index"] for p in photos)
        diff = 0.0
        for p in photos:
            probs = {x["index"]: x["probability"] for x in got[p]}
            diff = max([diff] + [abs(x["probability"] - probs[x["index"]]) for x in ref[p] if x["index"] in probs])
        out[prec] = {"top1_agree": agree, "photos": len(photos), "max_prob_diff": diff}
        log(prec, "parity", out[prec])
    return out


def photos_in(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith((".jpg", ".jpeg")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/tch-serve"))
    ap.add_argument("--forward", default=os.path.join(ROOT, "target/release/examples/forward"))
    ap.add_argument("--model-dir", help="an export to use instead of exporting --arch")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--photos", default=os.path.join(ROOT, "target/test-data/photos"), help="small JPEGs")
    ap.add_argument("--phone", default=os.path.join(ROOT, "target/phone-photos/12mp"), help="12 MP JPEGs (optional)")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--clients", default="32,64", help="closed-loop client counts")
    ap.add_argument("--seconds", type=float, default=12.0, help="per load phase")
    ap.add_argument("--client-procs", type=int, default=4, help="load generator processes")
    ap.add_argument("--server-args", default="", help="extra tch-serve flags, e.g. '--max-batch-size 64'")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu only to try the script out)")
    ap.add_argument("--no-parity", action="store_true", help="skip the CPU-against-CUDA prediction check")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/out/cuda"))
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    res: dict = {"machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    log(json.dumps(res["machine"]))

    model_dir = a.model_dir
    if not model_dir:
        model_dir = os.path.join(a.out, "models", a.arch)
        if not os.path.exists(os.path.join(model_dir, "model.pt")):
            subprocess.run([sys.executable, os.path.join(ROOT, "models/export.py"), "--arch", a.arch, "--out", model_dir,
                            "--force"], check=True)
    res["model"] = json.load(open(os.path.join(model_dir, "metadata.json"))).get("name", a.arch)

    batches = a.batches
    raw = {}
    for prec in dict.fromkeys([a.precision, "fp32"]):
        raw[prec] = json_lines([a.forward, "--model-dir", model_dir, "--device", a.device, "--precision", prec,
                                "--batches", batches, "--seconds", "2"])
        log(prec, "raw", raw[prec])
    res["raw"] = raw
    raw_before = max(r["images_per_s"] for r in raw[a.precision])

    server_args = ["--precision", a.precision, *a.server_args.split()]
    proc, startup = start_server(a.bin, model_dir, a.port, a.device, server_args)
    res["server"] = {"args": " ".join(server_args), "startup_s": round(startup, 2)}
    _, health = http_get(f"http://127.0.0.1:{a.port}/health")
    res["server"]["health"] = json.loads(health or b"{}")
    small = photos_in(a.photos)
    phases = []
    try:
        drive(a.port, small, 16, 3, a.client_procs)  # warm every batch shape and the connection pools
        sets = [("small", small)]
        if a.phone and os.path.isdir(a.phone):
            sets.append(("12mp", photos_in(a.phone)))
        for name, photos in sets:
            for clients in [int(c) for c in a.clients.split(",")]:
                before, cpu0, t0 = stage_means(a.port), cpu_seconds(proc.pid), time.time()
                with GpuSampler() as gpu:
                    r = drive(a.port, photos, clients, a.seconds, a.client_procs)
                cpu1, dt = cpu_seconds(proc.pid), time.time() - t0
                ncpu = len(os.sched_getaffinity(0))
                r.update(photos=name, gpu_util=gpu.mean(), stages=stage_delta(before, stage_means(a.port)),
                         server_cpu_share=round((cpu1[0] - cpu0[0]) / dt / ncpu, 3),
                         machine_cpu_share=round((cpu1[1] - cpu0[1]) / dt / ncpu, 3))
                log(json.dumps(r))
                phases.append(r)
        idle = drive(a.port, small, 1, 5, 1)
        idle["photos"] = "small"
        res["idle"] = idle
    finally:
        stop_server(proc)
    res["phases"] = phases
    raw_after = json_lines([a.forward, "--model-dir", model_dir, "--device", a.device, "--precision", a.precision,
                            "--batches", batches, "--seconds", "2"])
    res["raw_after"] = raw_after
    best_raw = max(raw_before, max(r["images_per_s"] for r in raw_after))
    res["best_raw"] = best_raw
    res["parity"] = {} if a.no_parity else parity(a, a.bin, model_dir, small)

    lines = [
        f"Run: {res['time']}, {res['machine']['gpu']}, {res['machine']['cpus']} CPUs ({res['machine']['cpu']}), "
        f"torch {res['machine']['torch']}; {res['model']} {a.precision}, tch-serve `{res['server']['args']}`, "
        f"started in {res['server']['startup_s']} s. Clients: Python keep-alive HTTP, {a.client_procs} processes on the same machine.",
        "",
        "| batch | " + " | ".join(f"raw {p} images/s" for p in raw) + f" | raw {a.precision} after the load |",
        "| --- | " + " | ".join("---" for _ in raw) + " | --- |",
    ]
    for i, b in enumerate(batches.split(",")):
        cells = [f"{raw[p][i]['images_per_s']:.0f}" for p in raw]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {raw_after[i]['images_per_s']:.0f} |")
    lines += [
        "",
        "| photos | clients | end-to-end images/s | / best raw forward | p50 ms | p99 ms | mean batch | preprocess ms/image | forward ms/batch | GPU util % | server / client / machine CPU share | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in phases:
        st = r["stages"]

        def ms(v):
            return f"{v * 1000:.2f}" if v == v else "-"  # NaN: no image in the phase

        lines.append(
            f"| {r['photos']} | {r['clients']} | {r['images_per_s']:.0f} | {r['images_per_s'] / best_raw:.2f}x | {r['p50_ms']} | "
            f"{r['p99_ms']} | {st['batch_size']:.1f} | {ms(st['preprocess_duration_seconds'])} | "
            f"{ms(st['inference_duration_seconds'])} | {r['gpu_util']} | {r['server_cpu_share']:.0%} / {r['client_cpu_share']:.0%} / {r['machine_cpu_share']:.0%} | {r['errors']} |")
    lines += ["", f"Idle latency (1 client, small photos): p50 {res['idle']['p50_ms']} ms, p99 {res['idle']['p99_ms']} ms; "
              f"raw batch-1 forward {1000 / raw[a.precision][0]['images_per_s']:.2f} ms."]
    for prec, p in res["parity"].items():
        lines.append(f"Against the CPU fp32 server on the same {p['photos']} photos, {a.device} {prec}: top-1 agrees on "
                     f"{p['top1_agree']}/{p['photos']}, largest top-5 probability difference {p['max_prob_diff']:.2g}.")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "cuda.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "cuda.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
