#!/usr/bin/env bash
# Reliability tests of the release binary, on 127.0.0.1 only, each phase bounded in time
# (about 4 minutes in all, plus the container phase when an image is there, plus the fuzz
# phase: about 1.5 minutes once cargo-fuzz and the fuzz target are built, 6 minutes cold):
#
#   scripts/reliability-test.sh [--only rolling,overload,clients,reload,container,nginx,fuzz]
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
#   g. fuzz      cargo fuzz (libFuzzer) on the image decode path for FUZZ_SECONDS (60):
#                scripts/fuzz.sh, which installs cargo-fuzz into target/tools when missing,
#                builds fuzz/ (src/preprocess/ without libtorch) and fails on a crash, leaving
#                the input in fuzz/artifacts/decode/. Runs after the others; needs no server.
#
# Phases a-f are done by scripts/reliability/reliability.py (Python standard library only);
# logs and figures (figures.json) go to target/reliability/, the fuzzer's logs to target/fuzz/.
# The last line is "N passed, M failed" for all the phases run; the exit status is non-zero on
# failure.
#
# Needs, for phases a-f: target/release/tch-serve (`make build`), the exported model (`make
# model`), a photo (`make test-data`; one is written with Pillow otherwise), HAProxy and nginx
# (installed from Debian's packages when missing: run as root, or install `haproxy` and `nginx`
# first). For phase g: cargo (stable is enough) and crates.io, the first time.
#
# Environment: BIN (target/release/tch-serve), MODEL_DIR (models/resnet18), PYTHON (.venv's),
# FUZZ_SECONDS (60).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

BIN="${BIN:-$root/target/release/tch-serve}"
MODEL_DIR="${MODEL_DIR:-$root/models/resnet18}"
PY="${PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
work="$root/target/reliability"
mkdir -p "$work"

# --only: phases a-f go to reliability.py, g (fuzz) is run here; without it, all of them.
only=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --only) only="${2:-}"; shift 2 || shift ;;
        --only=*) only="${1#--only=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
py_phases="rolling,overload,clients,reload,container,nginx"
run_fuzz=1
if [ -n "$only" ]; then
    run_fuzz=0
    py=()
    IFS=, read -ra wanted <<<"$only"
    for phase in "${wanted[@]}"; do
        if [ "$phase" = fuzz ]; then run_fuzz=1; else py+=("$phase"); fi
    done
    py_phases="$(IFS=,; echo "${py[*]+"${py[*]}"}")"
fi

passed=0
failed=0
result() { # PASS|FAIL name detail
    if [ "$1" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    echo "$1  $2${3:+  ($3)}"
}

fail_setup() { echo "setup: $*" >&2; result FAIL "setup" "$*"; }

# Phases a-f: the checks and counts of reliability.py.
python_phases() {
    [ -x "$BIN" ] || { fail_setup "$BIN is missing: run \`make build\`"; return; }
    [ -f "$MODEL_DIR/model.pt" ] || { fail_setup "$MODEL_DIR/model.pt is missing: run \`make model\`"; return; }

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
        "$PY" - "$photo" <<'EOF' || { fail_setup "cannot write a test photo (run \`make test-data\`)"; return; }
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

    "$PY" "$root/scripts/reliability/reliability.py" --bin "$BIN" --model-dir "$MODEL_DIR" \
        --photo "$photo" --only "$py_phases" "${args[@]+"${args[@]}"}" 2>&1 | tee "$work/phases.log"
    local counts
    counts="$(tail -1 "$work/phases.log" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\1 \2/p')"
    if [ -z "$counts" ]; then
        result FAIL "reliability.py: ran to the end" "no summary line, see $work/phases.log"
        return
    fi
    passed=$((passed + ${counts% *}))
    failed=$((failed + ${counts#* }))
}

# Phase g: scripts/fuzz.sh; exit 2 is a build failure, 1 a crash.
fuzz_phase() {
    local seconds="${FUZZ_SECONDS:-60}" t0=$SECONDS status
    echo
    echo "=== g. cargo fuzz on the image decode path (${seconds} s)"
    FUZZ_SECONDS="$seconds" "$root/scripts/fuzz.sh" 2>&1 | tee "$work/fuzz.log"
    status=${PIPESTATUS[0]}
    local summary
    summary="$(tail -1 "$work/fuzz.log")"
    if [ "$status" -eq 2 ]; then
        result FAIL "fuzz: cargo-fuzz and the decode target build" "see target/fuzz/"
    else
        result PASS "fuzz: cargo-fuzz and the decode target build"
        if [ "$status" -eq 0 ]; then
            result PASS "fuzz: no crash in ${seconds} s" "${summary#fuzz: decode passed: }"
        else
            result FAIL "fuzz: no crash in ${seconds} s" "input in fuzz/artifacts/decode/, see $work/fuzz.log"
        fi
    fi
    echo "      fuzz took $((SECONDS - t0)) s"
}

[ -n "$py_phases" ] && python_phases
[ "$run_fuzz" -eq 1 ] && fuzz_phase
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
