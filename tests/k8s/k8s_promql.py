"""PromQL as the project ships it: where the expressions are (the Grafana dashboards, the
alerting rules, the autoscaling components), the metrics the server exports (the metrics table
of README.md, the one list of them) and a scanner that finds the metric names and labels an
expression uses. The checks are tests/k8s/test_k8s_promql.py.

Expressions come from:
  deploy/grafana/*.json                      panel queries and template-variable queries
  deploy/prometheus/alerts.yml               alerting rules
  deploy/kubernetes/components/*/*.yaml      KEDA Prometheus triggers (ScaledObject queries)
  deploy/kubernetes/components/*/values.yaml prometheus-adapter rules (metricsQuery rendered as
                                             the adapter renders it, seriesQuery as a selector)
Grafana's variables are replaced before parsing ($__rate_interval by a duration, $var by a
regex).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml


# --------------------------------------------------------- exported metrics ---


def exported_metrics(readme: Path) -> dict[str, tuple[str, set[str]]]:
    """{name: (type, labels)} from the table under '## Metrics' in README.md. A name ending in
    '*' is a prefix (process_*)."""
    text = readme.read_text()
    m = re.search(r"^## Metrics\s*$(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        raise ValueError("README.md has no '## Metrics' section")
    metrics = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*\*?)`", cells[0])
        labels = set(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", cells[2]))
        for n in names:
            metrics[n] = (cells[1], labels)
    return metrics


# Series Prometheus itself adds to every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                 "scrape_samples_post_metric_relabeling", "scrape_series_added"}
# Labels a scrape adds (static configs, the ServiceMonitor, annotation-based pod discovery) and
# the histogram bucket label.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container",
                 "node", "le", "__name__"}


def known_metric(name: str, metrics: dict) -> tuple[bool, str | None]:
    """(exported?, base name in the table)."""
    if name in SCRAPE_SERIES:
        return True, None
    if name in metrics:
        return True, name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and metrics.get(base, ("",))[0] == "histogram":
            return True, base
    for pattern in metrics:
        if pattern.endswith("*") and name.startswith(pattern[:-1]):
            return True, pattern
    return False, None


# ------------------------------------------------------------ PromQL lexer ---

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """[(metric name, [label names used with it])] for every vector selector in expr, plus
    ('', labels) for grouping clauses. Strings and range/subquery brackets are skipped."""
    i, n = 0, len(expr)
    tokens: list[tuple[str, str]] = []
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            tokens.append(("str", expr[i:j + 1]))
            i = j + 1
        elif c == "#":
            while i < n and expr[i] != "\n":
                i += 1
        elif c == "[":
            j = expr.index("]", i)
            i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            j = i
            while j < n and (expr[j].isalnum() or expr[j] in "._"):
                j += 1
            if j < n and expr[j] in "+-" and expr[j - 1] in "eE" and not expr[i:j].startswith("0x"):
                j += 1
                while j < n and expr[j].isalnum():
                    j += 1
            tokens.append(("num", expr[i:j]))
            i = j
        elif c.isalpha() or c in "_:":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] in "_:"):
                j += 1
            tokens.append(("id", expr[i:j]))
            i = j
        else:
            tokens.append(("op", c))
            i += 1
    found: list[tuple[str, list[str]]] = []
    k = 0
    while k < len(tokens):
        kind, text = tokens[k]
        nxt = tokens[k + 1] if k + 1 < len(tokens) else ("", "")
        if kind == "id" and text in GROUPING and nxt == ("op", "("):
            labels, k = _ident_list(tokens, k + 2)
            found.append(("", labels))
            continue
        if kind == "op" and text == "{":
            # a selector without a name in front ({__name__=...}), or after a name (below)
            labels, k = _matchers(tokens, k + 1)
            found.append(("", labels))
            continue
        if kind == "id" and text in AGGREGATIONS and nxt[0] == "id" and nxt[1] in ("by", "without"):
            k += 1  # sum by (...) (...): the clause comes before the parenthesis
            continue
        if kind == "id" and text not in KEYWORDS and nxt != ("op", "("):
            labels: list[str] = []
            if nxt == ("op", "{"):
                labels, k = _matchers(tokens, k + 2)
            else:
                k += 1
            found.append((text, labels))
            continue
        k += 1
    return found


def _ident_list(tokens, k):
    labels = []
    while k < len(tokens) and tokens[k] != ("op", ")"):
        if tokens[k][0] == "id":
            labels.append(tokens[k][1])
        k += 1
    return labels, k + 1


def _matchers(tokens, k):
    labels = []
    expect_name = True
    while k < len(tokens) and tokens[k] != ("op", "}"):
        kind, text = tokens[k]
        if kind in ("id", "str") and expect_name:
            labels.append(text.strip("\"'`"))
            expect_name = False
        elif (kind, text) == ("op", ","):
            expect_name = True
        k += 1
    return labels, k + 1


# ---------------------------------------------------------------- sources ---


def grafana_exprs(path: Path) -> list[tuple[str, str]]:
    dash = json.loads(path.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((f'panel {p.get("title")} {t.get("refId", "")}'.strip(), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q or "")
        if m:  # label_values(selector, label): the selector is PromQL
            exprs.append((f"variable ${v['name']} (label_values)", m.group(1)))
        elif q:
            m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
            exprs.append((f"variable ${v['name']}", m.group(1) if m else q))
    return exprs


def grafana_substitute(expr: str) -> str:
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(?::\w+)?\}?", "5m", expr)
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", ".*", expr)


def adapter_render(template: str) -> str:
    """The adapter's Go template for a pods query (delimiters << >>): .Series is the series
    name, .LabelMatchers the namespace and pods, .GroupBy the pod label."""
    values = {"Series": "tch_serve_inflight_images",
              "LabelMatchers": 'namespace="tch-serve",pod=~"tch-serve-a|tch-serve-b"',
              "GroupBy": "pod"}
    return re.sub(r"<<\s*\.(\w+)\s*>>", lambda m: values[m.group(1)], template)


def collect(root: Path) -> dict[str, list[tuple[str, str]]]:
    sources: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((root / "deploy" / "grafana").glob("*.json")):
        sources[str(path.relative_to(root))] = [(w, grafana_substitute(e)) for w, e in grafana_exprs(path)]
    alerts = root / "deploy" / "prometheus" / "alerts.yml"
    if alerts.exists():
        doc = yaml.safe_load(alerts.read_text())
        sources[str(alerts.relative_to(root))] = [
            (f'rule {r.get("alert") or r.get("record")}', r["expr"])
            for g in doc["groups"] for r in g["rules"]]
    for path in sorted((root / "deploy" / "kubernetes" / "components").glob("*/*.yaml")):
        rel = str(path.relative_to(root))
        for d in yaml.safe_load_all(path.read_text()):
            if not isinstance(d, dict):
                continue
            if d.get("kind") == "ScaledObject":
                for i, t in enumerate(d["spec"].get("triggers", [])):
                    if t.get("type") == "prometheus":
                        sources.setdefault(rel, []).append((f"trigger {i} query", t["metadata"]["query"]))
            if path.name == "values.yaml" and isinstance(d.get("rules"), dict):
                for kind in ("custom", "external"):
                    for i, r in enumerate(d["rules"].get(kind) or []):
                        sources.setdefault(rel, []).append((f"rules.{kind}[{i}].seriesQuery", r["seriesQuery"]))
                        if r.get("metricsQuery"):
                            sources.setdefault(rel, []).append(
                                (f"rules.{kind}[{i}].metricsQuery (rendered)", adapter_render(r["metricsQuery"])))
    return sources


# ------------------------------------------------------------ dashboards ---


# Metrics with a `model` label (one series per model): a dashboard's `model` variable must
# reach each of them.
PER_MODEL = {"tch_serve_queue_wait_seconds", "tch_serve_preprocess_duration_seconds",
             "tch_serve_inference_duration_seconds", "tch_serve_batch_size", "tch_serve_queue_depth",
             "tch_serve_inflight_images", "tch_serve_queue_capacity", "tch_serve_images_total",
             "tch_serve_cancelled_images_total", "tch_serve_inference_failures_total",
             "tch_serve_rejections_total"}


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel of a Grafana dashboard, rows' panels included."""
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return panels


def check_names(exprs: list[tuple[str, str]], metrics: dict) -> tuple[list[str], list[str]]:
    """(metrics that are not in the table, labels the table does not list for their metric)
    of the expressions [(where, expression)]."""
    unknown, undocumented = [], []
    for where, e in exprs:
        for name, labels in selectors(e):
            if not name:
                continue
            ok, base = known_metric(name, metrics)
            if not ok:
                unknown.append(f"{name} ({where})")
                continue
            if base and not base.endswith("*"):
                allowed = metrics[base][1] | TARGET_LABELS
                for lab in labels:
                    if lab not in allowed:
                        undocumented.append(f"{lab} on {name} ({where})")
    return sorted(set(unknown)), sorted(set(undocumented))
