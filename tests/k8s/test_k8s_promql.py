"""Every PromQL expression the project ships (k8s_promql: the Grafana dashboards, the alerting
rules, the KEDA trigger, the prometheus-adapter rules) parses with promtool, the Prometheus
project's own parser, and names only metrics of README.md's metrics table; the dashboards
import as they are; promtool checks prometheus.yml and the alerting rules and runs their unit
tests. Self-tests first: an unbalanced expression must fail promtool, an unknown metric the
name check, and the scanner must find names and labels, so that no check passes vacuously.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings

import pytest
import yaml

import k8s_manifests as km
import k8s_promql as kp

README = km.ROOT / "README.md"
METRICS = kp.exported_metrics(README)
SOURCES = kp.collect(km.ROOT)
EXPRESSIONS = [(f"{src}:{where}", expr) for src, exprs in SOURCES.items() for where, expr in exprs]
DASHBOARDS = sorted((km.ROOT / "deploy" / "grafana").glob("*.json"))
UNBALANCED = "sum(rate(tch_serve_images_total[5m])"


@pytest.fixture(scope="session")
def promtool_verdicts(promtool) -> dict[str, tuple[bool, str]]:
    """{expression id: (parses, promtool's words)}: each expression (and the self-test's
    unbalanced one) as a recording rule in a rules file of its own, all files in one
    `promtool check rules` run."""
    work = km.WORK / "promql"
    work.mkdir(parents=True, exist_ok=True)
    exprs = EXPRESSIONS + [("self-test:unbalanced", UNBALANCED)]
    files = {}
    for i, (eid, expr) in enumerate(exprs):
        path = work / f"{i:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', eid)[:80]}.rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": [{"record": "check:expr", "expr": expr}]}]},
                                       sort_keys=False))
        files[str(path)] = eid
    r = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True)
    # stdout: "Checking FILE", then "  SUCCESS: ..." or nothing; stderr: "  FAILED:" and the
    # errors, which name the file.
    (work / "promtool.log").write_text(r.stdout + r.stderr)
    verdicts, current = {}, None
    for line in r.stdout.splitlines():
        if line.startswith("Checking "):
            current = line[len("Checking "):].strip()
        elif current in files and "SUCCESS" in line:
            verdicts[files[current]] = (True, line.strip())
    for path, eid in files.items():
        if eid not in verdicts:
            said = [line for line in r.stderr.splitlines() if path in line] or r.stderr.strip().splitlines()[-3:]
            verdicts[eid] = (False, "\n".join(said))
    return verdicts


# -------------------------------------------------------------- self-tests ---


def test_metrics_table_read():
    histograms = sorted(m for m in METRICS if METRICS[m][0] == "histogram")
    assert len(METRICS) >= 10 and histograms, \
        f"README.md's metrics table gave {len(METRICS)} metrics ({len(histograms)} histograms)"


def test_promtool_rejects_unbalanced_expression(promtool_verdicts):
    ok, said = promtool_verdicts["self-test:unbalanced"]
    assert not ok, f"promtool accepted {UNBALANCED!r}: {said}"


def test_name_check_rejects_unexported_metric():
    unknown, _ = kp.check_names([("t", 'sum(rate(tch_serve_imagez_total{model=~".*"}[5m])) by (model)')], METRICS)
    assert unknown == ["tch_serve_imagez_total (t)"], f"the name check found {unknown}"


def test_expression_scanner_finds_names_and_labels():
    probe = kp.selectors('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{x="}", y=~"$1"}[5m] offset 1h)))'
                         ' / on(pod) group_left b unless c')
    assert probe == [("", ["le", "model"]), ("a_bucket", ["x", "y"]), ("", ["pod"]), ("b", []), ("c", [])], probe


# ------------------------------------------------------------- expressions ---


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_has_expressions(source):
    assert SOURCES[source], f"{source}: no PromQL expression found"


@pytest.mark.parametrize("eid,expr", [pytest.param(i, e, id=i) for i, e in EXPRESSIONS])
def test_expression_parses(promtool_verdicts, eid, expr):
    ok, said = promtool_verdicts[eid]
    assert ok, f"promtool check rules: {expr}\n{said}"


@pytest.mark.parametrize("eid,expr", [pytest.param(i, e, id=i) for i, e in EXPRESSIONS])
def test_expression_names_exported_metrics(eid, expr):
    unknown, undocumented = kp.check_names([(eid, expr)], METRICS)
    if undocumented:
        warnings.warn(f"labels not (yet) in README.md's table for their metric: {'; '.join(undocumented)}")
    assert not unknown, f"metrics the server does not export (README.md's table): {unknown}\n  in {expr}"


# -------------------------------------------------------------- dashboards ---


def load(dashboard) -> dict:
    return json.loads(dashboard.read_text())


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_datasource_variable_used_by_every_panel(dashboard):
    dash = load(dashboard)
    ds_var = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}.get("datasource", {})
    assert ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus", \
        f"the datasource variable: {ds_var or 'none'}"
    data = [p for p in kp.dashboard_panels(dash) if p.get("type") != "row"]
    other = [p.get("title") for p in data
             if p.get("datasource", {}).get("uid") != "${datasource}"
             or any(t.get("datasource", {}).get("uid") != "${datasource}" for t in p.get("targets", []))]
    assert not other, f"panels (of {len(data)}) not on ${{datasource}}: {other}"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panel_ids_unique(dashboard):
    ids = [p.get("id") for p in kp.dashboard_panels(load(dashboard))]
    dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    assert not dup and None not in ids, f"duplicate panel ids {dup}; panels without an id: {ids.count(None)}"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_model_variable_on_every_per_model_series(dashboard):
    dash = load(dashboard)
    model = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}.get("model", {})
    assert model.get("type") == "query" and model.get("includeAll"), f"the model variable (multi, All): {model or 'none'}"
    missing = []
    for p in kp.dashboard_panels(dash):
        if p.get("type") == "row":
            continue
        for t in p.get("targets", []):
            for name, labels in kp.selectors(t.get("expr", "")):
                _, base = kp.known_metric(name, METRICS)
                if (base or name) in kp.PER_MODEL and "model" not in labels:
                    missing.append(f'{name} in "{p.get("title")}"')
    assert not missing, f"per-model series without a model matcher: {missing}"


# --------------------------------------------------------- Prometheus files ---


@pytest.mark.parametrize("args", [
    pytest.param(["check", "config", "prometheus.yml"], id="prometheus.yml:check-config"),
    pytest.param(["check", "rules", "deploy/prometheus/alerts.yml"], id="alerts.yml:check-rules"),
    pytest.param(["test", "rules", "deploy/prometheus/alerts_test.yml"], id="alerts_test.yml:test-rules"),
])
def test_promtool_on_prometheus_files(promtool, args):
    assert (km.ROOT / args[-1]).is_file(), f"{args[-1]} is missing"
    r = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=km.ROOT)
    assert r.returncode == 0, f"promtool {' '.join(args)}: exit {r.returncode}\n{(r.stdout + r.stderr).strip()}"
