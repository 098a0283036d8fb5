"""docker-compose.yml as a user starts it (`up --wait`): the api with the models baked into
the image, on a read-only root file system, and Prometheus scraping it with the alerting rules
loaded. Torn down at the end (`down -v --remove-orphans`), whatever happens."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest
import yaml

from containers import engine
from harness import ROOT, free_port, http_json, post_image, wait_until

PROJECT = "tch-serve-ct"
CAT_PHOTO = ROOT / "target" / "test-data" / "accuracy" / "chelsea.jpg"
# ImageNet's tabby, tiger cat, Egyptian cat (tests/data/accuracy.json).
CAT_CLASSES = {281, 282, 285}


@pytest.fixture(scope="module")
def stack(cpu_image, figures):
    """The compose project on free host ports: (compose, api port, Prometheus port, the
    result of `up --wait`)."""
    api_port, prom_port = free_port(), free_port()
    compose = engine.Compose(PROJECT, ["docker-compose.yml"], {
        "TCH_SERVE_IMAGE": cpu_image.tag, "TCH_SERVE_PUBLISH": str(api_port),
        "PROMETHEUS_PUBLISH": str(prom_port)})
    compose.down()  # what a run killed midway may have left
    t0 = time.monotonic()
    try:
        up = compose("up", "-d", "--wait", "--wait-timeout", "240", timeout=420)
        took = time.monotonic() - t0
        (engine.WORK / "compose-up.log").write_text(up.stdout + up.stderr)
        figures("compose.up_wait_s", round(took, 1), f"compose up --wait: {took:.1f} s")
        yield compose, api_port, prom_port, up
    finally:
        logs = compose("logs", "--no-color", timeout=120)
        (engine.WORK / "compose.log").write_text(logs.stdout + logs.stderr)
        compose.down()


@pytest.fixture(scope="module")
def cat_photo() -> bytes:
    if not CAT_PHOTO.exists():
        pytest.fail(f"{CAT_PHOTO} is missing: run `make test-data`", pytrace=False)
    return CAT_PHOTO.read_bytes()


def prometheus(port: int, path: str) -> dict:
    status, body = http_json("GET", port, path, timeout=10)
    assert status == 200, body
    return body["data"]


def test_up_wait(stack):
    """The api becomes healthy and Prometheus starts after it."""
    compose, _, _, up = stack
    assert up.returncode == 0, engine.tail(up.stdout + up.stderr)
    api, prom = compose.container("api"), compose.container("prometheus")
    assert api and engine.health(api) == "healthy", f"api: {engine.health(api)!r}"
    assert prom and engine.inspect(prom, "{{.State.Status}}") == "running"


def test_prometheus_scrapes_the_api(stack):
    _, _, prom_port, _ = stack

    def target_up() -> bool:
        try:
            targets = prometheus(prom_port, "/api/v1/targets")["activeTargets"]
        except (OSError, AssertionError, ValueError):
            return False
        return any(t["labels"].get("job") == "tch-serve" and t["health"] == "up" for t in targets)

    assert wait_until(target_up, 90, every=1), "the tch-serve target is not up"


def test_prometheus_has_build_info(stack, figures):
    _, _, prom_port, _ = stack
    found: list = []

    def build_info() -> bool:
        try:
            found[:] = prometheus(prom_port, "/api/v1/query?query=tch_serve_build_info")["result"]
        except (OSError, AssertionError, ValueError):
            return False
        return bool(found)

    assert wait_until(build_info, 60, every=1), "no tch_serve_build_info series"
    labels = found[0]["metric"]
    figures("compose.build_info", labels)
    print("tch_serve_build_info", labels)
    assert labels.get("version") and labels.get("libtorch"), labels


def test_prometheus_loaded_the_alerting_rules(stack):
    _, _, prom_port, _ = stack
    wanted = {r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    groups = prometheus(prom_port, "/api/v1/rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert len(wanted) >= 5 and wanted <= loaded, f"missing: {sorted(wanted - loaded)}"


def test_predict_with_baked_in_models_on_read_only_root(stack, photo):
    compose, api_port, _, _ = stack
    api = compose.container("api")
    assert engine.inspect(api, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    status, _, body, _ = post_image(api_port, photo)
    assert status == 200, body[:300]
    doc = json.loads(body)
    predictions = doc["results"][0]["predictions"]
    print("model", doc["model"], "top-1", predictions[0]["label"])
    assert predictions and predictions[0]["label"]


@pytest.mark.parametrize("model", ["efficientnet_lite0", None], ids=["named", "default"])
def test_pretrained_model_names_the_cat(stack, cat_photo, model):
    """The pretrained model baked into the image names the cat, asked for by name and as the
    default model (no ?model=)."""
    _, api_port, _, _ = stack
    path = "/predict" + (f"?{urllib.parse.urlencode({'model': model})}" if model else "")
    status, _, body, _ = post_image(api_port, cat_photo, path=path)
    assert status == 200, body[:300]
    doc = json.loads(body)
    top = doc["predictions"][0]
    print("model", doc["model"], "top-1", top["label"], top["probability"])
    assert doc["model"] == "efficientnet_lite0" and doc["trained"] is True, doc
    assert top["index"] in CAT_CLASSES, top


def test_models_lists_the_baked_in_repository(stack):
    _, api_port, _, _ = stack
    status, doc = http_json("GET", api_port, "/models", timeout=10)
    assert status == 200, doc
    ready = sorted(m["name"] for m in doc["models"] if m["state"] == "ready")
    print("ready models", ready)
    assert ready == ["efficientnet_lite0", "resnet18"], doc
    assert doc["default_model"] == "efficientnet_lite0", doc


def test_down(stack):
    """`down -v --remove-orphans` leaves no container, network or volume of the project.
    Last: it ends the module's stack."""
    compose, _, _, _ = stack
    r = compose.down()
    assert r.returncode == 0, r.stderr
    assert compose.leftovers() == []
