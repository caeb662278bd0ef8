#!/usr/bin/env bash
# Set up everything pytest-nestedkvm needs on Debian/Ubuntu, idempotently:
# the system packages (QEMU, a kernel with modules, static busybox) and the
# Python package with its test and lint tools in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# openssh-server: the built-in guest runs the host's sshd binary (the host's own service is not started).
packages=(qemu-system-x86 qemu-utils busybox-static linux-image-amd64 openssh-server python3-venv)
# Tests only: tests/images.py builds a Debian disk image (debootstrap, mkfs.ext4 -d, GRUB for BIOS).
packages+=(debootstrap debian-archive-keyring e2fsprogs grub-pc-bin)
# Tests only: isoinfo reads back the cloud-init seed ISO the plugin writes.
packages+=(genisoimage)
# Example suite libvirt: the daemon, its QEMU driver and virsh, which guests see through /usr. Not
# libvirt-daemon-system: no service, account or default network is set up on this machine.
packages+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -qq
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Installing openssh-server would start sshd on every address of this machine: we only need
    # the binary. policy-rc.d answering 101 tells the package scripts to start no service.
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lint]'
echo "bootstrap: ready ($(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1))"
