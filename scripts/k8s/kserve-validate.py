"""Checks deploy/kserve against KServe's own API types, strictly, and against the server.

    python scripts/k8s/kserve-validate.py deploy/kserve src/config/mod.rs

Run with the kserve SDK installed (the `kserve` PyPI package, whose generated model classes carry
every field of KServe's CRDs with its type, and which brings the `kubernetes` client's models for
the pod parts). For each document:
  1. its kind's model class (ClusterServingRuntime, ServingRuntime, InferenceService): every
     field must be one the class declares (unknown or misspelt fields at any depth are errors, as
     `kubectl apply` with strict field validation makes them), of the declared type (string,
     integer, boolean, list, map, object), with the required fields of the pod parts present
     (the models' own client-side validation, by building each object);
  2. consistency with the server and between the files: a runtime speaks v2 and serves the REST
     port its probes and ports name, with probes on /v2/health/ready and /v2/health/live; its
     args name the flags the server has (from src/config/mod.rs) and a model
     source (/mnt/models, where KServe's storage initializer puts the model); every
     InferenceService names a runtime defined here with a model format that runtime supports,
     and one without a storageUri points the server at a folder inside the image.
Then self-tests: a misspelt field and a wrong type must be rejected.
Prints "PASS<TAB>message" / "FAIL<TAB>message" lines; exits 0.
"""

import copy
import re
import sys
from pathlib import Path

import yaml

import kserve.models as kmodels
import kubernetes.client.models as k8smodels

KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def out(ok, msg):
    print(("PASS" if ok else "FAIL") + "\t" + msg)


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
        # IntOrString and Quantity are strings or numbers in the generated models' eyes.
        if typ in ("object",):
            return
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


def validate(doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    cls_name = KINDS.get(key)
    if cls_name is None:
        return [f"no model for {key[1]} {key[0]}"]
    errors = []
    check(doc, cls_name, doc["kind"], errors)
    return errors


def flags(config_rs):
    """The server's flags, from its clap configuration (src/config/mod.rs): every field under an
    `#[arg(long ...)]` attribute, named after the field or its explicit `long = "..."`."""
    found, pending = set(), None
    for line in Path(config_rs).read_text().splitlines():
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


def main(folder, config_rs):
    docs = []
    for f in sorted(Path(folder).glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((f.name, d))
    if not docs:
        out(False, f"no manifests in {folder}")
        return
    for name, d in docs:
        errors = validate(d)
        out(not errors, f"{name}: {d['kind']}/{d['metadata']['name']} against kserve.models (fields, types, required)"
            + "".join(f"\n      {e}" for e in errors))

    known = flags(config_rs)
    runtimes = {d["metadata"]["name"]: d for _, d in docs if d["kind"] in ("ClusterServingRuntime", "ServingRuntime")}
    for name, rt in runtimes.items():
        spec = rt["spec"]
        c = spec["containers"][0]
        args = c.get("args", [])
        used = {a.split("=")[0] for a in args if a.startswith("--")}
        port = next((int(a.split("=")[1]) for a in args if a.startswith("--port=")), None)
        probes = {p: c.get(p, {}).get("httpGet", {}) for p in ("readinessProbe", "livenessProbe")}
        out("v2" in spec.get("protocolVersions", []) and c.get("name") == "kserve-container",
            f"{name}: protocolVersions has v2; the container is kserve-container (KServe merges the predictor into it)")
        out(used <= known and args[:1] == ["serve"] and "--model-dir" in used,
            f"{name}: args {args} are the server's flags (src/config/mod.rs), serving --model-dir")
        out(any(a == "--model-dir=/mnt/models" for a in args),
            f"{name}: serves /mnt/models, where KServe's storage initializer puts the model")
        out(port is not None and [p.get("containerPort") for p in c.get("ports", [])] == [port]
            and all(p.get("port") == port for p in probes.values()),
            f"{name}: the container port, the probes and --port agree ({port})")
        out(probes["readinessProbe"].get("path") == "/v2/health/ready" and probes["livenessProbe"].get("path") == "/v2/health/live",
            f"{name}: probes on /v2/health/ready and /v2/health/live")
    for fname, d in docs:
        if d["kind"] != "InferenceService":
            continue
        m = d["spec"]["predictor"]["model"]
        rt = runtimes.get(m.get("runtime"))
        formats = [(f["name"], f.get("version")) for f in (rt or {}).get("spec", {}).get("supportedModelFormats", [])]
        fmt = m.get("modelFormat", {})
        supported = any(fmt.get("name") == n and fmt.get("version") in (None, v) for n, v in formats)
        out(rt is not None and supported and m.get("protocolVersion") in rt["spec"]["protocolVersions"],
            f"{fname}: runtime {m.get('runtime')} is defined here, supports {fmt} and protocol {m.get('protocolVersion')}")
        args = m.get("args", [])
        used = {a.split("=")[0] for a in args if a.startswith("--")}
        source = [a for a in args if a.startswith(("--model-dir=", "--model-repository="))]
        if "storageUri" in m:
            ok = not args or (source and source[0].split("=", 1)[1] == "/mnt/models")
            out(ok and used <= known, f"{fname}: storageUri {m['storageUri']} served from /mnt/models")
        else:
            ok = bool(source) and not source[0].split("=", 1)[1].startswith("/mnt/models")
            out(ok and used <= known, f"{fname}: no storageUri: the server is pointed at the image's model ({source})")
        for p in m.get("ports", []):
            out(p.get("name") == "h2c" and f"--grpc-port={p.get('containerPort')}" in (args or runtimes[m['runtime']]['spec']['containers'][0]['args']),
                f"{fname}: the h2c port is the server's --grpc-port ({p.get('containerPort')})")

    # Self-tests: the checker must reject a misspelt field and a wrong type.
    rt = next(d for _, d in docs if d["kind"] == "ClusterServingRuntime")
    bad = copy.deepcopy(rt)
    bad["spec"]["supportedModelFormat"] = bad["spec"].pop("supportedModelFormats")
    out(any("unknown field" in e for e in validate(bad)), "self-test: spec.supportedModelFormat (for supportedModelFormats) is rejected")
    bad = copy.deepcopy(rt)
    bad["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    out(any("unknown field" in e for e in validate(bad)), "self-test: a misspelt field deep in the container (httpGet.pathh) is rejected")
    bad = copy.deepcopy(rt)
    bad["spec"]["supportedModelFormats"][0]["autoSelect"] = "no"
    out(any("expected bool" in e for e in validate(bad)), "self-test: autoSelect as a string is rejected")
    bad = copy.deepcopy(rt)
    del bad["spec"]["containers"][0]["name"]
    out(any("name" in e for e in validate(bad)), "self-test: a container without its required name is rejected")


if __name__ == "__main__":
    main(*sys.argv[1:3])
