"""The plan: settings + host report + the user's guest_spec hooks -> what each level boots, or why not.

Pure: no file is read or written and no process started here. What has to exist on disk
first (kernel, initramfs, cloud-init seeds) comes in as `BootFiles`, made by the session.
Skips are decided here and only here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..base.errors import ConfigError
from ..base.host import Accel, HostReport
from ..boot.layout import CHANNEL_NEEDS, HOSTED_BOOT
from ..boot.qemu import Disk, DiskFormat, GuestSpec
from ..boot.view import View, image_view
from ..boot.xen import XenBoot, dom0_mib
from .settings import Settings

# Every timeout scales the same way: seconds on hardware KVM at L1, times how much slower
# emulation makes that kind of work (L0's accelerator sets the pace of the whole chain: under
# TCG every level is emulated), times the level (each level multiplies the cost again).
BOOT_SECONDS = 30.0  # to a guest's first answer
COMMAND_SECONDS = 60.0  # a guest command's default
# Under TCG: a boot and the plugin's commands are mostly the guest's own code; a suite's test
# (its timeout is set for hardware) makes many more exits, each emulated.
TCG_FACTOR = {"boot": 3, "command": 2, "suite test": 5}
Work = Literal["boot", "command", "suite test"]


def scaled_timeout(seconds: float, pace: Accel, level: int, work: Work = "suite test") -> float:
    """`seconds` on hardware KVM at L1, scaled for the pace and the level."""
    return seconds * (TCG_FACTOR[work] if pace == "tcg" else 1) * level


def timeout_note(seconds: float, pace: Accel, level: int, work: Work = "suite test") -> str:
    """How a timeout was reached, for a report: `90 s x 5 (TCG) x 1 (L1) = 450 s`."""
    factor = TCG_FACTOR[work] if pace == "tcg" else 1
    return (f"{seconds:g} s x {factor} ({pace.upper()}) x {level} (L{level}) = "
            f"{scaled_timeout(seconds, pace, level, work):g} s")

# Where L1 holds an L2 disk image and its seed (its first two virtio disks).
# L1 has decoded the image (format=qcow2 there), so L2's QEMU reads both as raw.
L2_IMAGE_DISKS = (Disk(Path("/dev/vda")), Disk(Path("/dev/vdb")))

GuestSpecHook = Callable[[int, GuestSpec], GuestSpec]


@dataclass(frozen=True)
class BootFiles:
    """What the built-in guest boots from, and the cloud-init seed of each level that needs one."""

    kernel: Path | None  # the file for -kernel (a PVH vmlinux or the bzImage); None: L1 is a disk image
    initrd: Path | None
    firmware: Path | None
    seeds: Mapping[int, Path]
    view: View | None = None  # what the first built-in level sees of its host; each deeper level what its parent sees
    image_formats: Mapping[Path, DiskFormat] = field(default_factory=dict)  # of the user's disk images
    uploads: tuple[tuple[Path, str], ...] = ()  # copied into a --nested-l1-image for L2 (GuestSpec.uploads)
    xen: XenBoot | None = None  # --nested-hypervisor=xen: what L1 boots (its args are the plan's, xen_args)
    bzimage: Path | None = None  # the kernel as a bzImage, for a Xen domU (its QEMU boots no PVH vmlinux)


def in_image(kernel: Path, initrd: Path, firmware: Path | None, seeds: Mapping[int, Path],
             image_formats: Mapping[Path, DiskFormat]) -> BootFiles:
    """The boot files of the built-in guest at L2 inside a --nested-l1-image: the files on L0 are
    copied into the image before L2 starts (the image sees nothing of L0) and booted from there."""
    uploads = tuple((path, f"{HOSTED_BOOT}/{path.name}") for path in (kernel, initrd, firmware) if path is not None)
    inside = {path: Path(there) for path, there in uploads}
    return BootFiles(kernel=inside[kernel], initrd=inside[initrd], firmware=inside.get(firmware) if firmware else None,
                     seeds=seeds, view=image_view(), image_formats=image_formats, uploads=uploads)


def skip_reason(level: int, settings: Settings, report: HostReport) -> str | None:
    """Why a test at `level` cannot run in this session, or None."""
    if level > settings.levels:
        return f"needs L{level}, but this session provides up to L{settings.levels} (run with --nested-levels={level})"
    if report.qemu is None:
        return "QEMU not found: apt-get install qemu-system-x86"
    if level >= 2 and not report.nesting_possible:
        return f"L{level} needs nested virtualization, which this host cannot provide: {report.nesting_fix}"
    if level >= 3 and settings.hypervisor == "xen":
        return (f"L{level} inside a Xen domU is not supported yet: with --nested-hypervisor=xen the session "
                "provides L1 (dom0) and L2 (an HVM domU)")
    if settings.l2_image is not None and level > 2:
        return (f"L{level} inside a --nested-l2-image is not supported yet: the plugin starts deeper levels "
                "inside its built-in guests and inside a --nested-l1-image only")
    return None


def seed_levels(settings: Settings) -> tuple[int, ...]:
    """Levels whose disk image gets the session key through a cloud-init seed."""
    if settings.l1_image is not None:
        return () if settings.login else (1,)
    return (2,) if settings.l2_image is not None and settings.levels >= 2 else ()


def spec_for(level: int, settings: Settings, report: HostReport, files: BootFiles, hook: GuestSpecHook) -> GuestSpec:
    """What to boot at `level`: the built-in guest or a disk image, as the user's guest_spec hooks leave it."""
    spec = hook(level, builtin_spec(level, settings, report, files))
    if not isinstance(spec, GuestSpec) or spec.level != level:
        raise ConfigError(f"pytest_nestedkvm_guest_spec returned {spec!r} for L{level}: return a GuestSpec "
                          f"for level {level} (e.g. dataclasses.replace(spec, ...)) or None")
    return spec


def builtin_spec(level: int, settings: Settings, report: HostReport, files: BootFiles) -> GuestSpec:
    """The guest at `level` before hooks. L1 gets the host plan (accelerator, CPU model); deeper
    levels always run on their parent's KVM, with -cpu host unless --nested-l2-cpu says otherwise."""
    assert report.qemu is not None
    # --nested-qemu; else L0's on PATH, at the same path inside built-in guests; inside a disk image its own
    chosen = settings.qemu_for(level)
    default = f"qemu-system-{report.arch}" if settings.l1_image is not None and level >= 2 else report.qemu.binary
    common = GuestSpec(
        level=level, qemu=default if chosen is None else str(chosen.binary),
        accel=report.accel if level == 1 else "kvm",
        cpu=settings.cpu_for(level, report.cpu), memory_mib=settings.memory_for(level),
        smp=settings.smp_for(level, emulated=report.pace == "tcg"),
        extra_args=settings.qemu_args_for(level), sandbox=level == 1 and report.qemu.sandbox,
    )
    image = settings.l1_image if level == 1 else settings.l2_image if level == 2 else None
    if image is not None:
        return _image(common, image, settings, files)
    l2_image_disks = ((_disk(settings.l2_image, files), Disk(files.seeds[2]))
                      if level == 1 and 2 in files.seeds and settings.l2_image is not None else ())
    first = 2 if settings.l1_image is not None else 1  # the first level that boots the built-in guest
    xen = (dataclasses.replace(files.xen, args=xen_args(common, report))
           if level == 1 and settings.hypervisor == "xen" and files.xen is not None else None)
    if level == 2 and settings.hypervisor == "xen":
        return _domu(common, settings, report, files)
    return dataclasses.replace(
        common, kernel=files.kernel, initrd=files.initrd, append=settings.append,
        view=files.view if level == first or files.view is None else files.view.one_level_down(),
        firmware=files.firmware if xen is None else None, deepest=settings.levels, disks=l2_image_disks, xen=xen,
        uploads=files.uploads if level == first else (),
    )


def _domu(common: GuestSpec, settings: Settings, report: HostReport, files: BootFiles) -> GuestSpec:
    """L2 in a Xen L1: an HVM domU of the built-in guest. Its cpuid= is xl's: under TCG without
    RDTSCP, whose length Xen cannot tell without SVM's next-RIP (QEMU's SVM lacks it), and Xen
    crashed the domU on its first RDTSCP."""
    cpuid = common.cpu + (",rdtscp=0" if report.pace == "tcg" and settings.l2_cpu is None else "")
    return dataclasses.replace(
        common, domu=True, qemu="xl", cpu=cpuid, kernel=files.bzimage, initrd=files.initrd, append=settings.append,
        view=None if files.view is None else files.view.one_level_down(), deepest=2)


# The oldest QEMU measured to run Xen's PV dom0 under TCG with Xen's SMAP on (see xen_args).
XEN_SMAP_QEMU = (10, 0)


def xen_args(spec: GuestSpec, report: HostReport) -> str:
    """Xen's command line for L1: its console on the serial port and half of L1's memory for dom0
    (the rest for domUs). Under TCG with a QEMU older than XEN_SMAP_QEMU also `smap=0`: QEMU 7.2's
    TCG with -cpu max made Xen's SMAP fault on the PV dom0's first exception (in Xen's
    create_bounce_frame, then "Hardware Dom0 crashed"); smap=0 alone cures it, smep=0 alone does
    not, and QEMU 10.0 boots the same dom0 with Xen's defaults (measured 2026-12-05). With KVM
    on hardware Xen keeps its defaults."""
    dom0 = dom0_mib(spec.memory_mib)
    old_tcg = report.accel == "tcg" and report.qemu is not None and report.qemu.release < XEN_SMAP_QEMU
    return f"console=com1 dom0_mem={dom0}M,max:{dom0}M{' smap=0' if old_tcg else ''}"


def _image(common: GuestSpec, image: Path, settings: Settings, files: BootFiles) -> GuestSpec:
    """A user's disk image, booted by its own bootloader with -snapshot. With cloud-init the session
    key arrives through a NoCloud seed and commands run over SSH; with --nested-login on the serial console."""
    login = settings.login if common.level == 1 else None
    disks: tuple[Disk, ...]
    if common.level == 2:
        disks = L2_IMAGE_DISKS  # L1 holds them (see builtin_spec)
    else:
        disks = (_disk(image, files),) if login else (_disk(image, files), Disk(files.seeds[1]))
    # L1 carries the streams of the built-in guests inside it (none inside an L2 image: skip_reason).
    return dataclasses.replace(common, disks=disks, channel="serial" if login else "ssh", login=login,
                               deepest=settings.levels if common.level == 1 else common.level)


def _disk(image: Path, files: BootFiles) -> Disk:
    return Disk(image, files.image_formats[image])


def timeouts(spec: GuestSpec, settings: Settings, report: HostReport) -> tuple[float, float]:
    """(boot, command) seconds for a guest: the user's, or scaled with accelerator, depth and kind."""
    boot = scaled_timeout(BOOT_SECONDS, report.pace, spec.level, "boot") * CHANNEL_NEEDS[spec.channel].boot_factor
    command = scaled_timeout(COMMAND_SECONDS, report.pace, spec.level, "command")
    return settings.boot_timeout or boot, settings.command_timeout or command
