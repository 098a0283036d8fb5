"""The host's model repository (models/, as `make model` writes it) served by the CPU image
through its read-only mount: the AOTInductor package compiled on this machine loads (unpacked
into the exec tmpfs of the compose file) and answers as its TorchScript twin does; under
Docker's default `--tmpfs /tmp` (noexec) it is refused with an error naming the mount, while
the TorchScript models serve."""

from __future__ import annotations

import json
import time

import pytest

from containers import engine
from harness import ROOT, free_port, http_json, post_image, wait_until

PROJECT = "tch-serve-ct-host"
AOTI = "efficientnet_lite0_aoti"
TWIN = "efficientnet_lite0"
CAT_PHOTO = ROOT / "target" / "test-data" / "accuracy" / "chelsea.jpg"
CAT_CLASSES = {281, 282, 285}


@pytest.fixture(scope="module")
def cat_photo() -> bytes:
    if not CAT_PHOTO.exists():
        pytest.fail(f"{CAT_PHOTO} is missing: run `make test-data`", pytrace=False)
    return CAT_PHOTO.read_bytes()


@pytest.fixture(scope="module")
def aoti_package():
    path = ROOT / "models" / AOTI / "model.pt2"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make model`", pytrace=False)
    return path


# First in the module: it runs before the module's compose project is up.
def test_noexec_tmp_refuses_the_package(cpu_image, aoti_package, containers, cat_photo, figures):
    c = containers.run(cpu_image.tag, "--read-only", "--tmpfs", "/tmp",
                       "-v", f"{ROOT / 'models'}:/host-models:ro",
                       env={"TCH_SERVE_MODEL_REPOSITORY": "/host-models"})
    views: dict = {}

    def settled() -> bool:
        for name in (AOTI, TWIN):
            try:
                views[name] = http_json("GET", c.port, f"/models/{name}", timeout=5)
            except OSError:
                return False
        return views[TWIN][0] == 200 and views[AOTI][1].get("state") not in (None, "loading")

    assert wait_until(settled, 180, every=1), f"models not settled: {views}\n{engine.logs(c.name)}"
    status, body = views[AOTI]
    print(json.dumps(body)[:300])
    figures("host_models.noexec_refusal", body.get("error"))
    assert status == 503, body
    assert "mounted noexec" in body.get("error", ""), body
    status, _, answer, _ = post_image(c.port, cat_photo, path=f"/predict?model={TWIN}")
    assert status == 200, answer[:300]
    # A model failed to load: the server says so on /health.
    assert http_json("GET", c.port, "/health", timeout=5)[0] == 503


@pytest.fixture(scope="module")
def host_stack(cpu_image, aoti_package, figures):
    """The compose api alone with TCH_SERVE_MODEL_REPOSITORY=/host-models: (compose, api port,
    the result of `up --wait`)."""
    api_port = free_port()
    compose = engine.Compose(PROJECT, ["docker-compose.yml"], {
        "TCH_SERVE_IMAGE": cpu_image.tag, "TCH_SERVE_PUBLISH": str(api_port),
        "PROMETHEUS_PUBLISH": str(free_port()), "TCH_SERVE_MODEL_REPOSITORY": "/host-models"})
    compose.down()
    t0 = time.monotonic()
    try:
        up = compose("up", "-d", "--wait", "--wait-timeout", "240", "api", timeout=420)
        (engine.WORK / "compose-host-up.log").write_text(up.stdout + up.stderr)
        figures("host_models.up_wait_s", round(time.monotonic() - t0, 1))
        yield compose, api_port, up
    finally:
        logs = compose("logs", "--no-color", timeout=120)
        (engine.WORK / "compose-host.log").write_text(logs.stdout + logs.stderr)
        compose.down()


def test_compose_up_with_the_host_repository(host_stack):
    compose, _, up = host_stack
    assert up.returncode == 0, engine.tail(up.stdout + up.stderr)
    api = compose.container("api")
    assert api and engine.health(api) == "healthy"


def test_aoti_package_is_served(host_stack, figures):
    _, api_port, _ = host_stack
    status, view = http_json("GET", api_port, f"/models/{AOTI}", timeout=10)
    figures("host_models.aoti", {k: view.get(k) for k in ("state", "format", "load_ms")},
            f"compose, host repository: {AOTI} {view.get('state')}, format {view.get('format')}, "
            f"{float(view.get('load_ms') or 0):.0f} ms to load")
    assert status == 200 and view["state"] == "ready", view
    assert view.get("format") == "aoti", view


def test_aoti_answers_as_torchscript(host_stack, cat_photo):
    _, api_port, _ = host_stack
    tops = {}
    for model in (AOTI, TWIN):
        status, _, body, _ = post_image(api_port, cat_photo, path=f"/predict?model={model}")
        assert status == 200, body[:300]
        tops[model] = json.loads(body)["predictions"][0]
    print(".pt2", tops[AOTI], "TorchScript", tops[TWIN])
    assert tops[AOTI]["index"] == tops[TWIN]["index"] and tops[AOTI]["index"] in CAT_CLASSES, tops
    assert abs(tops[AOTI]["probability"] - tops[TWIN]["probability"]) < 1e-3, tops
