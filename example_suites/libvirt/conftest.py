"""libvirt inside L1: a running libvirtd and a way to define KVM domains through virsh.

L1's root is writable (its writes stay in L1's memory), so libvirtd runs as it would on a
freshly installed host. The fixture does what Debian's libvirt-daemon-system package scripts
would: the libvirt-qemu account, the log directory, and a qemu.conf that runs QEMU as root
without relabelling files (L1 has no AppArmor, and L1's /usr and /boot are read-only exports).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

import pytest

from pytest_nestedkvm import Guest

INSTALL = "apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"
QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n'
             'stdio_handler = "file"\n')  # QEMU's output to a file, not through virtlogd
START_LIBVIRTD = f"""
set -e
pidof libvirtd >/dev/null && exit 0
grep -q '^libvirt-qemu:' /etc/passwd ||
  echo 'libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin' >> /etc/passwd
grep -q '^libvirt-qemu:' /etc/group || echo 'libvirt-qemu:x:64055:' >> /etc/group
mkdir -p /etc/libvirt /var/log/libvirt
printf '%s' {shlex.quote(QEMU_CONF)} > /etc/libvirt/qemu.conf
libvirtd --daemon
"""
@pytest.fixture
def virsh(l1: Guest) -> Callable[[str], str]:
    """`virsh("start NAME")`: runs virsh against L1's libvirtd (started on first use) and returns its output."""
    if l1.run("command -v libvirtd && command -v virsh").exit_status != 0:
        pytest.skip(f"libvirt is not installed on L0, which L1 shares: {INSTALL}")
    l1.succeed(START_LIBVIRTD)
    # libvirtd answers once its drivers are up (under TCG that takes a few seconds).
    l1.wait_until_succeeds("virsh -c qemu:///system version", timeout=60)

    def run(arguments: str) -> str:
        return l1.succeed(f"virsh -c qemu:///system {arguments}", timeout=120)

    return run
