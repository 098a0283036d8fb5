"""Every kustomization renders with `kubectl kustomize`, and every component is part of a
render (k8s_manifests.COMPONENT_SETS)."""

from __future__ import annotations

from collections import Counter

import pytest

import k8s_manifests as km


@pytest.mark.parametrize("component", km.components())
def test_component_is_rendered(component):
    sets = [["servicemonitor"], *km.COMPONENT_SETS]
    assert any(component in s for s in sets), \
        f"components/{component} is in no render: add it to COMPONENT_SETS (tests/k8s/k8s_manifests.py); sets {sets}"


@pytest.mark.parametrize("name", km.RENDER_NAMES)
def test_render(renders, name):
    r = renders[name]
    assert r.error is None, r.error
    kinds = Counter(d.get("kind") for d in r.docs)
    print(f"{name}: {len(r.docs)} objects:", ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items())))
    assert r.docs, f"{r.path}: kubectl kustomize {r.kustomization} rendered no object"
    nameless = [d.get("kind") for d in r.docs if not d.get("metadata", {}).get("name")]
    assert not nameless, f"{r.path}: objects without a name: {nameless}"
