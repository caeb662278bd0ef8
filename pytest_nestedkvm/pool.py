"""The session's guests: what to boot at each level, started on first use and reused.

A guest found dead before a test is started again from its pristine spec (every
disk is -snapshot and the built-in root is read-only, so a restart is a clean slate).
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cloudinit import write_nocloud_seed
from .errors import BootError, ConfigError, GuestCrashed, HostError, NestedKvmError
from .guest import Guest
from .host import HostReport
from .initramfs import TMPFS_DIRS, boot_image, build_initramfs, find_kernel
from .qemu import QBOOT, GuestSpec
from .settings import Settings
from .ssh import make_session_key

log = logging.getLogger("pytest_nestedkvm.pool")

# Seconds to first command. L0's accelerator sets the pace of the whole chain (under
# TCG every level is emulated), and each level multiplies the cost.
BOOT_TIMEOUT = {"kvm": 30.0, "tcg": 90.0}
# A disk image boots firmware, a bootloader and its whole init system (systemd, cloud-init):
# ~20-45 s under TCG where the built-in guest takes ~3 s.
IMAGE_BOOT_FACTOR = 4
COMMAND_TIMEOUT = {"kvm": 60.0, "tcg": 120.0}
RUN_DIR_PREFIX = "nestedkvm-"
NESTED_BOOT_ATTEMPTS = 3


@dataclass(frozen=True)
class Trouble:
    """A guest that crashed or complained during a test: who, a one-line headline, its console."""

    level: int
    headline: str
    console: str


@dataclass(frozen=True)
class Mark:
    """A running guest's state when a test started."""

    console: int  # bytes in its console log
    kernel_log_tag: str | None  # a line written into its kernel log (only when artifacts are kept)


def _unchanged(level: int, spec: GuestSpec) -> GuestSpec:
    return spec


def _nothing(*args: object) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """The user's say in what the pool boots (see hookspecs.py); by default, none."""

    guest_spec: Callable[[int, GuestSpec], GuestSpec] = _unchanged
    qemu_argv: Callable[[GuestSpec, list[str]], None] = _nothing
    guest_ready: Callable[[Guest], None] = _nothing
    guest_teardown: Callable[[Guest], None] = _nothing


# First matching fragment of a console problem line -> how the headline names it.
PROBLEM_KINDS = (("Kernel panic", "kernel panic"), ("Oops", "kernel oops"), ("BUG:", "kernel BUG"),
                 ("general protection", "kernel oops"), ("WARNING:", "kernel WARN"))


class GuestPool:
    def __init__(
        self, settings: Settings, report: HostReport, progress: Callable[[str], None] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.report = report
        self.progress = progress or log.info
        self.hooks = hooks or Hooks()
        _remove_stale_run_dirs()
        # 0700, private to this process; the pid in the name lets a later session clean up after a SIGKILL.
        self.run_root = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        self.guests: dict[int, Guest] = {}
        self.ssh_key = make_session_key(self.run_root / "ssh")
        self.marks_made = 0

    @functools.cached_property
    def properties(self) -> list[tuple[str, str]]:
        """The plan and versions, for JUnit XML: which accelerator, CPU, QEMU and kernel ran the tests."""
        props = [("nestedkvm_accel", self.report.accel), ("nestedkvm_cpu", self.report.cpu),
                 ("nestedkvm_levels", str(self.settings.levels))]
        if self.report.qemu is not None:
            props.append(("nestedkvm_qemu", self.report.qemu.version))
        try:
            props.append(("nestedkvm_kernel", find_kernel(self.settings.kernel, self.settings.modules).release))
        except NestedKvmError:
            pass  # reported where the kernel is needed
        return props

    def skip_reason(self, level: int) -> str | None:
        """Why a test at `level` cannot run in this session, or None."""
        if level > self.settings.levels:
            return (f"needs L{level}, but this session provides up to L{self.settings.levels} "
                    f"(run with --nested-levels={level})")
        if self.report.qemu is None:
            return "QEMU not found: apt-get install qemu-system-x86"
        if level >= 2 and not self.report.nesting_possible:
            return f"L{level} needs nested virtualization, which this host cannot provide: {self.report.nesting_fix}"
        image_level = 1 if self.settings.l1_image else 2 if self.settings.l2_image else None
        if image_level is not None and level > image_level:
            return (f"L{level} inside a --nested-l{image_level}-image is not supported yet: the plugin starts "
                    "deeper levels inside its built-in guests only")
        return None

    @functools.cache  # noqa: B019 (one pool per session: caching per instance is the point)
    def spec_for(self, level: int) -> GuestSpec:
        """What to boot at `level`: the built-in guest, as the user's guest_spec hooks leave it."""
        spec = self.hooks.guest_spec(level, self.builtin_spec(level))
        if not isinstance(spec, GuestSpec) or spec.level != level:
            raise ConfigError(f"pytest_nestedkvm_guest_spec returned {spec!r} for L{level}: return a GuestSpec "
                              f"for level {level} (e.g. dataclasses.replace(spec, ...)) or None")
        return spec

    def builtin_spec(self, level: int) -> GuestSpec:
        """The built-in guest at `level`: host kernel, plugin initramfs, the parent's root over 9p.

        L1 gets the host plan (accelerator, CPU model); deeper levels always run on
        their parent's KVM, with -cpu host unless --nested-l2-cpu says otherwise.
        """
        assert self.report.qemu is not None
        if level == 1 and self.settings.l1_image is not None:
            return self.image_spec(level, self.settings.l1_image)
        if level == 2 and self.settings.l2_image is not None:
            return self.image_spec(level, self.settings.l2_image)
        kernel = find_kernel(self.settings.kernel, self.settings.modules)
        initrd = build_initramfs(kernel)
        if level >= 2:
            _visible_to_guests(initrd)
        return GuestSpec(
            level=level, qemu=self.report.qemu.binary,
            accel=self.report.accel if level == 1 else "kvm", cpu=self.settings.cpu_for(level, self.report.cpu),
            memory_mib=self.settings.memory_for(level), smp=self.settings.smp_for(level),
            kernel=boot_image(kernel), initrd=initrd, append=self.settings.append,
            share_root=Path("/"), firmware=QBOOT if QBOOT.is_file() else None, deepest=self.settings.levels,
            disks=self._l2_image_disks() if level == 1 else (),
            extra_args=self.settings.qemu_args_for(level),
        )

    def image_spec(self, level: int, image: Path) -> GuestSpec:
        """A user's disk image, booted by its own bootloader with -snapshot.

        With cloud-init the session key arrives through a NoCloud seed and commands run
        over SSH; with --nested-login they run on the serial console after a login.
        """
        assert self.report.qemu is not None
        login = self.settings.login if level == 1 else None
        if level == 1:
            disks = (image,) if login else (image, self._seed(level))
        else:  # L1 holds the image and its seed as its own virtio disks (see _l2_image_disks)
            disks = (Path("/dev/vda"), Path("/dev/vdb"))
        return GuestSpec(
            level=level, qemu=self.report.qemu.binary, accel=self.report.accel if level == 1 else "kvm",
            cpu=self.settings.cpu_for(level, self.report.cpu), memory_mib=self.settings.memory_for(level),
            smp=self.settings.smp_for(level), disks=disks, extra_args=self.settings.qemu_args_for(level),
            channel="serial" if login else "ssh", login=login,
        )

    def _l2_image_disks(self) -> tuple[Path, ...]:
        """What L1 is given for an L2 image: the image itself, then L2's seed (/dev/vda, /dev/vdb in L1)."""
        if self.settings.l2_image is None or self.settings.levels < 2:
            return ()
        return (self.settings.l2_image, self._seed(2))

    def _seed(self, level: int) -> Path:
        """The NoCloud seed that gives the guest at `level` the session key (written once per session)."""
        seed = self.run_root / f"l{level}-seed.iso"
        if not seed.exists():
            write_nocloud_seed(seed, public_key=self.ssh_key.public_line, hostname=f"nestedkvm-l{level}",
                               instance_id=f"nestedkvm-{os.getpid()}-{secrets.token_hex(4)}")
        return seed

    def get(self, level: int) -> Guest:
        """The running guest at `level`, started (or started again) when needed."""
        reason = self.skip_reason(level)
        if reason:
            pytest.skip(reason)
        guest = self.guests.get(level)
        if guest is not None and guest.alive:
            return guest
        parent = self.get(level - 1) if level > 1 else None
        if guest is None or guest.parent is not parent:
            spec = self.spec_for(level)
            boot_timeout = BOOT_TIMEOUT[self.report.accel] * level
            if spec.channel != "agent":
                boot_timeout *= IMAGE_BOOT_FACTOR
            guest = Guest(
                spec, self.run_root, parent=parent, boot_timeout=self.settings.boot_timeout or boot_timeout,
                command_timeout=self.settings.command_timeout or COMMAND_TIMEOUT[self.report.accel] * level,
                edit_argv=functools.partial(self.hooks.qemu_argv, spec), ssh_key=self.ssh_key,
            )
            self.guests[level] = guest
        else:
            self.progress(f"L{level} is down; starting a fresh one")
            guest.close()
        self._boot(guest)
        if parent is not None:
            verify_kvm(parent, guest)
        self.progress(f"L{level} ready in {guest.boot_seconds:.1f} s ({guest.spec.accel}, -cpu {guest.spec.cpu})")
        try:
            self.hooks.guest_ready(guest)
        except BaseException:
            guest.close()  # half-provisioned: the next user gets a fresh boot and provisioning again
            raise
        return guest

    def mark(self) -> dict[int, Mark]:
        """Where each running guest stands now: a test's trouble is what comes after."""
        keep = self.settings.artifacts is not None  # the kernel log tag costs a command per guest
        self.marks_made += 1
        return {
            level: Mark(guest.console.size(), _tag_kernel_log(guest, self.marks_made) if keep else None)
            for level, guest in self.guests.items() if guest.alive
        }

    def trouble_since(self, marks: dict[int, Mark]) -> Trouble | None:
        """The first guest (outermost) that crashed or printed a kernel problem since `marks`."""
        for level, at in sorted(marks.items()):
            guest = self.guests[level]
            if guest.stopped_on_purpose:
                continue  # the test (or the plugin, for nested_fresh) stopped it
            mark = at.console
            since = max(mark, guest.console_ready)  # a reboot inside the test starts a new boot log
            problem = guest.console.first_problem(since)
            status = guest.process.exit_status() if problem or not guest.alive else None
            if problem is None and guest.alive:
                continue
            event = _exit_event(guest) if status is not None and problem is None else None  # waits up to 0.5 s
            if problem is not None:
                kind = next((k for pattern, k in PROBLEM_KINDS if pattern in problem), "kernel problem")
                headline = f"L{level} {kind} during this test: {problem}"
            elif event is not None:
                headline = f"L{level} {event[0]} during this test ({event[1]}; QEMU exit status {status})"
            elif status is not None:
                headline = f"L{level} QEMU exited with status {status} during this test (no panic on its console)"
            else:
                broken = guest.channel_trouble or "its QEMU runs but its shell does not answer"
                headline = f"L{level} stopped answering during this test: {broken}"
            deeper = [f"L{d}" for d in sorted(marks) if d > level]
            if deeper and status is not None:
                headline += f"; {', '.join(deeper)} went down with it"
            return Trouble(level, headline, guest.console.read(mark))
        return None

    def _boot(self, guest: Guest) -> None:
        """Start `guest`; a nested boot that ends in a reset without a kernel panic is tried again.

        Under TCG an L2 boot occasionally resets early (seen in about 1 of 20 boots:
        QEMU exits 0 during early boot, with no panic). That is the emulator, not the
        code under test; a panic is never retried. Each retry is reported.
        """
        for attempt in range(1, NESTED_BOOT_ATTEMPTS + 1):
            try:
                guest.start()
                return
            except (BootError, GuestCrashed) as exc:  # an image's QEMU found dead while SSH waits: GuestCrashed
                reset = "QEMU exited with status 0" in str(exc) and "Kernel panic" not in str(exc)
                if guest.parent is None or not reset or attempt == NESTED_BOOT_ATTEMPTS:
                    raise
                self.progress(f"L{guest.level} reset while booting (attempt {attempt}); booting it again")
                guest.close()

    def restore(self, level: int) -> None:
        """Boot the guest at `level` again, from its pristine spec, if it is down."""
        guest = self.guests.get(level)
        if guest is not None and not guest.alive:
            self.get(level)

    def restart(self, level: int) -> None:
        """Give the next user of `level` (and of the levels inside it) a freshly booted guest."""
        for deeper in sorted((lv for lv in self.guests if lv >= level), reverse=True):
            self._stop(self.guests[deeper])

    def close(self) -> None:
        for level in sorted(self.guests, reverse=True):  # deepest first: each needs its parent to stop
            self._stop(self.guests[level])
        self.guests.clear()
        shutil.rmtree(self.run_root, ignore_errors=True)


    def _stop(self, guest: Guest) -> None:
        try:
            if guest.alive:
                self.hooks.guest_teardown(guest)
        finally:
            guest.close()


def _visible_to_guests(path: Path) -> None:
    """Deeper levels read boot files through the shared root, where /tmp and /run are hidden."""
    hidden = next((d for d in TMPFS_DIRS if path.is_relative_to(d)), None)
    if hidden is not None:
        raise HostError(f"{path} is under {hidden}, which guests cover with their own tmpfs, so L2 could not "
                        "boot from it: point XDG_CACHE_HOME somewhere else (e.g. ~/.cache)")


def verify_kvm(parent: Guest, guest: Guest) -> None:
    """Prove, before a test sees `guest`, that it really runs on its parent's KVM.

    Checks the parent's CPU flags, its KVM device and nested parameter, and asks the
    child's QEMU itself (QMP query-kvm) so a silent fallback to TCG cannot pass.
    """
    where = f"L{parent.level}"
    flags = parent.succeed("grep -m1 -w -o -E 'svm|vmx' /proc/cpuinfo || true").strip()
    if not flags:
        raise HostError(f"{where}'s CPU shows neither vmx nor svm, so it cannot run L{guest.level} on KVM: "
                        f"give {where} a CPU model with virtualization (-cpu max under TCG, host under KVM)")
    module = "kvm_amd" if flags == "svm" else "kvm_intel"
    nested = parent.run(f"cat /sys/module/{module}/parameters/nested").stdout.strip()
    if nested not in ("1", "Y"):
        raise HostError(f"{where} has {module} nested={nested or 'not loaded'}: L{guest.level} cannot use KVM")
    kvm = guest.qmp().query_kvm()
    if not (kvm["present"] and kvm["enabled"]):
        raise HostError(f"L{guest.level}'s QEMU is not using KVM (query-kvm: {kvm}): it fell back to emulation "
                        f"inside {where}")


def _remove_stale_run_dirs() -> None:
    """Remove run directories whose pytest process is gone (it was killed before it could)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and path.owner() == _user():
            shutil.rmtree(path, ignore_errors=True)


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _tag_kernel_log(guest: Guest, number: int) -> str | None:
    """Write a line into the guest's kernel log: what a test added comes after it.

    (A tag, not a timestamp: printk's clock and /proc/uptime drift apart under TCG.)
    """
    tag = f"nestedkvm: test {number} starts"
    try:
        guest.succeed(f"echo '{tag}' > /dev/kmsg", timeout=30)
    except (NestedKvmError, AssertionError):
        return None
    return tag


def _exit_event(guest: Guest) -> tuple[str, str] | None:
    """What QEMU's own events say ended the guest: a pvpanic report, or a guest shutdown/reset."""
    events = guest.qmp_events(wait=0.5)
    for event in events:
        if event.get("event") == "GUEST_PANICKED":
            return "kernel panic", "QMP GUEST_PANICKED"
    for event in events:
        if event.get("event") == "SHUTDOWN":
            return "shut down", f"QMP SHUTDOWN, reason {event.get('data', {}).get('reason', 'unknown')}"
    return None
