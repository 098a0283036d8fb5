#!/usr/bin/env python3
"""Check a CycloneDX SBOM of the tch-serve binary against Cargo.lock.

    scripts/check-sbom.py target/release/tch-serve.cdx.json [--lock Cargo.lock]

Fails unless the document is CycloneDX JSON describing tch-serve, every component is a crate
of Cargo.lock at its locked version with a package URL, and the crates the server is built on
(tch at the pinned version, torch-sys, axum, tokio, image, prometheus) are listed. Prints the
number of components and of licenses.
"""

import argparse
import json
import sys
import tomllib
from pathlib import Path

REQUIRED = {"tch": "0.24.0", "torch-sys": "0.24.0", "axum": None, "tokio": None,
            "image": None, "prometheus": None, "tonic": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sbom", type=Path)
    ap.add_argument("--lock", type=Path, default=Path(__file__).resolve().parent.parent / "Cargo.lock")
    args = ap.parse_args()

    doc = json.loads(args.sbom.read_text())
    locked = {(p["name"], p["version"]) for p in tomllib.loads(args.lock.read_text())["package"]}
    problems = []
    if doc.get("bomFormat") != "CycloneDX":
        problems.append(f"bomFormat is {doc.get('bomFormat')!r}, not CycloneDX")
    subject = doc.get("metadata", {}).get("component", {})
    if subject.get("name") != "tch-serve":
        problems.append(f"the SBOM describes {subject.get('name')!r}, not tch-serve")
    components = doc.get("components", [])
    names = {}
    licenses = set()
    for c in components:
        name, version = c.get("name"), c.get("version")
        names[name] = version
        if (name, version) not in locked:
            problems.append(f"{name} {version} is not in {args.lock.name}")
        if not str(c.get("purl", "")).startswith(f"pkg:cargo/{name}@"):
            problems.append(f"{name} has no cargo package URL")
        for lic in c.get("licenses", []):
            licenses.add(lic.get("expression") or lic.get("license", {}).get("id") or "?")
    for name, version in REQUIRED.items():
        if name not in names:
            problems.append(f"{name} is not listed")
        elif version and names[name] != version:
            problems.append(f"{name} is {names[name]}, not {version}")
    if problems:
        for p in problems:
            print(f"SBOM: {p}", file=sys.stderr)
        return 1
    print(f"SBOM: {args.sbom}: CycloneDX {doc.get('specVersion')}, {len(components)} crates "
          f"(all at their Cargo.lock versions), {len(licenses)} distinct licenses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
