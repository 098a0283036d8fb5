#!/usr/bin/env bash
# The Open Inference Protocol (KServe v2) with the ecosystem's own clients, against the release
# binary on the real models:
#
#   scripts/protocol-test.sh
#   scripts/protocol-test.sh --setup-only     # step 1 alone (make prepare)
#
#   1. venvs: .venv-tritonclient (tritonclient[http,grpc], tests/protocol/requirements-tritonclient.txt)
#      and .venv-kserve (KServe's SDK, heavy, tests/protocol/requirements-kserve.txt), each made and
#      filled when missing or when its requirements file changed; NVIDIA's perf_analyzer in
#      .venv-perf (bench/perf-analyzer.sh);
#   2. pytest tests/protocol/test_tritonclient.py and test_perf_analyzer.py in the first venv
#      (tritonclient's inference, model repository, configuration and statistics calls;
#      perf_analyzer on both doors), test_kserve.py in the second (answers compared with
#      /predict's for the accuracy photos). In each pytest session a fixture
#      (tests/protocol/conftest.py) starts target/release/tch-serve on the model repository
#      models/ with --enable-model-control, HTTP and gRPC on free ports of 127.0.0.1, waits
#      for /v2/health/ready, and at the end stops it with SIGTERM: an exit status other than 0
#      within its shutdown timeout fails the session.
#
# Each pytest session ends with its own summary, and writes its JUnit report to
# target/test-reports/protocol.<name>.xml; the exit status is non-zero when either failed. Logs
# go to target/protocol-test/. Needs `make build model test-data`; PyPI for the venvs.
#
# Environment: BIN (target/release/tch-serve), MODELS (models), PHOTOS
# (target/test-data/accuracy), PYTHON (python3, to make the venvs).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

BIN="${BIN:-$root/target/release/tch-serve}"
MODELS="${MODELS:-$root/models}"
PHOTOS="${PHOTOS:-$root/target/test-data/accuracy}"
PYTHON="${PYTHON:-python3}"
work="$root/target/protocol-test"
reports="$root/target/test-reports"
mkdir -p "$work" "$reports"

fail_setup() { echo "setup: $*" >&2; exit 1; }

# venv NAME REQUIREMENTS: made and filled when missing or when the requirements changed.
venv() {
    local dir="$root/$1" req="$root/$2"
    if [ -x "$dir/bin/python" ] && cmp -s "$req" "$dir/.requirements"; then
        return 0
    fi
    echo "installing $2 into $1"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir" &&
        "$dir/bin/pip" install --quiet --disable-pip-version-check --progress-bar off -r "$req" \
            >"$work/$1.pip.log" 2>&1 &&
        cp "$req" "$dir/.requirements" ||
        { tail -20 "$work/$1.pip.log" >&2; return 1; }
}
start=$SECONDS
venv .venv-tritonclient tests/protocol/requirements-tritonclient.txt || fail_setup "pip install into .venv-tritonclient"
venv .venv-kserve tests/protocol/requirements-kserve.txt || fail_setup "pip install into .venv-kserve"
bench/perf-analyzer.sh >"$work/perf-analyzer.log" 2>&1 || { tail -20 "$work/perf-analyzer.log" >&2; fail_setup "bench/perf-analyzer.sh"; }
echo "venvs ready in $((SECONDS - start)) s"
[ "${1:-}" = --setup-only ] && exit 0

[ -x "$BIN" ] || fail_setup "$BIN is missing: run \`make build\`"
[ -f "$MODELS/efficientnet_lite0/model.pt" ] || fail_setup "$MODELS/efficientnet_lite0/model.pt is missing: run \`make model\`"
[ -f "$PHOTOS/chelsea.jpg" ] || fail_setup "$PHOTOS has no photos: run \`make test-data\`"

export TCH_SERVE_BIN="$BIN" TCH_SERVE_PHOTOS="$PHOTOS" TCH_SERVE_MODELS="$MODELS"
export TCH_SERVE_PERF_ANALYZER="$root/.venv-perf/bin/perf_analyzer"
unset TCH_SERVE_HTTP TCH_SERVE_GRPC

# run_pytest VENV NAME FILE...: one pytest session (its own server, started and stopped by
# the fixture in tests/protocol/conftest.py), its JUnit report in target/test-reports/.
status=0
run_pytest() {
    local venv=$1 name=$2
    shift 2
    echo
    echo "=== $* ($venv)"
    "$root/$venv/bin/python" -m pytest --junitxml "$reports/protocol.$name.xml" \
        -o junit_suite_name="protocol.$name" "$@" || status=1
}
run_pytest .venv-tritonclient tritonclient tests/protocol/test_tritonclient.py tests/protocol/test_perf_analyzer.py
run_pytest .venv-kserve kserve tests/protocol/test_kserve.py

echo
echo "took $((SECONDS - start)) s"
exit "$status"
