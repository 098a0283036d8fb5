"""deploy/kserve against KServe's own API types, strictly, and against the server.

Runs in the KServe venv, not the project's (the `kserve` PyPI package is heavy:
tests/protocol/requirements-kserve.txt, .venv-kserve), so its name keeps it out of the
project venv's collection; `make test-k8s` runs it on its own:

    .venv-kserve/bin/python -m pytest tests/k8s/kserve_checks.py

The kserve package's generated model classes carry every field of KServe's CRDs with its type,
and it brings the `kubernetes` client's models for the pod parts. For each document:
  1. its kind's model class (ClusterServingRuntime, ServingRuntime, InferenceService): every
     field must be one the class declares (unknown or misspelt fields at any depth are errors, as
     `kubectl apply` with strict field validation makes them), of the declared type (string,
     integer, boolean, list, map, object), with the required fields of the pod parts present
     (the models' own client-side validation, by building each object);
  2. consistency with the server and between the files: a runtime speaks v2 and serves the REST
     port its probes and ports name, with probes on /v2/health/ready and /v2/health/live; its
     args name the flags the server has (from src/config/mod.rs) and a model source
     (/mnt/models, where KServe's storage initializer puts the model); every InferenceService
     names a runtime defined here with a model format that runtime supports, and one without a
     storageUri points the server at a folder inside the image.
Self-tests: a misspelt field and a wrong type must be rejected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kserve.models as kmodels
import kubernetes.client.models as k8smodels
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "kserve"
CONFIG_RS = ROOT / "src" / "config" / "mod.rs"

KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def model_class(name):
    return getattr(kmodels, name, None) or getattr(k8smodels, name, None)


def check(value, typ, path, errors):
    """Walks `value` against the type string of a generated model (e.g. 'list[V1Container]')."""
    if value is None:
        return
    m = re.fullmatch(r"[Ll]ist\[(.+)\]", typ)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, v in enumerate(value):
            check(v, m.group(1), f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"(?:dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\])", typ)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        for k, v in value.items():
            check(v, m.group(2) or m.group(4), f"{path}.{k}", errors)
        return
    if typ in PRIMITIVES:
        want = PRIMITIVES[typ]
        if typ == "int" and isinstance(value, bool) or not isinstance(value, want):
            errors.append(f"{path}: expected {typ}, got {type(value).__name__} {value!r}")
        return
    if typ == "datetime":
        return
    cls = model_class(typ)
    if cls is None:
        errors.append(f"{path}: no model for type {typ}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({typ}), got {type(value).__name__}")
        return
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    present = {}
    for key, v in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field of {typ}")
            continue
        check(v, cls.openapi_types[attr], f"{path}.{key}", errors)
        present[attr] = "placeholder"
    # Required fields: the model's constructor refuses them missing (the kubernetes client's
    # pydantic models: a "missing" error; kserve's: "must not be `None`"). Other refusals, of the
    # placeholder's value, say nothing here.
    try:
        cls(**present)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError or a ValueError
        details = e.errors() if hasattr(e, "errors") else []
        for d in details:
            if d.get("type") == "missing":
                errors.append(f"{path}: required field {'.'.join(map(str, d['loc']))} is missing ({typ})")
        msg = str(e).split("\n")[0]
        if "must not be `None`" in msg:
            errors.append(f"{path}: {msg} ({typ})")


def validate(doc) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    cls_name = KINDS.get(key)
    if cls_name is None:
        return [f"no model for {key[1]} {key[0]}"]
    errors: list[str] = []
    check(doc, cls_name, doc["kind"], errors)
    return errors


def server_flags() -> set[str]:
    """The server's flags, from its clap configuration (src/config/mod.rs): every field under an
    `#[arg(long ...)]` attribute, named after the field or its explicit `long = "..."`."""
    found, pending = set(), None
    for line in CONFIG_RS.read_text().splitlines():
        line = line.strip()
        m = re.match(r'#\[arg\(long(?:\s*=\s*"([a-z0-9-]+)")?', line)
        if m:
            pending = m.group(1) or ""
            continue
        m = re.match(r"pub (\w+):", line)
        if m and pending is not None:
            found.add("--" + (pending or m.group(1).replace("_", "-")))
            pending = None
    return found


def documents() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(FOLDER.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


DOCS = documents()
RUNTIMES = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] in ("ClusterServingRuntime", "ServingRuntime")}
SERVICES = [(f, d) for f, d in DOCS if d["kind"] == "InferenceService"]


def ids(items):
    return [pytest.param(f, d, id=f"{f}:{d['kind']}/{d['metadata']['name']}") for f, d in items]


def rt_params():
    return [pytest.param(rt, id=name) for name, rt in RUNTIMES.items()]


def test_manifests_found():
    assert DOCS, f"no manifests in {FOLDER}"
    assert RUNTIMES and SERVICES, f"runtimes {sorted(RUNTIMES)}, InferenceServices {[f for f, _ in SERVICES]}"


def test_server_flags_read():
    flags = server_flags()
    assert {"--model-dir", "--port", "--grpc-port"} <= flags, f"flags read from {CONFIG_RS}: {sorted(flags)}"


# ------------------------------------------------------ against kserve.models ---


@pytest.mark.parametrize("fname,doc", ids(DOCS))
def test_against_kserve_models(fname, doc):
    """Fields, types and required fields of kserve.models."""
    errors = validate(doc)
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- runtimes ---


def container(rt):
    return rt["spec"]["containers"][0]


@pytest.mark.parametrize("rt", rt_params())
def test_runtime_speaks_v2_in_kserve_container(rt):
    """KServe merges the predictor into the container named kserve-container."""
    c = container(rt)
    assert "v2" in rt["spec"].get("protocolVersions", []), f"protocolVersions {rt['spec'].get('protocolVersions')}"
    assert c.get("name") == "kserve-container", f"container {c.get('name')}"


@pytest.mark.parametrize("rt", rt_params())
def test_runtime_args_are_server_flags(rt):
    args = container(rt).get("args", [])
    used = {a.split("=")[0] for a in args if a.startswith("--")}
    unknown = sorted(used - server_flags())
    assert not unknown, f"args {args}: not flags of the server (src/config/mod.rs): {unknown}"
    assert args[:1] == ["serve"] and "--model-dir" in used, f"args {args}: want `serve ... --model-dir=...`"


@pytest.mark.parametrize("rt", rt_params())
def test_runtime_serves_mnt_models(rt):
    """/mnt/models: where KServe's storage initializer puts the model."""
    args = container(rt).get("args", [])
    assert "--model-dir=/mnt/models" in args, f"args {args}"


@pytest.mark.parametrize("rt", rt_params())
def test_runtime_port_probes_and_flag_agree(rt):
    c = container(rt)
    args = c.get("args", [])
    port = next((int(a.split("=")[1]) for a in args if a.startswith("--port=")), None)
    ports = [p.get("containerPort") for p in c.get("ports", [])]
    probes = {p: c.get(p, {}).get("httpGet", {}).get("port") for p in ("readinessProbe", "livenessProbe")}
    assert port is not None and ports == [port] and all(p == port for p in probes.values()), \
        f"--port {port}, container ports {ports}, probe ports {probes}"


@pytest.mark.parametrize("rt", rt_params())
def test_runtime_probes_on_v2_health(rt):
    c = container(rt)
    paths = {p: c.get(p, {}).get("httpGet", {}).get("path") for p in ("readinessProbe", "livenessProbe")}
    assert paths == {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}, f"probe paths {paths}"


# -------------------------------------------------------- InferenceServices ---


@pytest.mark.parametrize("fname,doc", ids(SERVICES))
def test_inferenceservice_runtime_supports_it(fname, doc):
    m = doc["spec"]["predictor"]["model"]
    rt = RUNTIMES.get(m.get("runtime"))
    assert rt is not None, f"runtime {m.get('runtime')} is not defined here ({sorted(RUNTIMES)})"
    formats = [(f["name"], f.get("version")) for f in rt["spec"].get("supportedModelFormats", [])]
    fmt = m.get("modelFormat", {})
    assert any(fmt.get("name") == n and fmt.get("version") in (None, v) for n, v in formats), \
        f"model format {fmt}; {m['runtime']} supports {formats}"
    assert m.get("protocolVersion") in rt["spec"]["protocolVersions"], \
        f"protocol {m.get('protocolVersion')}; {m['runtime']} speaks {rt['spec']['protocolVersions']}"


@pytest.mark.parametrize("fname,doc", ids(SERVICES))
def test_inferenceservice_model_source(fname, doc):
    """With a storageUri the server reads /mnt/models; without one, a folder of the image."""
    m = doc["spec"]["predictor"]["model"]
    args = m.get("args", [])
    unknown = sorted({a.split("=")[0] for a in args if a.startswith("--")} - server_flags())
    assert not unknown, f"args {args}: not flags of the server: {unknown}"
    source = [a for a in args if a.startswith(("--model-dir=", "--model-repository="))]
    if "storageUri" in m:
        assert not args or (source and source[0].split("=", 1)[1] == "/mnt/models"), \
            f"storageUri {m['storageUri']}, but the server is pointed at {source}"
    else:
        assert source and not source[0].split("=", 1)[1].startswith("/mnt/models"), \
            f"no storageUri: the server must be pointed at the image's model, args {args}"


def h2c_ports():
    return [pytest.param(f, d, p, id=f"{f}:{p.get('name')}/{p.get('containerPort')}")
            for f, d in SERVICES for p in d["spec"]["predictor"]["model"].get("ports", [])]


@pytest.mark.parametrize("fname,doc,port", h2c_ports())
def test_inferenceservice_h2c_port_is_grpc_port(fname, doc, port):
    m = doc["spec"]["predictor"]["model"]
    args = m.get("args") or container(RUNTIMES[m["runtime"]])["args"]
    assert port.get("name") == "h2c" and f"--grpc-port={port.get('containerPort')}" in args, \
        f"port {port}; server args {args}"


# -------------------------------------------------------------- self-tests ---


def cluster_runtime():
    rt = next((d for _, d in DOCS if d["kind"] == "ClusterServingRuntime"), None)
    assert rt is not None, "no ClusterServingRuntime to mutate"
    return copy.deepcopy(rt)


def test_rejects_misspelt_spec_field():
    bad = cluster_runtime()
    bad["spec"]["supportedModelFormat"] = bad["spec"].pop("supportedModelFormats")
    errors = validate(bad)
    assert any("unknown field" in e for e in errors), f"spec.supportedModelFormat accepted: {errors}"


def test_rejects_misspelt_field_deep_in_container():
    bad = cluster_runtime()
    bad["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    errors = validate(bad)
    assert any("unknown field" in e for e in errors), f"httpGet.pathh accepted: {errors}"


def test_rejects_wrong_type():
    bad = cluster_runtime()
    bad["spec"]["supportedModelFormats"][0]["autoSelect"] = "no"
    errors = validate(bad)
    assert any("expected bool" in e for e in errors), f"autoSelect as a string accepted: {errors}"


def test_rejects_missing_required_field():
    bad = cluster_runtime()
    del bad["spec"]["containers"][0]["name"]
    errors = validate(bad)
    assert any("name" in e for e in errors), f"a container without its name accepted: {errors}"
