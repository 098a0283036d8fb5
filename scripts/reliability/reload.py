"""Reliability phase f: loading, reloading and unloading models while serving, under load.

One server on a model repository made here (target/reliability/reload-repo) from the exported
model: `resnet18` in version folder 1 and a second model `spare`, with --enable-model-control.
Four clients post a photo to /predict (resnet18, the default model) without pause, while:

  1. resnet18 is reloaded in place (POST /models/resnet18/load);
  2. version 2 appears in the repository and is loaded: it warms beside version 1 and is
     swapped in, requests in flight finish on version 1;
  3. a broken version 3 appears (metadata.json is not JSON): its load is refused (500
     model_load_failed) and version 2 goes on serving;
  4. `spare` is unloaded and loaded again, and answers afterwards.

Checks: not one request of the load fails; each step answers as it should; /models reports
the served version and the failed one with its reason.

Called from reliability.py (`--only reload`), which passes itself as `rel` for its helpers.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request


def post(port: int, path: str, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def copy_model(src, dst) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "metadata.json"):
        shutil.copy(src / name, dst / name)


def test_reload(rel, photo: bytes, duration: float) -> None:
    rel.step("f. Loading, reloading and unloading models under load (--enable-model-control)")
    repo = rel.WORK / "reload-repo"
    shutil.rmtree(repo, ignore_errors=True)
    copy_model(rel.MODEL_DIR, repo / "resnet18" / "1")
    copy_model(rel.MODEL_DIR, repo / "spare")
    port = rel.free_port()
    server = rel.Server(
        "reload", port,
        ["--enable-model-control", "--default-model", "resnet18", "--warmup-iterations", "1",
         "--intra-op-threads", "1", "--preprocess-threads", "1", "--cpu-budget", "2"],
        models=["--model-repository", str(repo)],
    ).start()
    server.wait_healthy()
    load = rel.LoadGenerator(port, photo, clients=4).start()
    t0 = time.monotonic()
    pause = max(2.0, duration / 6)

    def mark(what: str) -> None:
        rel.note(f"t={time.monotonic() - t0:5.1f}s  {what}")

    time.sleep(pause)
    status, body = post(port, "/models/resnet18/load")
    mark(f"reload of resnet18 in place: {status} {body.get('state')} version {body.get('version')}")
    rel.check("reload: in-place reload answers 200 ready", status == 200 and body.get("state") == "ready",
              f"{status} {body.get('state')}")
    time.sleep(pause)
    copy_model(rel.MODEL_DIR, repo / "resnet18" / "2")
    status, body = post(port, "/models/resnet18/load")
    mark(f"version 2 loaded: {status} version {body.get('version')}")
    rel.check("reload: a new version is loaded and served", status == 200 and body.get("version") == 2,
              f"{status} version {body.get('version')}")
    time.sleep(pause)
    (repo / "resnet18" / "3").mkdir()
    (repo / "resnet18" / "3" / "metadata.json").write_text("{ not json")
    status, body = post(port, "/models/resnet18/load")
    mark(f"broken version 3: {status} {body.get('code')}")
    rel.check("reload: a broken version is refused (500 model_load_failed)",
              status == 500 and body.get("code") == "model_load_failed", f"{status} {body}")
    _, view = get(port, "/models/resnet18")
    versions = {v["version"]: v for v in view.get("versions", [])}
    rel.check("reload: version 2 goes on serving, version 3 is reported failed with its reason",
              view.get("version") == 2 and view.get("state") == "ready"
              and versions.get(3, {}).get("state") == "failed" and "metadata.json" in versions.get(3, {}).get("reason", ""),
              f"serving {view.get('version')} ({view.get('state')}); v3 {versions.get(3)}")
    time.sleep(pause)
    status, body = post(port, "/models/spare/unload")
    mark(f"spare unloaded: {status} {body.get('state')}")
    status_gone, _ = get(port, "/models/spare")
    status, body = post(port, "/models/spare/load")
    mark(f"spare loaded again: {status} {body.get('state')}")
    rel.check("reload: unload then load of another model", status_gone == 503 and status == 200,
              f"after unload {status_gone}, after load {status}")
    time.sleep(pause)
    stats = load.stop()
    elapsed = time.monotonic() - t0
    failed = stats.sent - stats.statuses.get(200, 0)
    lat = stats.latencies.get(200, [])
    rel.FIGURES["reload"] = {
        "sent": stats.sent, "failed": failed, "statuses": stats.statuses, "errors": stats.errors,
        "seconds": round(elapsed, 1), "p50_ms": round(rel.pct(lat, 50) * 1000, 1),
        "p99_ms": round(rel.pct(lat, 99) * 1000, 1),
    }
    rel.note(f"requests sent {stats.sent}, failed {failed} over {elapsed:.1f} s; statuses "
             f"{stats.statuses}, errors {stats.errors}; p50 {rel.ms(rel.pct(lat, 50))}, "
             f"p99 {rel.ms(rel.pct(lat, 99))}")
    rel.check("reload: zero failed requests across reloads and unloads", failed == 0 and stats.sent > 0,
              f"{stats.sent} sent, {failed} failed")
    code = server.stop()
    rel.check("reload: the server exits 0 on SIGTERM", code == 0, str(code))
