"""Every rendered object against a real schema.

Built-in objects: `kubernetes-validate --strict` (unknown fields are errors) against each
Kubernetes version of K8S_VERSIONS; a missing schema fails too (custom resources are split
off first). Custom resources: the ScaledObject (KEDA), HTTPRoute and GRPCRoute (Gateway API)
and ServiceMonitor (Prometheus Operator) against the models of the kubernetes-models npm
packages, generated from those projects' Go API types (tests/k8s/crd-validate.mjs: their
validator for types, required fields, enums and patterns, and TypeScript's excess-property
check on their declarations for unknown fields at any depth); the ServiceMonitor also against
deploy/kubernetes/schemas/servicemonitor-v1.json. Any other custom resource fails: nothing
here could vouch for it.

Self-tests: a misspelt field must fail kubernetes-validate, and for each modelled kind a
misspelt field (in spec and in a nested object) and a wrong type must fail the models, so
that a validator that stopped checking cannot pass silently.
"""

from __future__ import annotations

import copy
import json
import subprocess

import jsonschema
import pytest
import yaml

import k8s_manifests as km
from k8s_manifests import ident

SERVICEMONITOR_SCHEMA = km.K8S / "schemas" / "servicemonitor-v1.json"
CRD_VALIDATE = km.HERE / "crd-validate.mjs"


def first_ingress() -> dict | None:
    for r in km.renders().values():
        for d in r.by_kind("Ingress"):
            return d
    return None


def misspelt_ingress() -> dict | None:
    """The first rendered Ingress with spec.ingressClass for spec.ingressClassName."""
    ing = copy.deepcopy(first_ingress())
    if ing is None:
        return None
    ing["spec"]["ingressClass"] = ing["spec"].pop("ingressClassName")
    return ing


# --------------------------------------------------------- kubernetes-validate ---


@pytest.fixture(scope="session")
def kubernetes_validate_verdicts(kubernetes_validate, renders):
    """{(file, requested version): output line}: one kubernetes-validate run over every
    built-in object of every render (one file each) and the self-test's Ingress, against
    every version of K8S_VERSIONS."""
    folder = km.WORK / "kubernetes-validate"
    files = []
    for r in renders.values():
        for d in r.builtin:
            path = folder / r.name / f'{d["kind"]}-{d["metadata"]["name"]}.yaml'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(d, sort_keys=False))
            files.append(path)
    bad = misspelt_ingress()
    if bad is not None:
        path = folder / "self-test-ingress.yaml"
        path.write_text(yaml.safe_dump(bad, sort_keys=False))
        files.append(path)
    cmd = [kubernetes_validate, "--strict", *(a for v in km.K8S_VERSIONS for a in ("-k", v)), *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    (folder / "output.log").write_text(r.stdout + r.stderr)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    # One line per file and version, in that order (one object per file).
    expected = [(str(f), v) for f in files for v in km.K8S_VERSIONS]
    if len(lines) != len(expected):
        pytest.fail(f"kubernetes-validate printed {len(lines)} lines for {len(expected)} objects x versions "
                    f"(exit {r.returncode}; {folder / 'output.log'}):\n" + (r.stdout + r.stderr)[-3000:], pytrace=False)
    return dict(zip(expected, lines))


def object_file(render: km.Render, doc: dict) -> str:
    return str(km.WORK / "kubernetes-validate" / render.name / f'{doc["kind"]}-{doc["metadata"]["name"]}.yaml')


@pytest.mark.parametrize("version", km.K8S_VERSIONS, ids=lambda v: f"k8s-{v}")
@pytest.mark.parametrize("render,obj", km.objects(builtin=True))
def test_kubernetes_validate_strict(kubernetes_validate_verdicts, render, obj, version):
    path = object_file(render, obj)
    line = kubernetes_validate_verdicts[(path, version)]
    assert line.startswith("INFO ") and path in line and " passed " in line, \
        f"kubernetes-validate --strict -k {version}: {line}"
    minor = ".".join(version.split(".")[:2])
    assert line.endswith(f" against version {minor}"), \
        f"kubernetes-validate has no schemas of Kubernetes {minor}: {line}"


@pytest.mark.parametrize("version", km.K8S_VERSIONS, ids=lambda v: f"k8s-{v}")
def test_kubernetes_validate_rejects_misspelt_field(kubernetes_validate_verdicts, version):
    """Self-test: an Ingress with spec.ingressClass (for ingressClassName) must fail."""
    assert first_ingress() is not None, "no rendered Ingress to misspell"
    path = str(km.WORK / "kubernetes-validate" / "self-test-ingress.yaml")
    line = kubernetes_validate_verdicts[(path, version)]
    assert line.startswith("ERROR ") and "ingressClass" in line, \
        f"kubernetes-validate --strict -k {version} did not reject spec.ingressClass: {line}"


# ----------------------------------------------------------- custom resources ---


@pytest.mark.parametrize("render,obj", km.objects(builtin=False))
def test_custom_resource_has_a_model(render, obj):
    assert km.type_key(obj) in km.MODELLED, \
        f"{km.type_key(obj)}: a custom resource without a schema here (modelled: {sorted(km.MODELLED)})"


@pytest.mark.parametrize("render,obj", km.objects("ServiceMonitor", where=lambda r, d: d["apiVersion"] == "monitoring.coreos.com/v1"))
def test_servicemonitor_against_schema(render, obj):
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
    assert not errors, f"against {SERVICEMONITOR_SCHEMA.relative_to(km.ROOT)}:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def misspelt(doc: dict, where: list) -> tuple[dict, str]:
    """A copy with a misspelt field: an existing one with an "s" added, the original kept."""
    bad = copy.deepcopy(doc)
    target = bad
    for k in where:
        target = target[k]
    k = next(iter(target))
    target[f"{k}s"] = target[k]
    return bad, ".".join(map(str, where)) + f".{k}s"


def wrong_type(doc: dict) -> tuple[dict, str]:
    """A copy with the first string under spec turned into a number."""
    bad = copy.deepcopy(doc)

    def walk(o, path):
        for k, v in (o.items() if isinstance(o, dict) else enumerate(o)):
            if isinstance(v, str):
                o[k] = 42
                return f"{path}.{k}"
            if isinstance(v, (dict, list)):
                found = walk(v, f"{path}.{k}")
                if found is not None:
                    return found
        return None

    return bad, f"{walk(bad['spec'], 'spec')} a number"


def self_tests() -> list[tuple[str, dict, str]]:
    """(id, mutated object, the check that must reject it: fields or schema), for the first
    object of each modelled kind."""
    tests, seen = [], set()
    for _, d in km.unique_custom_resources():
        key = km.type_key(d)
        if key in seen:
            continue
        seen.add(key)
        for (bad, what), by in ((misspelt(d, ["spec"]), "fields"), (misspelt(d, km.MODELLED[key]), "fields"),
                                (wrong_type(d), "schema")):
            tests.append((f'{d["kind"]}:{what}', bad, by))
    return tests


CUSTOM = km.unique_custom_resources()
SELF_TESTS = self_tests()


@pytest.fixture(scope="session")
def crd_verdicts(node_tools):
    """{object as canonical JSON: verdict} from one run of crd-validate.mjs over the distinct
    custom resources of the renders and the self-tests' objects."""
    docs = [d for _, d in CUSTOM] + [d for _, d, _ in SELF_TESTS]
    work = km.WORK / "crd"
    work.mkdir(parents=True, exist_ok=True)
    (work / "resources.json").write_text(json.dumps(docs))
    r = subprocess.run(["node", str(CRD_VALIDATE), str(node_tools), str(work), str(work / "resources.json"),
                        str(work / "verdicts.json")], capture_output=True, text=True)
    if r.returncode != 0 or not (work / "verdicts.json").is_file():
        pytest.fail(f"{CRD_VALIDATE.relative_to(km.ROOT)} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}",
                    pytrace=False)
    verdicts = json.loads((work / "verdicts.json").read_text())
    assert len(verdicts) == len(docs), f"{len(verdicts)} verdicts for {len(docs)} objects"
    return {json.dumps(d, sort_keys=True): v for d, v in zip(docs, verdicts)}


@pytest.mark.parametrize("obj", [pytest.param(d, id=f"{src}:{ident(d)}") for src, d in CUSTOM]
                         or km.nothing(1, "no custom resource rendered"))
def test_custom_resource_against_kubernetes_models(crd_verdicts, obj):
    v = crd_verdicts[json.dumps(obj, sort_keys=True)]
    assert v["model"], f"{km.type_key(obj)}: crd-validate.mjs has no model for it"
    errors = [f"schema: {e}" for e in v["schema"]] + [f"fields: {e}" for e in v["fields"]]
    assert not errors, f"against {v['model']} (schema + unknown fields):\n" + "\n".join(f"  {e}" for e in errors)


@pytest.mark.parametrize("obj,by", [pytest.param(d, by, id=i) for i, d, by in SELF_TESTS]
                         or km.nothing(2, "no custom resource rendered"))
def test_kubernetes_models_reject(crd_verdicts, obj, by):
    """Self-test: a misspelt field is rejected by the unknown-field check (tsc), a wrong type by
    the schema (ajv)."""
    v = crd_verdicts[json.dumps(obj, sort_keys=True)]
    check = "unknown-field check" if by == "fields" else "schema"
    assert v[by], f"the {check} of {v['model']} accepted it"
