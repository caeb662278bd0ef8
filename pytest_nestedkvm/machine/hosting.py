"""A user's disk image as the parent of a built-in guest: what the built-in init does for the guests
inside it, done over the image's own command channel once per boot of the image.

The built-in guest's init loads KVM with nested=1, links its virtio ports under PORT_DIR and sees
the boot files in the exported cache. A disk image has none of that: before the first QEMU
inside it starts, one shell script checks what the plugin cannot bring (root, the image's QEMU,
/dev/kvm: a refusal names the fix and the level is skipped, not failed), loads the KVM module,
links the ports by name as the built-in init does (so the argv, the link and the channel are the
ones of any deeper guest), and copies its /etc without secrets for the guest's view (view.image_view);
the boot files follow through the virtio port that will carry the guest's QMP (GuestSpec.uploads,
put_through_port). A 9p export of them would need 9p in the image's kernel, which cloud kernels
(Debian's linux-image-cloud-amd64) leave out; SFTP would need SSH, which a --nested-login image
does not give, and was slower.
"""

from __future__ import annotations

import hashlib
import shlex
import threading
from pathlib import Path
from typing import Protocol

from ..base.deadline import MIN_WAIT, SENDER_JOIN, Deadline
from ..base.errors import HostError, LevelUnavailable
from ..base.host import KVM_MODULE_BY_FLAG
from ..boot.layout import HOSTED_BOOT, HOSTED_ETC, PORT_DIR, QMP, Role
from ..boot.qemu import GuestSpec, passthrough_port
from ..boot.view import ETC_SECRETS
from .channel import CommandResult
from .link import Link

# Exit statuses of the script for what the plugin cannot fix itself, and what the user does about it.
REFUSALS = {
    90: "L{level} inside the --nested-l1-image needs root there to run QEMU on /dev/kvm and its virtio ports, "
        "and L1's commands run as '{user}': let cloud-init authorize the session key for root, or log in as root "
        "(--nested-login root:PASSWORD)",
    91: "the --nested-l1-image has no {qemu} to run L{level} with: install QEMU into the image "
        "(Debian/Ubuntu: apt-get install qemu-system-x86), or name one that is there with --nested-qemu's second entry",
    92: "the --nested-l1-image has no /dev/kvm for L{level}: it needs a kernel with KVM (kvm_amd or kvm_intel, "
        "as modules or built in) and a CPU that shows {flag} (the plugin gives L1 one unless --nested-cpu or a "
        "hook takes it away)",
}


# The boot files travel on the port of the guest's QMP: its QEMU is not running yet, and a byte
# that a failed copy left there would reach a QMP monitor that refuses it, never a shell.
UPLOAD_ROLE: Role = QMP


class ImageParent(Protocol):
    """What the setup needs of the image's guest."""

    link: Link  # its QEMU's sockets on L0, the deeper guests' ports among them

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run `command` in the guest's shell; any exit status."""

    def close(self, keep_files: bool = False) -> None:
        """Stop the guest (its next user gets a fresh one)."""


def setup_script(spec: GuestSpec) -> str:
    """The shell script that makes the image ready to run `spec`'s QEMU (idempotent)."""
    flags = "|".join(KVM_MODULE_BY_FLAG)
    modules = " ".join(f"{flag}) m={module} ;;" for flag, module in KVM_MODULE_BY_FLAG.items())
    secrets = " ".join(ETC_SECRETS)
    return "\n".join((
        '[ "$(id -u)" = 0 ] || exit 90',
        f"command -v {shlex.quote(spec.qemu)} >/dev/null 2>&1 || exit 91",
        f"flag=$(grep -m1 -w -o -E '{flags}' /proc/cpuinfo)",
        f'm=; case "$flag" in {modules} esac',
        # Loaded before the kernel refined its TSC rate (udev may, under TCG), the vendor module
        # keeps the first estimate and its guests lose their timers (initramfs.py, tsc_settled):
        # load it again while no VM holds it.
        'r=; [ -n "$m" ] && [ "$(cat /sys/module/$m/refcnt 2>/dev/null)" = 0 ] &&',
        "  dmesg 2>/dev/null | grep -q 'Refined TSC clocksource calibration' && modprobe -r $m 2>/dev/null && r=1",
        '{ [ -n "$r" ] || [ ! -c /dev/kvm ]; } && [ -n "$m" ] && modprobe $m nested=1 2>/dev/null',
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
        put_through_port(parent, spec.level, local, remote, deadline)


def put_through_port(parent: ImageParent, level: int, local: Path, remote: str, deadline: Deadline) -> None:
    """Copy `local` to `remote` in the image through the virtio port of L`level`'s QMP, whose
    socket on L0 is open since the image booted: `head` in the image reads exactly the file's
    size while L0 writes it, then the image checks its SHA-256. Any SSH or serial shell will do.
    A copy that fails may leave bytes in the port, so the image is stopped (booted afresh next)."""
    data = local.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    port, part = f"{PORT_DIR}/port.{passthrough_port(level, UPLOAD_ROLE)}", shlex.quote(f"{remote}.part")
    sock = parent.link.carried(level, UPLOAD_ROLE)
    failed: list[OSError] = []

    def send() -> None:
        try:
            sock.settimeout(max(deadline.remaining(), MIN_WAIT))
            sock.sendall(data)
        except OSError as exc:
            failed.append(exc)

    sender = threading.Thread(target=send, name=f"upload {local.name}", daemon=True)
    sender.start()
    command = (f"head -c {len(data)} {port} > {part} && [ \"$(sha256sum < {part})\" = '{digest}  -' ] "
               f"&& mv {part} {shlex.quote(remote)}")
    done: CommandResult | None = None
    copied = False
    try:
        done = parent.run(command, timeout=deadline.remaining())
    finally:
        sender.join(SENDER_JOIN)  # done once `head` read it all; after a failure it waits for nothing
        sock.settimeout(None)  # blocking again, as the link keeps it
        copied = done is not None and done.exit_status == 0 and not failed and not sender.is_alive()
        if not copied:
            parent.close(keep_files=True)
    if not copied:
        why = failed[0] if failed else done.stderr.strip()[-300:] or f"status {done.exit_status}"
        raise HostError(f"L{level}: copying {local} into L{level - 1} at {remote} failed ({why}); "
                        f"L{level - 1} is stopped, since its port to L{level}'s QMP may hold part of the file")
