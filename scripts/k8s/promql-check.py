"""Checks every PromQL expression the project ships: that it parses (promtool, the Prometheus
project's own parser) and that it names only metrics the server exports (the metrics table of
README.md, read here: the one list of them).

    python scripts/k8s/promql-check.py --promtool /usr/bin/promtool --work target/k8s-validate/promql

Expressions come from:
  deploy/grafana/*.json                      panel queries and template-variable queries
  deploy/prometheus/alerts.yml               alerting rules (also: promtool check rules, test rules)
  deploy/kubernetes/components/*/*.yaml      KEDA Prometheus triggers (ScaledObject queries)
  deploy/kubernetes/components/*/values.yaml prometheus-adapter rules (metricsQuery rendered as
                                             the adapter renders it, seriesQuery as a selector)
and prometheus.yml goes through `promtool check config`. Grafana's variables are replaced
before parsing ($__rate_interval by a duration, $var by a regex). Each source becomes a rules
file of recording rules that `promtool check rules` parses.

Self-tests first: an unbalanced expression must fail promtool, an unknown metric must fail the
name check, so that neither check can pass vacuously.

Prints "PASS<TAB>message" / "FAIL<TAB>message" (and "NOTE<TAB>message") lines; exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def out(ok: bool, msg: str) -> None:
    print(("PASS" if ok else "FAIL") + "\t" + msg, flush=True)


def note(msg: str) -> None:
    print("NOTE\t" + msg, flush=True)


# --------------------------------------------------------- exported metrics ---


def exported_metrics(readme: Path) -> dict[str, tuple[str, set[str]]]:
    """{name: (type, labels)} from the table under '## Metrics' in README.md. A name ending in
    '*' is a prefix (process_*)."""
    text = readme.read_text()
    m = re.search(r"^## Metrics\s*$(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        raise SystemExit("README.md has no '## Metrics' section")
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
                    exprs.append((f'panel "{p.get("title")}" {t.get("refId", "")}', t["expr"]))
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


# ----------------------------------------------------------------- checks ---


# Metrics with a `model` label (one series per model): a dashboard's `model` variable must
# reach each of them.
PER_MODEL = {"tch_serve_queue_wait_seconds", "tch_serve_preprocess_duration_seconds",
             "tch_serve_inference_duration_seconds", "tch_serve_batch_size", "tch_serve_queue_depth",
             "tch_serve_inflight_images", "tch_serve_queue_capacity", "tch_serve_images_total",
             "tch_serve_cancelled_images_total", "tch_serve_inference_failures_total",
             "tch_serve_rejections_total"}


def grafana_structure(path: Path, metrics: dict) -> list[tuple[bool, str]]:
    """What importing the JSON as is needs: the Prometheus data source as a variable that every
    panel uses, unique panel ids, and the `model` variable on every per-model series."""
    dash = json.loads(path.read_text())
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    data = [p for p in panels if p.get("type") != "row"]
    ds_var = variables.get("datasource", {})
    uses = all(p.get("datasource", {}).get("uid") == "${datasource}"
               and all(t.get("datasource", {}).get("uid") == "${datasource}" for t in p.get("targets", []))
               for p in data)
    ids = [p.get("id") for p in panels]
    missing = []
    for p in data:
        for t in p.get("targets", []):
            for name, labels in selectors(t.get("expr", "")):
                _, base = known_metric(name, metrics)
                if (base or name) in PER_MODEL and "model" not in labels:
                    missing.append(f'{name} in "{p.get("title")}"')
    model = variables.get("model", {})
    return [
        (ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus" and uses,
         f"{path.name}: a Prometheus data-source variable, used by all {len(data)} panels (imports as is)"),
        (len(ids) == len(set(ids)) and None not in ids, f"{path.name}: panel ids unique"),
        (model.get("type") == "query" and model.get("includeAll") and not missing,
         f"{path.name}: a `model` variable (multi, All) applied to every per-model series"
         + "".join(f"\n      no model matcher: {m}" for m in missing)),
    ]


def promtool_parse(promtool: str, work: Path, name: str, exprs: list[tuple[str, str]]) -> tuple[bool, str]:
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
    path = work / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".rules.yml")
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    msg = (r.stdout + r.stderr).strip()
    # Point at the source of a failing expression: promtool names the rule's index.
    for m in re.finditer(r"rule (\d+)", msg):
        idx = int(m.group(1)) - 1
        if 0 <= idx < len(exprs):
            msg += f"\n      rule {idx + 1} is {exprs[idx][0]}: {exprs[idx][1]}"
    return r.returncode == 0, msg


def check_names(exprs, metrics) -> tuple[list[str], list[str]]:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--work", default=str(ROOT / "target" / "k8s-validate" / "promql"))
    ap.add_argument("--root", default=str(ROOT))
    opts = ap.parse_args()
    root = Path(opts.root)
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)

    metrics = exported_metrics(root / "README.md")
    out(len(metrics) >= 10, f"README.md metrics table: {len(metrics)} metrics "
        f"({', '.join(sorted(m for m in metrics if metrics[m][0] == 'histogram'))} are histograms)")

    # Self-tests: the checks must be able to fail.
    ok, _ = promtool_parse(opts.promtool, work, "self-test-broken", [("broken", "sum(rate(tch_serve_images_total[5m])")])
    out(not ok, "self-test: promtool rejects an unbalanced expression")
    unknown, _ = check_names([("t", 'sum(rate(tch_serve_imagez_total{model=~".*"}[5m])) by (model)')], metrics)
    out(unknown == ["tch_serve_imagez_total (t)"], "self-test: the name check rejects a metric the server does not export"
        + ("" if unknown else " (it did not)"))
    probe = selectors('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{x="}", y=~"$1"}[5m] offset 1h))) / on(pod) group_left b unless c')
    out(probe == [("", ["le", "model"]), ("a_bucket", ["x", "y"]), ("", ["pod"]), ("b", []), ("c", [])],
        f"self-test: the expression scanner finds metric names and labels ({probe})")

    for path in sorted((root / "deploy" / "grafana").glob("*.json")):
        for ok, msg in grafana_structure(path, metrics):
            out(ok, msg)

    for name, exprs in collect(root).items():
        if not exprs:
            out(False, f"{name}: no PromQL expression found")
            continue
        ok, msg = promtool_parse(opts.promtool, work, name, exprs)
        out(ok, f"{name}: {len(exprs)} expressions parse (promtool check rules)"
            + ("" if ok else "\n      " + msg.replace("\n", "\n      ")))
        unknown, undocumented = check_names(exprs, metrics)
        out(not unknown, f"{name}: only metrics the server exports (README.md's table)"
            + "".join(f"\n      unknown: {u}" for u in unknown))
        if undocumented:
            note(f"{name}: labels not (yet) in README.md's table for their metric: "
                 + "; ".join(undocumented[:8]) + (" ..." if len(undocumented) > 8 else ""))

    # The project's Prometheus files, as Prometheus would load them.
    checks = [
        (["check", "config", "prometheus.yml"], "prometheus.yml: promtool check config"),
        (["check", "rules", "deploy/prometheus/alerts.yml"], "deploy/prometheus/alerts.yml: promtool check rules"),
        (["test", "rules", "deploy/prometheus/alerts_test.yml"], "deploy/prometheus/alerts_test.yml: promtool test rules"),
    ]
    for args, what in checks:
        if not (root / args[-1]).exists():
            continue
        r = subprocess.run([opts.promtool, *args], capture_output=True, text=True, cwd=root)
        out(r.returncode == 0, what + ("" if r.returncode == 0 else
                                       "\n      " + (r.stdout + r.stderr).strip().replace("\n", "\n      ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
