#!/usr/bin/env bash
# Installs NVIDIA's perf_analyzer into .venv-perf: the binary ships in the tritonclient[all] wheel
# (2.50: the last one built for glibc 2.36, Debian 12; later ones need glibc 2.38). It links
# libcudart.so.12 (from the Python package index's CUDA runtime, no GPU needed) and libb64
# (Debian's libb64-0d). Idempotent; bench/run.py --only perf uses it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-perf"
req="$root/bench/requirements-perf-analyzer.txt"
if [ ! -x "$venv/bin/perf_analyzer" ] || ! cmp -s "$req" "$venv/.requirements"; then
    python3 -m venv "$venv"
    # --no-deps: only the binary and the library it links are needed, not the Python clients.
    "$venv/bin/python" -m pip install --quiet --no-deps -r "$req"
    cp "$req" "$venv/.requirements"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libb64-0d >/dev/null
    else
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q libb64-0d >/dev/null
    fi
fi
lib="$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
LD_LIBRARY_PATH="$lib" "$venv/bin/perf_analyzer" --version >/dev/null
echo "perf_analyzer ready: $venv/bin/perf_analyzer"
