#!/usr/bin/env bash
# The build tools beyond cargo and a C compiler: cmake and nasm, which build libjpeg-turbo
# (linked statically, for scaled JPEG decoding). Installs them from Debian's packages when run
# as root; otherwise says what to install.
set -euo pipefail
missing=()
for tool in cmake nasm; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing build tools: ${missing[*]} (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "installing ${missing[*]} (Debian packages)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
