"""What to boot (GuestSpec) and the exact QEMU command line for it (pure, no I/O).

`build_argv` is the only place a QEMU command line is assembled; a user can print
`shlex.join(argv)` to reproduce a guest by hand.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ..base.host import QEMU_SANDBOX, Accel
from .layout import (
    CHANNEL_NEEDS,
    CONSOLE,
    EXPORT_TAG,
    PORT_DIR,
    QMP,
    ROLES,
    SERIAL,
    SHELL_PORTS,
    TMPFS_DIRS,
    ChannelKind,
    Role,
)
from .view import Export, View
from .xen import Hypervisor, XenBoot, check_dom0_cmdline, domain_name, domu_argv

# Kernel arguments of the built-in guest. panic=-1 + -no-reboot: a panic ends QEMU.
# The i8042 ones skip probing a keyboard controller nobody uses; pci=noearly skips the
# early scans of PCI config space (AGP aperture, quirks): each read is a VM exit, and
# nested that cost 2 x 2.3 s of L2 boot.
SERIAL_CONSOLE = "console=ttyS0"
XEN_CONSOLE = "console=hvc0"  # a dom0 writes its console through Xen, which owns the serial port
BASE_APPEND = (
    f"{SERIAL_CONSOLE} panic=-1 rdinit=/init mitigations=off "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 cryptomgr.notests pci=noearly"
)
DOM0_APPEND = BASE_APPEND.replace(SERIAL_CONSOLE, XEN_CONSOLE)
QBOOT = Path("/usr/share/qemu/qboot.rom")
# The guest's network: QEMU's user stack, cut off from the outside (restrict=on), with
# the guest's sshd forwarded from a port of the parent's 127.0.0.1 that the kernel picks
# at bind time (port 0: no race; qmp.py reads it back).
SSH_GUEST_PORT = 22
USER_NIC = f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:0-:{SSH_GUEST_PORT}"


DiskFormat = Literal["qcow2", "raw"]


@dataclass(frozen=True)
class Disk:
    """A disk for a guest, always attached with -snapshot, its format named (never probed)."""

    path: Path
    format: DiskFormat = "raw"


@dataclass(frozen=True)
class GuestSpec:
    """Everything that decides what a guest is; two equal specs boot the same guest."""

    level: int
    qemu: str
    accel: Accel
    cpu: str
    memory_mib: int
    smp: int
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    view: View | None = None  # what the built-in guest sees of its host (view.py), each part read-only over 9p
    share_root: Path | None = None  # deprecated (0.1): exported whole as the guest's root; use `view`
    disks: tuple[Disk, ...] = ()
    firmware: Path | None = None
    deepest: int = 1  # the deepest level of the chain: this QEMU carries the streams of levels below
    # How commands reach the guest: "agent" (the built-in guest's shells on virtio ports),
    # "ssh" (a disk image's sshd, key from a cloud-init seed), "serial" (a login on the console).
    channel: ChannelKind = "agent"
    login: tuple[str, str] | None = None  # user, password for the "serial" channel
    # -sandbox QEMU_SANDBOX (seccomp): set for L1, whose QEMU runs on the host. Deeper QEMUs run
    # inside their parent guest, whose kernel (maybe the user's) may lack seccomp.
    sandbox: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # Files the plugin copies into the parent before this QEMU starts there, (path on L0, path in the
    # parent): the boot files of a built-in guest whose parent is a disk image (which sees nothing of L0).
    uploads: tuple[tuple[Path, str], ...] = ()
    # L1 only: boot Xen, with this guest's kernel and initramfs as dom0 (multiboot modules).
    xen: XenBoot | None = None
    # L2 in a Xen L1: an HVM domU that `xl create` starts in dom0 (xen.domu_argv); its device model,
    # a QEMU too, carries the same ports and exports. `kernel` is then a bzImage, `cpu` xl's cpuid=.
    domu: bool = False

    @property
    def name(self) -> str:
        return f"l{self.level}"

    @property
    def runs_as(self) -> str:
        """How this guest is virtualized, for progress lines: `tcg, -cpu max`."""
        return f"a Xen HVM domU, cpuid {self.cpu}" if self.domu else f"{self.accel}, -cpu {self.cpu}"

    @property
    def hypervisor(self) -> Hypervisor:
        """What this guest hosts its own guests with."""
        return "kvm" if self.xen is None else "xen"

    @property
    def exports(self) -> tuple[Export, ...]:
        """The host directories this guest gets, each a read-only 9p export."""
        if self.share_root is not None:
            return (Export(self.share_root, Path("/")),)
        return () if self.view is None else self.view.exports

    def view_args(self) -> list[str]:
        """Kernel arguments that tell the built-in guest's init what to mount where, in order
        (shallower paths first, so a share under /tmp lands on the guest's tmpfs and a tmpfs
        under a shared /var covers it), and which links to make in its root."""
        mounts = [(e.target, f"{EXPORT_TAG}{index}") for index, e in enumerate(self.exports)]
        view = self.view if self.share_root is None else None  # a whole-root export has its own links
        mounts += [(Path(d), "tmpfs") for d in TMPFS_DIRS] + [(d, "tmpfs") for d in (view.tmpfs if view else ())]
        mounts.sort(key=lambda mount: len(mount[0].parts))
        links = view.links if view else ()
        return [*(f"nestedkvm.mount={tag}:{path}" for path, tag in mounts),
                *(f"nestedkvm.link={path}:{target}" for path, target in links)]


@dataclass(frozen=True)
class RunPaths:
    """Where L0 keeps one guest's sockets and console log (in a private 0700 directory).

    The same layout serves every level: L1's QEMU creates the sockets of L2 and
    deeper too, since their channels pass through L1's virtio ports (see HostEnds).
    """

    run_dir: Path

    def end(self, role: Role) -> Path:
        return self.run_dir / f"{role}.sock"

    @property
    def serial(self) -> Path:
        return self.end(SERIAL)

    @property
    def qmp(self) -> Path:
        return self.end(QMP)

    @property
    def console(self) -> Path:
        """The console log, written by the plugin from the console socket (bounded, see console.py)."""
        return self.run_dir / "console.log"


def passthrough_port(level: int, role: Role) -> str:
    """Name of the virtio port that carries `role` of a deeper guest at `level` through its parents."""
    return f"nestedkvm.l{level}.{role}"


class Ends(Protocol):
    def chardev(self, level: int, role: Role) -> str:
        """The -chardev backend (without id) where `role` of the guest at `level` ends."""


@dataclass(frozen=True)
class HostEnds:
    """For L1's QEMU: every stream ends on L0 as a unix socket in the level's run directory."""

    run_root: Path

    def paths(self, level: int) -> RunPaths:
        return RunPaths(self.run_root / f"l{level}")

    def chardev(self, level: int, role: Role) -> str:
        paths = self.paths(level)
        if role == CONSOLE:  # L1's QEMU waits for the plugin's console reader: no boot line is lost
            return f"socket,path={paths.end(role)},server=on,wait={'on' if level == 1 else 'off'}"
        if role == SERIAL:  # a console to log in on: a socket, and everything it prints still logged
            return f"socket,path={paths.serial},server=on,wait=off,logfile={paths.console}"
        return f"socket,path={paths.end(role)},server=on,wait=off"


@dataclass(frozen=True)
class ParentEnds:
    """For QEMU inside a guest: every stream ends on the parent's pass-through virtio port.

    A `pipe` chardev opens the port device read-write: no relay process in the parent.
    """

    def chardev(self, level: int, role: Role) -> str:
        return f"pipe,path={PORT_DIR}/port.{passthrough_port(level, role)}"


def boot_loglevel(level: int) -> str:
    """Kernel arguments for console verbosity while booting.

    Nested, every byte written to the serial port is a VM exit that L1's emulated
    KVM and QEMU handle one at a time (a full boot log cost L2 ~25 s). Deeper
    levels therefore print only warnings and worse while booting (panics, oopses and
    WARNs still show); dmesg has everything, and the init restores full verbosity.
    """
    return "" if level == 1 else "loglevel=5"


def accel_args(accel: str, smp: int) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm"]
    # Multi-threaded TCG lets each vCPU use its own host core.
    return ["-accel", "tcg,thread=multi" if smp > 1 else "tcg"]


def build_argv(spec: GuestSpec, ends: Ends) -> list[str]:
    """The command that runs `spec`'s guest: its QEMU, or for a domU the `xl create` of it."""
    ports = _ports(spec)
    append = _append(spec, len(ports))
    if spec.domu:
        assert spec.kernel is not None
        return domu_argv(spec.name, spec.memory_mib, spec.smp, spec.cpu, (spec.kernel, spec.initrd, append),
                         [*device_args(spec, ends, ports), *spec.extra_args])
    argv = [spec.qemu, "-name", domain_name(spec.name), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-action", "panic=exit-failure",
            "-machine", "q35", *accel_args(spec.accel, spec.smp), "-cpu", spec.cpu,
            "-m", str(spec.memory_mib), "-smp", str(spec.smp)]
    if spec.sandbox:
        argv += ["-sandbox", QEMU_SANDBOX]
    if spec.firmware is not None:
        argv += ["-bios", str(spec.firmware)]
    if spec.kernel is not None:
        argv += kernel_args(spec, append)
    argv += device_args(spec, ends, ports)
    for index, disk in enumerate(spec.disks):
        argv += ["-drive", f"file={disk.path},format={disk.format},if=virtio,index={index},media=disk"]
    argv += ["-device", "pvpanic-pci", "-nic", USER_NIC, "-snapshot", *spec.extra_args]
    return argv


Port = tuple[int, Role, str]  # the level whose stream it carries, the role, the port's name


def _ports(spec: GuestSpec) -> list[Port]:
    """The virtio ports of `spec`'s guest: the built-in init's shells, and the streams of every
    deeper level (a disk image carries them too)."""
    ports = ([(spec.level, role, name) for role, name in SHELL_PORTS.items()]
             if CHANNEL_NEEDS[spec.channel].agent_ports else [])
    return ports + [(level, role, passthrough_port(level, role))
                    for level in range(spec.level + 1, spec.deepest + 1) for role in ROLES]


def _append(spec: GuestSpec, ports: int) -> str:
    """The built-in guest's kernel command line."""
    base = BASE_APPEND if spec.xen is None else DOM0_APPEND
    return " ".join(filter(None, (base, boot_loglevel(spec.level), f"nestedkvm.ports={ports}",
                                  *spec.view_args(), spec.append)))


def device_args(spec: GuestSpec, ends: Ends, ports: list[Port]) -> list[str]:
    """The guest's devices that a KVM guest's QEMU and a domU's device model share: console, QMP,
    virtio ports and 9p exports (not the network: Debian's qemu-system-xen has no user networking)."""
    kind = CHANNEL_NEEDS[spec.channel]
    argv = ["-chardev", f"{ends.chardev(spec.level, kind.console_role)},id=console", "-serial", "chardev:console",
            "-chardev", f"{ends.chardev(spec.level, 'qmp')},id=qmp", "-mon", "chardev=qmp,mode=control"]
    # A virtio-serial controller per level: QEMU announces each port with three control messages
    # (add, name, open) and drops any that finds none of the guest's 32 buffers free; with 16
    # ports on one controller, the last port never opened on the host side.
    for index, (level, role, name) in enumerate(ports):
        if index == 0 or ports[index - 1][0] != level:
            argv += ["-device", f"virtio-serial-pci,id=vser{level}"]
        argv += ["-chardev", f"{ends.chardev(level, role)},id=port{index}",
                 "-device", f"virtserialport,bus=vser{level}.0,chardev=port{index},name={name}"]
    # multidevs=forbid on L0: a filesystem mounted below a host directory (a procfs a chroot
    # build left there) is not served; the guest gets an error for it. Inside a guest the
    # mounts below an export are the plugin's own (the modules tmpfs under /usr), and what a
    # guest shows the guest it runs is its own to show: remap, so they are served.
    multidevs = "forbid" if spec.level == 1 else "remap"
    for index, export in enumerate(spec.exports):
        argv += ["-fsdev", f"local,id=fs{index},path={export.source},security_model=none,readonly=on,"
                 f"multidevs={multidevs}",
                 "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={EXPORT_TAG}{index}"]
    return argv


def kernel_args(spec: GuestSpec, append: str) -> list[str]:
    """-kernel, -initrd and -append: the guest's kernel, or Xen with the kernel and the initramfs
    as multiboot modules (QEMU takes them as "FILE ARGS,FILE"; a comma inside one is doubled).
    Xen loads the uncompressed PVH vmlinux as a PV dom0 too: a Xen L1 answered in 6.6 s with it,
    9.1 s with the bzImage (TCG, 2026-12-05)."""
    assert spec.kernel is not None
    if spec.xen is None:
        initrd = ["-initrd", str(spec.initrd)] if spec.initrd is not None else []
        return ["-kernel", str(spec.kernel), *initrd, "-append", append]
    dom0 = check_dom0_cmdline(f"{append} nestedkvm.xen={spec.xen.tools}")
    modules = [f"{spec.kernel} {dom0}", *([str(spec.initrd)] if spec.initrd is not None else [])]
    return ["-kernel", str(spec.xen.hypervisor), "-append", spec.xen.args,
            "-initrd", ",".join(module.replace(",", ",,") for module in modules)]


def shell_line(argv: list[str]) -> str:
    """The argv as one line a developer can paste into a shell."""
    return shlex.join(argv)
