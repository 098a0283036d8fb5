"""checkov (framework kubernetes, --skip-download) over every render: each finding must be fixed
or skipped in the manifests with a `checkov.io/skip<N>: ID=reason` annotation, and a skip
without its reason fails too. checkov's report: target/test-logs/k8s/checkov.json."""

from __future__ import annotations

import collections
import json
import subprocess

import pytest

import k8s_manifests as km


@pytest.fixture(scope="session")
def checkov_results(checkov, renders) -> dict:
    """{"files": {file: {"passed": [...], "failed": [...], "skipped": [...]}}, "summary": {...}}
    of one checkov run over the rendered files."""
    out = km.WORK / "checkov.json"
    r = subprocess.run([checkov, "--skip-download", "--framework", "kubernetes", "-d", str(km.RENDERED), "-o", "json"],
                       capture_output=True, text=True)
    out.write_text(r.stdout)
    (km.WORK / "checkov.err").write_text(r.stderr)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"checkov printed no JSON (exit {r.returncode}; {km.WORK / 'checkov.err'}):\n{r.stderr[-2000:]}",
                    pytrace=False)
    reports = data if isinstance(data, list) else [data]
    files = collections.defaultdict(lambda: {"passed": [], "failed": [], "skipped": []})
    summary = collections.Counter()
    for rep in reports:
        for kind in ("passed", "failed", "skipped"):
            for c in rep.get("results", {}).get(f"{kind}_checks", []):
                files[c["file_path"].lstrip("/")][kind].append(c)
        for k, v in rep.get("summary", {}).items():
            if isinstance(v, int):
                summary[k] += v
    return {"files": dict(files), "summary": dict(summary)}


def test_checkov_parses_every_render(checkov_results, renders):
    s = checkov_results["summary"]
    assert s.get("parsing_errors", 0) == 0, f"checkov: {s.get('parsing_errors')} parsing errors ({km.WORK / 'checkov.json'})"
    rendered = sorted(f"{r.name}.yaml" for r in renders.values() if r.error is None)
    unseen = [f for f in rendered if f not in checkov_results["files"]]
    assert rendered and not unseen, f"checkov checked nothing in {unseen or 'any render'}"


@pytest.mark.parametrize("name", km.RENDER_NAMES)
def test_checkov(checkov_results, renders, name):
    assert renders[name].error is None, f"not rendered: {renders[name].error}"
    res = checkov_results["files"].get(f"{name}.yaml", {"passed": [], "failed": [], "skipped": []})
    skips = sorted({f'{c["check_id"]} on {c["resource"]}: {c.get("check_result", {}).get("suppress_comment", "")}'
                    for c in res["skipped"]})
    print(f'checkov on {name}: {len(res["passed"])} passed, {len(res["failed"])} failed, {len(res["skipped"])} skipped',
          *(f"\n  skipped by annotation: {s}" for s in skips))
    failed = [f'{c["check_id"]} {c["check_name"]} ({c["resource"]})' for c in res["failed"]]
    assert not failed, "checkov findings (fix them, or skip with a checkov.io/skip<N> annotation and its reason):\n" \
        + "\n".join(f"  {f}" for f in failed)
    assert res["passed"], "checkov passed no check on this render"
    reasonless = [c["check_id"] for c in res["skipped"]
                  if not c.get("check_result", {}).get("suppress_comment", "").strip()]
    assert not reasonless, f"skipped without a reason: {reasonless}"
