"""What to boot (GuestSpec) and the exact QEMU command line for it (pure, no I/O).

`build_argv` is the only place a QEMU command line is assembled; a user can print
`shlex.join(argv)` to reproduce a guest by hand.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .initramfs import COMMAND_PORT, CONTROL_PORT, ROOT_TAG

# Kernel arguments of the built-in guest. panic=-1 + -no-reboot: a panic ends QEMU.
# The i8042 ones skip probing a keyboard controller nobody uses (seconds under TCG).
BASE_APPEND = (
    "console=ttyS0 panic=-1 rdinit=/init mitigations=off "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 cryptomgr.notests"
)
QBOOT = Path("/usr/share/qemu/qboot.rom")


@dataclass(frozen=True)
class GuestSpec:
    """Everything that decides what a guest is; two equal specs boot the same guest."""

    level: int
    qemu: str
    accel: str  # "kvm" | "tcg"
    cpu: str
    memory_mib: int
    smp: int
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    share_root: Path | None = None  # exported read-only over 9p as the guest's root
    disks: tuple[Path, ...] = ()  # always attached with -snapshot
    firmware: Path | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return f"l{self.level}"


@dataclass(frozen=True)
class RunPaths:
    """Where one running guest keeps its sockets and logs (a private 0700 directory)."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def command(self) -> Path:
        return self.run_dir / "cmd.sock"

    @property
    def control(self) -> Path:
        return self.run_dir / "ctl.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"


def accel_args(accel: str, smp: int) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm"]
    # Multi-threaded TCG lets each vCPU use its own host core.
    return ["-accel", "tcg,thread=multi" if smp > 1 else "tcg"]


def build_argv(spec: GuestSpec, paths: RunPaths) -> list[str]:
    argv = [spec.qemu, "-name", f"nestedkvm-{spec.name}", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-action", "panic=exit-failure",
            "-machine", "q35", *accel_args(spec.accel, spec.smp), "-cpu", spec.cpu,
            "-m", str(spec.memory_mib), "-smp", str(spec.smp)]
    if spec.firmware is not None:
        argv += ["-bios", str(spec.firmware)]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        argv += ["-append", " ".join(filter(None, (BASE_APPEND, spec.append)))]
    argv += ["-chardev", f"file,id=console,path={paths.console}", "-serial", "chardev:console",
             "-chardev", f"socket,id=qmp,path={paths.qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
             "-device", "virtio-serial-pci,id=vser"]
    for chardev, sock, port in (("cmd", paths.command, COMMAND_PORT), ("ctl", paths.control, CONTROL_PORT)):
        argv += ["-chardev", f"socket,id={chardev},path={sock},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser.0,chardev={chardev},name={port}"]
    if spec.share_root is not None:
        argv += ["-fsdev", f"local,id=root,path={spec.share_root},security_model=none,readonly=on,multidevs=remap",
                 "-device", f"virtio-9p-pci,fsdev=root,mount_tag={ROOT_TAG}"]
    for index, disk in enumerate(spec.disks):
        argv += ["-drive", f"file={disk},if=virtio,index={index},media=disk"]
    argv += ["-device", "pvpanic-pci", "-nic", "none", "-snapshot", *spec.extra_args]
    return argv


def shell_line(argv: list[str]) -> str:
    """The argv as one line a developer can paste into a shell."""
    return shlex.join(argv)
