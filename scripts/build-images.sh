#!/usr/bin/env bash
# Builds the images from this checkout, as the container tests use them
# (tests/containers/conftest.py runs this for each image; `make images` for both):
#
#   scripts/build-images.sh [cpu] [gpu]     # both by default; SKIP_GPU=1 leaves the GPU one out
#
# First the Docker engine and the local base images (scripts/docker-bases.sh); then, when
# certs/ holds no *.crt, the host's CA bundle (HOST_CA, /etc/ssl/certs/ca-certificates.crt) as
# certs/extra-ca.crt for pip and cargo behind TLS inspection (removed afterwards); then
#
#   docker build --network host --force-rm --build-arg VCS_REF=<git short SHA> -t TAG -f FILE .
#
# for tch-serve:cpu (Dockerfile) and tch-serve:gpu (Dockerfile.gpu), or CPU_IMAGE and GPU_IMAGE.
# A second run with nothing changed takes each image from Docker's layer cache in a second or
# two. Logs: target/test-logs/images/build-<kind>.log; the time each build took is printed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
logs="$root/target/test-logs/images"
mkdir -p "$logs"

kinds=("$@")
[ "${#kinds[@]}" -gt 0 ] || kinds=(cpu gpu)

"$root/scripts/docker-bases.sh" >"$logs/docker-bases.log" 2>&1 ||
    { tail -30 "$logs/docker-bases.log" >&2; echo "scripts/docker-bases.sh failed (log: $logs/docker-bases.log)" >&2; exit 1; }

created_ca=""
cleanup() { [ -n "$created_ca" ] && rm -f "$created_ca"; }
trap cleanup EXIT
if ! compgen -G "certs/*.crt" >/dev/null && [ -f "$HOST_CA" ]; then
    created_ca="certs/extra-ca.crt"
    cp "$HOST_CA" "$created_ca"
fi
vcs_ref="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

status=0
for kind in "${kinds[@]}"; do
    case "$kind" in
        cpu) tag="${CPU_IMAGE:-tch-serve:cpu}" file=Dockerfile ;;
        gpu) tag="${GPU_IMAGE:-tch-serve:gpu}" file=Dockerfile.gpu
             [ "${SKIP_GPU:-0}" = 1 ] && { echo "SKIP_GPU=1: $tag not built"; continue; } ;;
        *) echo "unknown image kind $kind (cpu, gpu)" >&2; exit 2 ;;
    esac
    start=$(date +%s)
    if docker build --network host --force-rm --build-arg "VCS_REF=$vcs_ref" -t "$tag" -f "$file" . \
        >"$logs/build-$kind.log" 2>&1; then
        echo "built $tag in $(( $(date +%s) - start )) s (log: target/test-logs/images/build-$kind.log)"
    else
        tail -30 "$logs/build-$kind.log" >&2
        echo "docker build of $tag failed (log: target/test-logs/images/build-$kind.log)" >&2
        status=1
    fi
done
exit "$status"
