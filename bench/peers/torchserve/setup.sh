#!/usr/bin/env bash
# Sets up TorchServe as a benchmark peer (used by `make bench`, idempotent):
# - a JRE (Debian's openjdk-17-jre-headless) when no `java` is on PATH;
# - its own venv, .venv-torchserve, layered on the project venv through a .pth file, so that it
#   runs the very same torch and torchvision as tch-serve's reference and the FastAPI peer
#   (and does not download them again); TorchServe, its archiver and the handler's imports
#   are installed into it from requirements.txt;
# - a model archive per model folder given (default models/resnet18), in target/torchserve/model-store.
#
#   bench/peers/torchserve/setup.sh [MODEL_DIR ...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
PROJECT_VENV="${PROJECT_VENV:-$ROOT/.venv}"
VENV="${TORCHSERVE_VENV:-$ROOT/.venv-torchserve}"
STORE="${TORCHSERVE_MODEL_STORE:-$ROOT/target/torchserve/model-store}"

if ! command -v java >/dev/null; then
    echo "installing a JRE (openjdk-17-jre-headless)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless
fi

if [ ! -x "$PROJECT_VENV/bin/python" ]; then
    echo "no project venv at $PROJECT_VENV: run \`make setup\` first" >&2
    exit 1
fi
if [ ! -f "$VENV/.installed" ] || [ "$HERE/requirements.txt" -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PROJECT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        > "$site/tch_serve_project_venv.pth"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$HERE/requirements.txt"
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -c 'import torch, torchvision, ts; print("torchserve venv: torch", torch.__version__, "torchvision", torchvision.__version__)'

[ "$#" -gt 0 ] || set -- "$ROOT/models/resnet18"
for model in "$@"; do
    "$VENV/bin/python" "$HERE/archive.py" "$model" "$STORE"
done
