"""A user's disk image as the parent of a built-in guest: what the built-in init does for the guests
inside it, done over the image's own command channel once per boot of the image.

The built-in guest's init loads KVM with nested=1, links its virtio ports under PORT_DIR and sees
the boot files in the exported cache. A disk image has none of that: before the first QEMU
inside it starts, one shell script checks what the plugin cannot bring (root, the image's QEMU,
/dev/kvm: a refusal names the fix and the level is skipped, not failed), loads the KVM module,
links the ports by name as the built-in init does (so the argv, the link and the channel are the
ones of any deeper guest), and copies its /etc without secrets for the guest's view (view.image_view);
the boot files follow over SFTP (GuestSpec.uploads). A 9p export of them would need 9p in the
image's kernel, which cloud kernels (Debian's linux-image-cloud-amd64) leave out.
"""

from __future__ import annotations

import shlex
from typing import Protocol

import paramiko

from ..base.deadline import Deadline
from ..base.errors import HostError, LevelUnavailable
from ..base.host import KVM_MODULE_BY_FLAG
from ..boot.layout import HOSTED_BOOT, HOSTED_ETC, PORT_DIR
from ..boot.qemu import GuestSpec
from ..boot.view import ETC_SECRETS
from . import ssh
from .channel import CommandResult

# Exit statuses of the script for what the plugin cannot fix itself, and what the user does about it.
REFUSALS = {
    90: "L{level} inside the --nested-l1-image needs root there to run QEMU on /dev/kvm and its virtio ports, "
        "and L1's commands run as '{user}': let cloud-init authorize the session key for root",
    91: "the --nested-l1-image has no {qemu} to run L{level} with: install QEMU into the image "
        "(Debian/Ubuntu: apt-get install qemu-system-x86), or name one that is there with --nested-qemu's second entry",
    92: "the --nested-l1-image has no /dev/kvm for L{level}: it needs a kernel with KVM (kvm_amd or kvm_intel, "
        "as modules or built in) and a CPU that shows {flag} (the plugin gives L1 one unless --nested-cpu or a "
        "hook takes it away)",
}


class ImageParent(Protocol):
    """What the setup needs of the image's guest."""

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run `command` in the guest's shell; any exit status."""

    @property
    def ssh(self) -> paramiko.SSHClient:
        """A connected SSH client of the image (its SFTP carries the boot files)."""


def setup_script(spec: GuestSpec) -> str:
    """The shell script that makes the image ready to run `spec`'s QEMU (idempotent)."""
    flags = "|".join(KVM_MODULE_BY_FLAG)
    loads = " ".join(f"{flag}) modprobe {module} nested=1 2>/dev/null ;;" for flag, module in
                     KVM_MODULE_BY_FLAG.items())
    secrets = " ".join(ETC_SECRETS)
    return "\n".join((
        '[ "$(id -u)" = 0 ] || exit 90',
        f"command -v {shlex.quote(spec.qemu)} >/dev/null 2>&1 || exit 91",
        f"flag=$(grep -m1 -w -o -E '{flags}' /proc/cpuinfo)",
        f'[ -c /dev/kvm ] || case "$flag" in {loads} esac',
        "[ -c /dev/kvm ] || exit 92",
        f"mkdir -p {PORT_DIR} {HOSTED_BOOT}",
        "for p in /sys/class/virtio-ports/*; do",
        '  name=; [ -e "$p/name" ] && read -r name < "$p/name"',
        f'  [ -z "$name" ] || ln -sfn "/dev/${{p##*/}}" "{PORT_DIR}/port.$name"',
        "done",
        f"rm -rf {HOSTED_ETC} && cp -a /etc {HOSTED_ETC} && cd {HOSTED_ETC} && rm -rf {secrets} &&",
        # No password in it (sshd in the guest treats an account without a shadow entry as locked).
        "sed 's/:.*/:*:19000:0:99999:7:::/' passwd > shadow && chmod 640 shadow",
    ))


def prepare(parent: ImageParent, spec: GuestSpec, deadline: Deadline) -> None:
    """Make the image `parent` ready to run the built-in guest of `spec`, within `deadline` (that
    guest's boot budget); LevelUnavailable where the image lacks what only its owner can add."""
    done = parent.run(setup_script(spec), timeout=deadline.remaining())
    if done.exit_status in REFUSALS:
        user = parent.run("id -un", timeout=deadline.remaining()).stdout.strip() if done.exit_status == 90 else ""
        flag = "/".join(KVM_MODULE_BY_FLAG)
        raise LevelUnavailable(REFUSALS[done.exit_status].format(level=spec.level, qemu=spec.qemu, user=user,
                                                                  flag=flag), level=spec.level)
    if done.exit_status != 0:
        raise HostError(f"L{spec.level}: preparing L{spec.level - 1} to run it failed "
                        f"(status {done.exit_status}): {done.stderr.strip()[-500:]}")
    for local, remote in spec.uploads:  # within the same budget: L2's boot
        ssh.put(parent.ssh, local, remote, deadline)
