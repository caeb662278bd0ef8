#!/usr/bin/env bash
# Set up everything pytest-nestedkvm needs on Debian/Ubuntu, idempotently:
# the system packages (QEMU, a kernel with modules, static busybox) and the
# Python package with its test and lint tools in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 qemu-utils busybox-static linux-image-amd64 python3-venv)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lint]'
echo "bootstrap: ready ($(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1))"
