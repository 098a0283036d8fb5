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
#
# CARGO_SEED (auto, 0): the host's release build of the dependencies (target/release, from
# `cargo build --release`) is handed to the images' build stage as a warm cargo target folder,
# docker/cargo-seed/release (hard links, removed afterwards; see docker/cargo-seed/README), so
# that the images compile only the crates whose build differs there. auto: when this machine
# runs the build stage's Debian release (bookworm) and target/release holds a build.
# STAGES_ONLY=1: only the stages before the Rust build (torch, the model repository, libtorch:
# `docker build --target libtorch`, untagged), which need no host build: `make prepare` builds
# them while the host compiles, and the images themselves after.
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
seed="docker/cargo-seed/release" seed_tools="docker/cargo-seed/tools"
cleanup() {
    [ -n "$created_ca" ] && rm -f "$created_ca"
    rm -rf "$seed" "$seed_tools"
}
trap cleanup EXIT
if ! compgen -G "certs/*.crt" >/dev/null && [ -f "$HOST_CA" ]; then
    created_ca="certs/extra-ca.crt"
    cp "$HOST_CA" "$created_ca"
fi
vcs_ref="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# The seed: every dependency's library, build-script output and fingerprint from target/release
# that the release binary was linked from (none newer than target/release/tch-serve: the test
# build's dev-dependencies, compiled later, would change the seed and with it every layer after
# it), not tch-serve's own (the image compiles its sources anyway), nor the test binaries; and
# the host's cargo-sbom, as docker/cargo-seed/tools/cargo-sbom.
same_debian() { [ "$(. /etc/os-release 2>/dev/null && echo "${ID:-}-${VERSION_CODENAME:-}")" = debian-bookworm ]; }
make_seed() {
    local from=target/release dir
    rm -rf "$seed"
    mkdir -p "$seed/deps" "$seed/build" "$seed/.fingerprint" || return 1
    for dir in .fingerprint build; do
        find "$from/$dir" -mindepth 1 -maxdepth 1 ! -name 'tch-serve-*' ! -newer "$from/tch-serve" -print0 |
            xargs -0 -r cp -al -t "$seed/$dir" || return 1
    done
    find "$from/deps" -maxdepth 1 -type f ! -name '*tch_serve*' ! -newer "$from/tch-serve" \
        \( -name 'lib*.rlib' -o -name 'lib*.rmeta' -o -name 'lib*.so' -o -name '*.d' \) -print0 |
        xargs -0 -r cp -l -t "$seed/deps" || return 1
    echo "cargo seed: $(find "$seed/deps" -name '*.rlib' | wc -l) crates from $from ($(du -sh "$seed" | cut -f1))"
    # The host's cargo-sbom (make sbom builds it), which the image takes when it is the version
    # the Dockerfile pins.
    rm -rf "$seed_tools"
    if [ -x target/tools/bin/cargo-sbom ]; then
        mkdir -p "$seed_tools" && cp -l target/tools/bin/cargo-sbom "$seed_tools/" &&
            echo "cargo seed: $("$seed_tools/cargo-sbom" --version)"
    fi
}
if [ "${STAGES_ONLY:-0}" != 1 ] && [ "${CARGO_SEED:-auto}" != 0 ]; then
    if ! same_debian; then
        echo "cargo seed: none (this machine is not Debian bookworm, the build stage's release)"
    elif [ ! -f target/release/tch-serve ] || [ ! -d target/release/.fingerprint ]; then
        echo "cargo seed: none (no release build in target/release)"
    elif ! make_seed; then
        rm -rf "$seed" "$seed_tools"
        echo "cargo seed: none (could not hard-link target/release into $seed)"
    fi
fi
# Cargo's fingerprints name the crates' source paths: a seeded build keeps them where the host has
# them, under its CARGO_HOME.
build_args=(--build-arg "VCS_REF=$vcs_ref")
[ -d "$seed" ] && build_args+=(--build-arg "CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}")

status=0
for kind in "${kinds[@]}"; do
    case "$kind" in
        cpu) tag="${CPU_IMAGE:-tch-serve:cpu}" file=Dockerfile ;;
        gpu) tag="${GPU_IMAGE:-tch-serve:gpu}" file=Dockerfile.gpu
             [ "${SKIP_GPU:-0}" = 1 ] && { echo "SKIP_GPU=1: $tag not built"; continue; } ;;
        *) echo "unknown image kind $kind (cpu, gpu)" >&2; exit 2 ;;
    esac
    what=(-t "$tag") log="build-$kind.log"
    if [ "${STAGES_ONLY:-0}" = 1 ]; then
        what=(--target libtorch) tag="$tag (the stages up to libtorch)" log="build-$kind-stages.log"
    fi
    start=$(date +%s)
    if docker build --network host --force-rm "${build_args[@]}" "${what[@]}" -f "$file" . \
        >"$logs/$log" 2>&1; then
        compiled=$(grep -c ' Compiling' "$logs/$log")
        echo "built $tag in $(( $(date +%s) - start )) s, $compiled crates compiled (log: target/test-logs/images/$log)"
    else
        tail -30 "$logs/$log" >&2
        echo "docker build of $tag failed (log: target/test-logs/images/$log)" >&2
        status=1
    fi
done
exit "$status"
