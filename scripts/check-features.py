#!/usr/bin/env python3
"""Fails when a crate the server shares with its dev-dependencies resolves with more features
in the test build than in the release build.

`cargo test --release` and `cargo build --release` compile the dependencies once for both only
while the two crate graphs are the same; a dev-dependency that turns on a feature of a shared
crate (reqwest turning on tower's `retry`, say) makes every crate above that one compile twice.
Cargo.toml turns those features on for the server too; this check names any it misses.
"""
from __future__ import annotations

import subprocess
import sys


def features(edges: str) -> dict[str, set[str]]:
    out = subprocess.run(
        ["cargo", "tree", "--locked", "-e", edges, "--prefix", "none", "--no-dedupe", "-f", "{p}|{f}"],
        check=True, capture_output=True, text=True).stdout
    # A crate built for the build machine (a build script's or proc macro's dependency) and for
    # the target may resolve differently: each feature set it is built with.
    found: dict[str, set[str]] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        package, feats = line.split("|", 1)
        package = package.replace("(*)", "").replace("(proc-macro)", "").strip()
        found.setdefault(package, set()).add(feats.strip())
    return found


def main() -> int:
    release = features("normal,build")
    tests = features("normal,build,dev")
    differ = [(p, release[p], tests[p]) for p in sorted(release) if p in tests and release[p] != tests[p]]
    for package, ours, theirs in differ:
        print(f"{package}: built with the features {sorted(ours)} for the release, {sorted(theirs)} for the "
              "tests; turn the dev-dependencies' ones on in Cargo.toml", file=sys.stderr)
    if differ:
        return 1
    print(f"check-features: the release and test builds resolve the same {len(release)} crates with the same features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
