"""Loading, reloading and unloading models while serving, under load. One server on a model
repository made here from the exported model (`resnet18` in version folder 1, and a second
model `spare`), with --enable-model-control. Four k6 clients post the photo to /predict (resnet18,
the default model) without pause, while:

  1. resnet18 is reloaded in place (POST /models/resnet18/load);
  2. version 2 appears in the repository and is loaded: it warms beside version 1 and is
     swapped in, requests in flight finish on version 1;
  3. a broken version 3 appears (metadata.json is not JSON): its load is refused (500
     model_load_failed) and version 2 goes on serving;
  4. `spare` is unloaded and loaded again.
"""

from __future__ import annotations

import shutil
import time

import pytest

from harness import http_json, ms

SECONDS = 30


def copy_model(src, dst) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "metadata.json"):
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def reload(phase, model_dir):
    repo = phase.logs / "repository"
    copy_model(model_dir, repo / "resnet18" / "1")
    copy_model(model_dir, repo / "spare")
    server = phase.server("server", [
        "--model-repository", str(repo), "--enable-model-control", "--default-model", "resnet18",
        "--warmup-iterations", "1", "--intra-op-threads", "1", "--preprocess-threads", "1",
        "--cpu-budget", "2"])
    server.wait_healthy()
    port = server.port
    load = phase.load(port, vus=4)
    pause = max(2.0, SECONDS / 6)
    steps = {}

    time.sleep(pause)
    steps["in_place"] = http_json("POST", port, "/models/resnet18/load", b"")
    status, body = steps["in_place"]
    phase.mark(f"resnet18 reloaded in place: {status} {body.get('state')} version {body.get('version')}")
    time.sleep(pause)
    copy_model(model_dir, repo / "resnet18" / "2")
    steps["version_2"] = http_json("POST", port, "/models/resnet18/load", b"")
    phase.mark(f"version 2 loaded: {steps['version_2'][0]} version {steps['version_2'][1].get('version')}")
    time.sleep(pause)
    (repo / "resnet18" / "3").mkdir()
    (repo / "resnet18" / "3" / "metadata.json").write_text("{ not json")
    steps["broken"] = http_json("POST", port, "/models/resnet18/load", b"")
    phase.mark(f"broken version 3: {steps['broken'][0]} {steps['broken'][1].get('code')}")
    steps["view"] = http_json("GET", port, "/models/resnet18")[1]
    time.sleep(pause)
    steps["unload"] = http_json("POST", port, "/models/spare/unload", b"")
    steps["gone"] = http_json("GET", port, "/models/spare")[0]
    steps["load_again"] = http_json("POST", port, "/models/spare/load", b"")
    phase.mark(f"spare unloaded ({steps['unload'][0]}, then GET {steps['gone']}) and loaded again "
               f"({steps['load_again'][0]})")
    time.sleep(pause)
    stats = load.stop()
    steps["rc"] = server.stop()
    phase.note(f"{stats.describe()}; p50 {ms(stats.p(200, 'med'))}, p99 {ms(stats.p(200, 'p(99)'))}")
    phase.figures.update(stats.figures())
    steps["stats"] = stats
    return steps


def test_in_place_reload_answers_ready(reload):
    status, body = reload["in_place"]
    assert status == 200 and body.get("state") == "ready", (status, body)


def test_a_new_version_is_loaded_and_served(reload):
    status, body = reload["version_2"]
    assert status == 200 and body.get("version") == 2, (status, body)


def test_a_broken_version_is_refused(reload):
    status, body = reload["broken"]
    assert status == 500 and body.get("code") == "model_load_failed", (status, body)


def test_the_served_version_stays_and_the_broken_one_is_reported(reload):
    view = reload["view"]
    v3 = {v["version"]: v for v in view.get("versions", [])}.get(3, {})
    assert view.get("version") == 2 and view.get("state") == "ready", view
    assert v3.get("state") == "failed" and "metadata.json" in v3.get("reason", ""), v3


def test_unload_then_load_of_another_model(reload):
    assert reload["unload"][0] == 200 and reload["gone"] == 503, (reload["unload"], reload["gone"])
    assert reload["load_again"][0] == 200, reload["load_again"]


def test_no_request_fails_across_reloads_and_unloads(reload):
    stats = reload["stats"]
    assert stats.sent > 0 and stats.failed == 0, (
        f"{stats.failed} of {stats.sent} failed: {dict(stats.refusals)}, {stats.failures[:20]}")


def test_clean_exit_on_sigterm(reload):
    assert reload["rc"] == 0
