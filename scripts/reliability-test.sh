#!/usr/bin/env bash
# Reliability tests of the release binary, on 127.0.0.1 only, each phase bounded in time
# (about 4 minutes in all, plus the container phase when an image is there):
#
#   scripts/reliability-test.sh [--only rolling,overload,clients,reload,container,nginx]
#
#   a. rolling   two servers behind HAProxy (health checks on /health every 500 ms, like a
#                readiness probe), steady load; SIGTERM one (it keeps serving for
#                --shutdown-delay-secs 2 while /health says 503), start its replacement,
#                wait healthy, then the other. Zero failed requests allowed.
#   b. overload  --queue-capacity 8 and 64 concurrent clients for 20 s: accepted requests
#                answer 200, the others 503 `overloaded` with Retry-After, fast; RSS before,
#                during and after stays bounded; the server survives.
#   c. clients   slowloris headers and bodies, uploads and responses abandoned midway (some
#                with a RST), 100 KB and 1 MB headers: a normal client's latency stays close
#                to its baseline and the server's open fds come back afterwards.
#   d. container when a Docker engine and the image (tch-serve:cpu, else tch-serve:latest)
#                are there: --read-only --tmpfs /tmp becomes healthy; docker kill (SIGKILL)
#                then docker start comes back healthy. Otherwise "skipped".
#   e. nginx     two servers behind nginx configured as the ingress-nginx component's
#                annotations configure ingress-nginx (scripts/reliability/nginx_lb.py): a 5 MB
#                photo passes, a body over --max-body-bytes gets the server's JSON 413, and a
#                rolling restart (the upstreams follow /health, nginx reloads) loses no request.
#   f. reload    one server on a repository with --enable-model-control, steady load: an
#                in-place reload, a new version, a broken version (refused, the served one
#                stays), unload and load of another model; zero failed requests allowed
#                (scripts/reliability/reload.py).
#
# The work is done by scripts/reliability/reliability.py (Python standard library only); logs
# and figures (figures.json) go to target/reliability/. The last line is "N passed, M failed";
# the exit status is non-zero on failure.
#
# Needs: target/release/tch-serve (`make build`), the exported model (`make model`), a photo
# (`make test-data`; one is written with Pillow otherwise), HAProxy and nginx (installed from
# Debian's packages when missing: run as root, or install `haproxy` and `nginx` first).
#
# Environment: BIN (target/release/tch-serve), MODEL_DIR (models/resnet18), PYTHON (.venv's).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

BIN="${BIN:-$root/target/release/tch-serve}"
MODEL_DIR="${MODEL_DIR:-$root/models/resnet18}"
PY="${PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
work="$root/target/reliability"
mkdir -p "$work"

fail_setup() { echo "setup: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

[ -x "$BIN" ] || fail_setup "$BIN is missing: run \`make build\`"
[ -f "$MODEL_DIR/model.pt" ] || fail_setup "$MODEL_DIR/model.pt is missing: run \`make model\`"

missing=()
for tool in haproxy nginx; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} (Debian packages)"
    if [ "$(id -u)" -eq 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
            >"$work/apt.log" 2>&1 || echo "could not install ${missing[*]} (see $work/apt.log)"
    else
        echo "not root: install ${missing[*]} (apt-get install ${missing[*]}) for the load-balancer tests"
    fi
fi

photo="$root/target/test-data/photos/chelsea.jpg"
if [ ! -f "$photo" ]; then
    photo="$work/photo.jpg"
    "$PY" - "$photo" <<'EOF' || fail_setup "cannot write a test photo (run \`make test-data\`)"
import sys
try:
    from skimage import data
    from PIL import Image
    Image.fromarray(data.chelsea()).save(sys.argv[1], quality=90)
except ImportError:
    from PIL import Image
    img = Image.new("RGB", (451, 300))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(300) for x in range(451)])
    img.save(sys.argv[1], quality=90)
EOF
fi

exec "$PY" "$root/scripts/reliability/reliability.py" --bin "$BIN" --model-dir "$MODEL_DIR" --photo "$photo" "$@"
