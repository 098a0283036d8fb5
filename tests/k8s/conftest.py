"""Fixtures of the Kubernetes tests: the renders and the tools. A tool that is missing fails
every test that needs it, with how to get it (scripts/k8s-tools.sh installs them all).

Python's standard library, PyYAML and pytest only: the KServe venv loads this file too
(tests/k8s/kserve_checks.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import k8s_manifests as km


@pytest.fixture(autouse=True)
def _nothing_to_check(request):
    """A test whose parameters say that nothing was found to check fails (km.Nothing)."""
    callspec = getattr(request.node, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, km.Nothing):
            pytest.fail(value.why, pytrace=False)


@pytest.fixture(scope="session")
def renders() -> dict[str, km.Render]:
    """Every render by name (km.renders(): made once, when the tests are collected)."""
    return km.renders()


@pytest.fixture(scope="session")
def kubectl() -> str:
    path, how = km.find_kubectl()
    if path is None:
        pytest.fail(how, pytrace=False)
    return path


def _tools_venv_tool(name: str) -> str:
    path = km.tools_venv_bin(name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed in {km.TOOLS_VENV}: {km.INSTALL} "
                    f"(pip install of {km.TOOLS_REQUIREMENTS.relative_to(km.ROOT)})", pytrace=False)
    return str(path)


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return _tools_venv_tool("kubernetes-validate")


@pytest.fixture(scope="session")
def checkov() -> str:
    return _tools_venv_tool("checkov")


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which(os.environ.get("PROMTOOL") or "promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: install Debian's prometheus package "
                    f"(apt-get install prometheus; as root, scripts/k8s-tools.sh does it)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def node_tools() -> Path:
    """NODE_TOOLS with the npm packages of tests/k8s/package-lock.json, and node 18 or newer."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Debian's nodejs and npm packages "
                    "(as root, scripts/k8s-tools.sh does it)", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        pytest.fail(f"node {version} is too old for the kubernetes-models packages (18 or newer)", pytrace=False)
    installed = km.NODE_TOOLS / "package-lock.json"
    if not (km.NODE_TOOLS / "node_modules").is_dir() or not installed.is_file() \
            or installed.read_bytes() != km.PACKAGE_LOCK.read_bytes():
        pytest.fail(f"the npm packages of {km.PACKAGE_LOCK.relative_to(km.ROOT)} are not installed in "
                    f"{km.NODE_TOOLS} (npm ci): {km.INSTALL}", pytrace=False)
    return km.NODE_TOOLS
