#!/usr/bin/env bash
# Make sure a Docker engine is running and that the base images the project's
# Dockerfiles start FROM exist locally. Idempotent: an engine that answers and
# images that exist are left alone (FORCE=1 rebuilds the images).
#
# Why: the build machines reach Debian's archive and the language package
# registries (PyPI, crates.io, npm) but no container image registry. So the
# images named by the Dockerfiles are made here, under the official names, so
# that the same Dockerfiles build unchanged on a machine that can pull them:
#
#   debian:bookworm-slim       debootstrap --variant=minbase from the Debian
#                              mirror apt uses, trimmed, then `docker import`.
#   python:3.11-slim-bookworm  that base + Debian's python3 (3.11) and venv.
#   rust:1-slim-bookworm       that base + gcc/libc6-dev + the Rust toolchain
#                              of this machine (see below).
#   prom/prometheus            that base + Debian's prometheus package, with
#                              the official image's entrypoint, user and paths.
#
# The Rust toolchain: Debian bookworm's rustc is 1.63 (rustc-web is 1.85) and
# the locked dependencies need Rust >= 1.89, and rustup cannot download from
# inside a build here. The toolchain rustup already installed on the host
# (`rustc --print sysroot`) is self-contained (rustup builds it against glibc
# 2.17), so its compiler parts (cargo, rustc, rustdoc, the libraries and the
# x86_64 std; no docs, no rust-src: about 570 MB) are staged as the build
# context of docker/bases/rust.Dockerfile. Override the source with
# RUST_TOOLCHAIN_DIR=/path/to/toolchain.
#
# Environment knobs:
#   FORCE=1                rebuild the base images even if they exist
#   DEBIAN_MIRROR=URL      Debian mirror (default: the one apt uses here)
#   DEBIAN_SECURITY_MIRROR=URL
#   RUST_TOOLCHAIN_DIR=DIR Rust toolchain to copy (default: rustc's sysroot)
#   MIN_RUST_VERSION=1.89  refuse an older toolchain
#   DOCKERD_LOG=FILE       where a dockerd started here logs
#                          (default /var/log/dockerd.log)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
bases="$root/docker/bases"

FORCE="${FORCE:-0}"
MIN_RUST_VERSION="${MIN_RUST_VERSION:-1.89}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
SUITE=bookworm

# Temporary directories, removed when the script exits however it exits.
TMP_DIRS=()
cleanup() { local d; for d in "${TMP_DIRS[@]}"; do as_root rm -rf "$d" "$d.log"; done; }
trap cleanup EXIT

log() { printf '[docker-bases] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ---------------------------------------------------------------- engine ---
ensure_engine() {
  if docker info >/dev/null 2>&1; then
    log "docker engine: running ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
    return
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing Debian's docker.io engine"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  if ! pgrep -x dockerd >/dev/null 2>&1; then
    log "starting dockerd (log: $DOCKERD_LOG)"
    as_root mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid: the daemon outlives this script and the shell that ran it.
    as_root setsid sh -c "exec dockerd >>'$DOCKERD_LOG' 2>&1" </dev/null &
  fi
  for _ in $(seq 1 90); do
    if docker info >/dev/null 2>&1; then
      log "docker engine: up ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
      return
    fi
    sleep 1
  done
  tail -n 30 "$DOCKERD_LOG" >&2 || true
  die "dockerd did not answer within 90 s"
}

have_image() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

# Every http(s) URI apt uses (deb822 .sources and one-line .list files);
# pick_uri REGEX [EXCLUDE]: the first one matching REGEX and not EXCLUDE.
apt_uri() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n'
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' "$f"
  done
} 2>/dev/null
pick_uri() { apt_uri | grep -E "$1" | grep -vE "${2:-^$}" | head -n1; }

# ---------------------------------------------------------- debian base ---
build_debian() {
  local tag=debian:${SUITE}-slim
  if have_image "$tag"; then log "$tag: present"; return; fi
  command -v debootstrap >/dev/null 2>&1 || {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  local mirror security dir
  mirror="${DEBIAN_MIRROR:-$(pick_uri '/debian/?$' 'security')}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  security="${DEBIAN_SECURITY_MIRROR:-$(pick_uri 'debian-security/?$')}"
  security="${security:-http://deb.debian.org/debian-security}"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/debootstrap-${SUITE}.XXXXXX")"
  TMP_DIRS+=("$dir")
  log "$tag: debootstrap --variant=minbase $SUITE from $mirror"
  as_root debootstrap --variant=minbase "$SUITE" "$dir" "$mirror" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log" >&2; die "debootstrap failed"; }
  rm -f "$dir.log"

  # Like the official slim image: later package installs skip docs, man
  # pages and translations (copyright files stay), apt keeps no caches.
  as_root sh -s "$dir" "$mirror" "$security" "$SUITE" <<'EOF'
set -e
d=$1 mirror=$2 security=$3 suite=$4
cat >"$d/etc/dpkg/dpkg.cfg.d/docker-slim" <<'X'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
X
cat >"$d/etc/apt/apt.conf.d/docker-clean" <<'X'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
X
echo 'Acquire::Languages "none";' >"$d/etc/apt/apt.conf.d/docker-no-languages"
# No init system in a container: package scripts must not try to start services.
printf '#!/bin/sh\nexit 101\n' >"$d/usr/sbin/policy-rc.d"
chmod 0755 "$d/usr/sbin/policy-rc.d"
rm -f "$d/etc/apt/sources.list"
cat >"$d/etc/apt/sources.list.d/debian.sources" <<X
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
X
find "$d/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$d/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$d/usr/share/man/"* "$d/usr/share/info/"* "$d/usr/share/lintian" "$d/usr/share/linda"
find "$d/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$d/var/lib/apt/lists/"* "$d/var/cache/apt/"*.bin "$d/var/cache/apt/archives/"*.deb \
       "$d/var/cache/debconf/"*-old "$d/var/lib/dpkg/"*-old "$d/var/log/"*.log "$d/var/log/apt/"* \
       "$d/tmp/"* "$d/root/.bash_history" "$d/etc/machine-id" "$d/etc/hostname"
touch "$d/etc/machine-id"
EOF
  as_root tar --numeric-owner -C "$dir" -c . \
    | docker import \
        --change 'CMD ["bash"]' \
        --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase, built locally by scripts/docker-bases.sh\"" \
        - "$tag" >/dev/null
  log "$tag: imported ($(image_size "$tag"))"
}

# docker build, quiet unless it fails (then the tail of its output).
dbuild() {
  local out
  out="$(mktemp "${TMPDIR:-/tmp}/docker-build.XXXXXX")"
  if docker build --network host --force-rm "$@" >"$out" 2>&1; then
    rm -f "$out"
  else
    tail -n 40 "$out" >&2; rm -f "$out"; die "docker build $* failed"
  fi
}

image_size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

# --------------------------------------------------------- python base ----
build_python() {
  local tag=python:3.11-slim-${SUITE}
  if have_image "$tag"; then log "$tag: present"; return; fi
  log "$tag: building from docker/bases/python.Dockerfile"
  dbuild -t "$tag" -f "$bases/python.Dockerfile" "$bases" >/dev/null
  log "$tag: built ($(image_size "$tag"))"
}

# ------------------------------------------------------------ rust base ---
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

build_rust() {
  local tag=rust:1-slim-${SUITE}
  if have_image "$tag"; then log "$tag: present"; return; fi
  local tc="${RUST_TOOLCHAIN_DIR:-}"
  if [ -z "$tc" ]; then
    command -v rustc >/dev/null 2>&1 \
      || die "$tag needs a Rust toolchain on this machine (rustc not found; set RUST_TOOLCHAIN_DIR)"
    tc="$(cd "$root" && rustc --print sysroot)"
  fi
  [ -x "$tc/bin/rustc" ] && [ -x "$tc/bin/cargo" ] \
    || die "$tc is not a Rust toolchain with bin/rustc and bin/cargo"
  local ver
  ver="$("$tc/bin/rustc" --version | awk '{print $2}')"
  version_ge "$ver" "$MIN_RUST_VERSION" \
    || die "toolchain $tc is Rust $ver; the locked dependencies need >= $MIN_RUST_VERSION"

  local ctx
  ctx="$(mktemp -d "${TMPDIR:-/tmp}/rust-toolchain-ctx.XXXXXX")"
  TMP_DIRS+=("$ctx")
  mkdir -p "$ctx/toolchain/bin" "$ctx/toolchain/lib"
  # Hard links where the toolchain is on the same file system (instant), else a copy.
  local cp_="cp -al"
  $cp_ "$tc/bin/rustc" "$ctx/toolchain/bin/" 2>/dev/null || cp_="cp -a"
  $cp_ -f "$tc/bin/rustc" "$tc/bin/cargo" "$ctx/toolchain/bin/"
  [ -x "$tc/bin/rustdoc" ] && $cp_ "$tc/bin/rustdoc" "$ctx/toolchain/bin/"
  $cp_ "$tc/lib/." "$ctx/toolchain/lib/"
  rm -rf "$ctx/toolchain/lib/rustlib/src" "$ctx/toolchain/lib/rustlib/etc"
  cp "$bases/rust.Dockerfile" "$ctx/Dockerfile"
  log "$tag: building from docker/bases/rust.Dockerfile with Rust $ver ($(du -sh "$ctx" | cut -f1) context from $tc)"
  dbuild --build-arg "RUST_VERSION=$ver" -t "$tag" "$ctx" >/dev/null
  log "$tag: built ($(image_size "$tag"))"
}

# ------------------------------------------------------ prometheus base ---
build_prometheus() {
  local tag=prom/prometheus
  if have_image "$tag"; then log "$tag: present"; return; fi
  log "$tag: building from docker/bases/prometheus.Dockerfile (Debian's prometheus)"
  dbuild -t "$tag" -f "$bases/prometheus.Dockerfile" "$bases" >/dev/null
  log "$tag: built ($(image_size "$tag"), $(docker run --rm "$tag" --version 2>&1 | head -n1))"
}

main() {
  ensure_engine
  build_debian
  # Everything below starts FROM the Debian base: rebuild it if that was rebuilt.
  build_python
  build_rust
  build_prometheus
}

main "$@"
