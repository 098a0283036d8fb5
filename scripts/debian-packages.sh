#!/usr/bin/env bash
# Debian's packages the build and the suites use, installed in one go before `make test` runs
# its preparations side by side (apt takes one lock: two installs at once would fail):
#
#   scripts/debian-packages.sh PACKAGE...
#
# Installs those not installed yet, as root; otherwise names them and leaves each to the script
# that needs it (scripts/build-tools.sh, scripts/docker-bases.sh, scripts/k8s-tools.sh, the
# reliability tests), which installs it or says how. Needs Debian's archive.
set -uo pipefail

missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: Debian packages left to the steps that need them: ${missing[*]}"
    exit 0
fi
echo "installing ${missing[*]} (Debian packages)"
apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
