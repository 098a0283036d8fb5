#!/usr/bin/env python3
"""One line per suite of `make test`, from what the runners themselves wrote:

  rust       cargo test's "test result:" lines (target/test-reports/rust.log)
  others     pytest's JUnit XML reports (target/test-reports/<suite>.xml and
             <suite>.<part>.xml, added up)

and the wall-clock time of each suite (target/test-reports/<suite>.seconds, written by
`make test`), after the time of the setup before them (prepare.seconds). A suite without a report, or whose runner failed without a failed test (a build
or a setup that broke first: target/test-reports/<suite>.status), is marked as such.

    scripts/test-summary.py rust k8s containers reliability protocol

Exit status 0 when every suite passed. Python's standard library only.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPORTS = Path(__file__).resolve().parents[1] / "target" / "test-reports"


def cargo(log: Path) -> dict | None:
    if not log.is_file():
        return None
    counts = dict(tests=0, failed=0, errors=0, skipped=0, binaries=0)
    for m in re.finditer(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored;",
                         log.read_text(errors="replace"), re.M):
        passed, failed, ignored = map(int, m.groups())
        counts["tests"] += passed + failed + ignored
        counts["failed"] += failed
        counts["skipped"] += ignored
        counts["binaries"] += 1
    return counts if counts["binaries"] else None


def junit(files: list[Path]) -> dict | None:
    if not files:
        return None
    counts = dict(tests=0, failed=0, errors=0, skipped=0)
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except (ET.ParseError, OSError):
            counts["errors"] += 1
            continue
        for s in [root] if root.tag == "testsuite" else root.iter("testsuite"):
            counts["tests"] += int(s.get("tests", 0))
            counts["failed"] += int(s.get("failures", 0))
            counts["errors"] += int(s.get("errors", 0))
            counts["skipped"] += int(s.get("skipped", 0))
    return counts


def main(suites: list[str]) -> int:
    rows, ok = [], True
    for suite in suites:
        counts = cargo(REPORTS / "rust.log") if suite == "rust" else junit(
            sorted(REPORTS.glob(f"{suite}.xml")) + sorted(REPORTS.glob(f"{suite}.*.xml")))
        seconds = REPORTS / f"{suite}.seconds"
        status = REPORTS / f"{suite}.status"
        took = f"{int(seconds.read_text()) // 60} min {int(seconds.read_text()) % 60:02d} s" if seconds.is_file() else ""
        exit_status = int(status.read_text()) if status.is_file() else None
        if counts is None:
            verdict, text = False, "no report: the suite did not run (see its output above)"
        else:
            passed = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
            text = f"{passed} passed, {counts['failed']} failed"
            if counts["errors"]:
                text += f", {counts['errors']} errors"
            if counts["skipped"]:
                text += f", {counts['skipped']} skipped"
            verdict = counts["failed"] == 0 and counts["errors"] == 0 and counts["tests"] > 0
            if exit_status not in (None, 0) and verdict:
                verdict, text = False, text + f"; but its runner exited {exit_status} (see its output above)"
        ok &= verdict
        rows.append((suite, "PASS" if verdict else "FAIL", text, took))
    width = max(len(r[0]) for r in rows)
    print("\n==== make test: one line per suite")
    prepare = REPORTS / "prepare.seconds"
    if prepare.is_file():
        took = int(prepare.read_text())
        status = (REPORTS / "prepare.status").read_text().strip() if (REPORTS / "prepare.status").is_file() else "?"
        print(f"{'    ' if status == '0' else 'FAIL'}  {'prepare':<{width}}  everything the suites need, built (make prepare)"
              f"{'' if status == '0' else f' (exit {status})'}  ({took // 60} min {took % 60:02d} s)")
        ok &= status == "0"
    for suite, verdict, text, took in rows:
        print(f"{verdict}  {suite:<{width}}  {text}{'  (' + took + ')' if took else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["rust", "k8s", "containers", "reliability", "protocol"]))
