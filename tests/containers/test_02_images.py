"""The two images as built from this checkout: their size, the libraries their binary loads,
their user, the software bill of materials and the OCI labels they carry."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from containers import engine
from containers.engine import BASE_IMAGE, IMAGES, WORK
from harness import ROOT

SIZE_BUDGET_MB = int(os.environ.get("SIZE_BUDGET_MB", "525"))  # 1 MB = 10^6 bytes
BINARY = "/usr/local/bin/tch-serve"
SBOM = "/usr/share/doc/tch-serve/sbom.cdx.json"


def ldd(image) -> str:
    r = engine.in_image(image.tag, "-c", f"ldd {BINARY}")
    assert r.returncode == 0, f"ldd in {image.tag} exited {r.returncode}: {r.stderr}"
    return r.stdout


@pytest.mark.parametrize("image", IMAGES, indirect=True)
def test_image_built(image):
    """Built from the checkout, with the server as an exec-form entrypoint."""
    config = engine.inspect_json(image.tag, kind="image")["Config"]
    assert config["Entrypoint"] == [BINARY], config["Entrypoint"]
    assert config["Cmd"] == ["serve"], config["Cmd"]
    assert "8000/tcp" in config["ExposedPorts"], config["ExposedPorts"]
    assert image.build_s > 0 and image.size > image.base_size


def test_cpu_image_size_budget(cpu_image, figures):
    """The CPU image's layers above debian:bookworm-slim stay within SIZE_BUDGET_MB."""
    budget = SIZE_BUDGET_MB * 1_000_000
    r = engine.docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", cpu_image.tag,
                      timeout=60, check=True)
    layers = []
    for line in r.stdout.splitlines():
        size, _, created_by = line.partition("\t")
        if size != "0B":
            created_by = re.sub(r"^/bin/sh -c #\(nop\) *", "", created_by)
            layers.append(f"{size:>8} {created_by[:100]}")
    figures("images.cpu.budget_bytes", budget,
            f"CPU image: {engine.mb(cpu_image.size)} in all, {engine.mb(cpu_image.above_base)} above "
            f"{BASE_IMAGE} (budget {SIZE_BUDGET_MB} MB)")
    figures("images.cpu.layers", layers[:12])
    print("\n".join(layers[:12]))
    assert cpu_image.above_base <= budget, (
        f"{engine.mb(cpu_image.above_base)} above the base, over the {SIZE_BUDGET_MB} MB budget:\n"
        + "\n".join(layers[:12]))


@pytest.mark.parametrize("image", IMAGES, indirect=True)
def test_ldd_every_library_resolves(image):
    out = ldd(image)
    assert "not found" not in out, out
    assert re.search(r"libtorch_cpu\.so => /opt/libtorch/", out), f"libtorch_cpu.so not from /opt/libtorch:\n{out}"


def test_cpu_binary_does_not_link_cuda(cpu_image):
    out = ldd(cpu_image)
    assert "libtorch_cuda" not in out, out


@pytest.mark.gpu
def test_gpu_binary_links_libtorch_cuda(gpu_image):
    out = ldd(gpu_image)
    assert re.search(r"libtorch_cuda\.so => /opt/libtorch/", out), out


@pytest.mark.parametrize("image", IMAGES, indirect=True)
def test_runs_as_numeric_non_root_user(image):
    user = engine.inspect(image.tag, "{{.Config.User}}", kind="image")
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), f"Config.User is {user!r}"


@pytest.mark.gpu
def test_gpu_image_environment(gpu_image):
    """NVIDIA_VISIBLE_DEVICES, TCH_SERVE_DEVICE=cuda, uid 10001, the healthcheck."""
    config = engine.inspect_json(gpu_image.tag, kind="image")["Config"]
    assert "NVIDIA_VISIBLE_DEVICES=all" in config["Env"], config["Env"]
    assert "TCH_SERVE_DEVICE=cuda" in config["Env"], config["Env"]
    assert config["User"] == "10001:10001", config["User"]
    assert "healthcheck" in " ".join(config["Healthcheck"]["Test"]), config["Healthcheck"]


@pytest.mark.parametrize("image", IMAGES, indirect=True)
def test_binary_sbom_inside(image):
    """The binary's SBOM in the image: every crate at its Cargo.lock version
    (scripts/check-sbom.py)."""
    r = engine.in_image(image.tag, SBOM, entrypoint="cat")
    assert r.returncode == 0, f"no {SBOM} in {image.tag}: {r.stderr}"
    out = WORK / f"image-{image.kind}-sbom.cdx.json"
    out.write_text(r.stdout)
    json.loads(r.stdout)
    check = engine.run([sys.executable, str(ROOT / "scripts/check-sbom.py"), str(out)], timeout=60)
    print(check.stdout)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("image", IMAGES, indirect=True)
def test_oci_labels(image, vcs_ref):
    labels = engine.inspect_json(image.tag, kind="image")["Config"]["Labels"]
    key = "org.opencontainers.image."
    assert labels.get(key + "title") == "tch-serve", labels
    assert labels.get(key + "version"), labels
    assert labels.get(key + "revision") == vcs_ref, labels
    assert labels.get(key + "licenses") == "Apache-2.0", labels
    assert labels.get(key + "base.name") == BASE_IMAGE, labels
