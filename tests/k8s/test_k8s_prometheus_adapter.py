"""The prometheus-adapter component's Helm values (components/prometheus-adapter/values.yaml):
the rules the chart writes into the adapter's configuration file, against
deploy/kubernetes/schemas/prometheus-adapter-config.json (written after the adapter's Go types,
closed as its strict parser is), and the policy against the keda component's (they are
alternatives for one policy). The metric the rules expose against the HPA's:
test_k8s_consistency.py.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

import k8s_manifests as km

COMPONENTS = km.K8S / "components"
VALUES = COMPONENTS / "prometheus-adapter" / "values.yaml"
SCHEMA = km.K8S / "schemas" / "prometheus-adapter-config.json"


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def config(values) -> dict:
    """What the Helm chart writes into the adapter's configuration file."""
    rules = values.get("rules") or {}
    config = {"rules": rules.get("custom") or []}
    if rules.get("external"):
        config["externalRules"] = rules["external"]
    return config


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def test_adapter_rules_against_schema(config, validator):
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, f"{VALUES.relative_to(km.ROOT)} against {SCHEMA.relative_to(km.ROOT)}:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert config["rules"], "no rule in rules.custom"


def test_adapter_schema_rejects_misspelt_field(config, validator):
    """Self-test: a rule with metricQuery (for metricsQuery) must fail the closed schema."""
    assert config["rules"], "no rule in rules.custom to misspell"
    bad = copy.deepcopy(config)
    bad["rules"][0]["metricQuery"] = bad["rules"][0].get("metricsQuery", "")
    assert any(True for _ in validator.iter_errors(bad)), "the adapter schema accepted a rule with metricQuery"


def test_adapter_values_only_chart_settings(values):
    top = sorted(set(values) - {"prometheus", "rules"})
    assert not top, f"settings other than the chart's prometheus and rules: {top}"
    rule_keys = sorted(set(values.get("rules") or {}) - {"default", "custom", "external", "resource", "existing"})
    assert not rule_keys, f"rules.* keys the chart does not have: {rule_keys}"


def test_keda_and_adapter_scale_alike():
    """The same target (images in flight per replica) and the same behaviour in both
    autoscaling components."""
    patch = yaml.safe_load((COMPONENTS / "prometheus-adapter" / "hpa-patch.yaml").read_text())
    so = yaml.safe_load((COMPONENTS / "keda" / "scaledobject.yaml").read_text())
    hpa_target = str(patch["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
    keda_target = so["spec"]["triggers"][0]["metadata"]["threshold"]
    hpa = float(hpa_target.rstrip("m")) / (1000 if hpa_target.endswith("m") else 1)
    assert hpa == float(keda_target), f"HPA target {hpa_target}, KEDA threshold {keda_target}"
    hpa_behavior = patch["spec"]["behavior"]
    keda_behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert hpa_behavior == keda_behavior, f"behaviour differs:\n  HPA  {hpa_behavior}\n  KEDA {keda_behavior}"
