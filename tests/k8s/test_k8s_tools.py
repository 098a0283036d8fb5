"""The tools the Kubernetes tests run are there, at the versions they are pinned to
(scripts/k8s-tools.sh installs them)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import k8s_manifests as km

PINS = km.pinned(km.TOOLS_REQUIREMENTS)


@pytest.mark.parametrize("package", sorted(PINS))
def test_tools_venv_has_pinned_package(package):
    python = km.tools_venv_bin("python")
    if not os.access(python, os.X_OK):
        pytest.fail(f"no venv at {km.TOOLS_VENV}: {km.INSTALL}", pytrace=False)
    r = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                       capture_output=True, text=True)
    found = r.stdout.strip() or "not installed"
    assert found == PINS[package], \
        f"{package} in {km.TOOLS_VENV}: {found}, pinned {PINS[package]} in " \
        f"{km.TOOLS_REQUIREMENTS.relative_to(km.ROOT)}: {km.INSTALL}"


def test_kubectl_kustomize_is_recent(kubectl):
    minor, version = km.kubectl_version(kubectl)
    print(f"kubectl: {kubectl} {version}")
    assert minor >= 24, f"{kubectl} is {version}: its kustomize is too old for components and `labels`"


def test_promtool_answers(promtool):
    r = subprocess.run([promtool, "--version"], capture_output=True, text=True)
    first = (r.stdout + r.stderr).strip().splitlines()[:1]
    print(f"promtool: {promtool} {first}")
    assert r.returncode == 0 and first and first[0].startswith("promtool"), \
        f"{promtool} --version: exit {r.returncode}, {first}"


def test_npm_packages_pinned(node_tools):
    lock = json.loads(km.PACKAGE_LOCK.read_text())
    wrong = []
    for name, version in lock["packages"][""]["dependencies"].items():
        manifest = node_tools / "node_modules" / name / "package.json"
        found = json.loads(manifest.read_text())["version"] if manifest.is_file() else "not installed"
        if found != version:
            wrong.append(f"{name} {found} (pinned {version})")
    print("npm packages:", ", ".join(f"{k}@{v}" for k, v in lock["packages"][""]["dependencies"].items()))
    assert not wrong, f"in {node_tools}: {'; '.join(wrong)}: {km.INSTALL}"
