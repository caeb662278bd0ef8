"""The Lab: the guests of one session and everything behind them, without pytest.

Settings, the user's hooks and a progress callback go in; the host report, the run
directory, the session key, the boot files, the pool and `guest(level)` come out. Nothing
expensive happens until a guest is asked for: the QEMU lookup (`--version`), the run
directory, the session key, the initramfs and the pool are made on first use. The pytest
plugin (session.py) wraps one Lab; benchmarks and scripts use it directly:

    with Lab(Settings.from_sources({"levels": "2"}, env={})) as lab:
        print(lab.guest(2).succeed("uname -r"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .base.errors import BootError, HostError, LevelUnavailable, NestedKvmError
from .base.host import HARDWARE_BACKENDS, HostReport, QemuInfo, enable_nested, find_qemu, probe
from .boot.cloudinit import write_nocloud_seed
from .boot.initramfs import Kernel, boot_image, build_initramfs, cache_dir, guest_boot_dir
from .boot.kernel_tree import boot_kernel, modules_share, with_modules
from .boot.layout import CONSOLE
from .boot.qemu import QBOOT, GuestSpec, RunPaths
from .boot.view import build_view, filtered_etc, python_dirs
from .boot.xen import TREE_HYPERVISOR, XenBoot, hypervisor_image, unpacked_packages
from .config import plan
from .config.settings import MAX_LEVELS, Settings, image_format
from .machine.guest import Guest, new_guest
from .machine.pool import GuestPool, LifecycleHooks
from .machine.ssh import SessionKey, make_session_key

RUN_DIR_PREFIX = "nestedkvm-"
MKDTEMP_RANDOM = 8  # the random characters tempfile.mkdtemp adds to a prefix
SOCKET_PATH_MAX = 107  # bytes in a UNIX socket's path: sun_path's 108, less the terminating NUL


def _same_spec(level: int, spec: GuestSpec) -> GuestSpec:
    return spec


def _argv_as_is(spec: GuestSpec, argv: list[str]) -> None:
    return None


def _quiet(message: str) -> None:
    return None


@dataclass(frozen=True)
class LabHooks:
    """The user's say (the pytest plugin passes its four hooks, see hookspecs.py); by default, none."""

    guest_spec: Callable[[int, GuestSpec], GuestSpec] = _same_spec  # an edited copy of the spec
    qemu_argv: Callable[[GuestSpec, list[str]], None] = _argv_as_is  # edits the argv in place
    lifecycle: LifecycleHooks = dataclasses.field(default_factory=LifecycleHooks)


class Lab:
    """The guests of one session (one pytest process, or one script)."""

    def __init__(self, settings: Settings, *, rootdir: Path | None = None, hooks: LabHooks | None = None,
                 progress: Callable[[str], None] = _quiet) -> None:
        self.settings = settings
        self.rootdir = Path.cwd() if rootdir is None else rootdir  # the project under test: exported to guests
        self.hooks = hooks or LabHooks()
        self.progress = progress  # one line for the person watching (the plugin writes it to the terminal)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- made on first use -----------------------------------------------------------------

    @functools.cached_property
    def report(self) -> HostReport:
        """The host check with the QEMU that will run L1 (its `--version` runs here, once)."""
        arch = platform.machine()
        chosen = self.settings.qemu_for(1)  # --nested-qemu, already run once while options were read
        qemu = find_qemu(arch) if chosen is None else chosen.info
        report = probe(accel=self.settings.accel, cpu=self.settings.cpu, qemu=qemu, arch=arch)
        if self.settings.enable and report.kvm_backend in HARDWARE_BACKENDS and report.nested is False:
            for line in enable_nested(report):
                self.progress(line)
            report = probe(accel=self.settings.accel, cpu=self.settings.cpu, qemu=report.qemu, arch=arch)
        return report

    @functools.cached_property
    def run_root(self) -> Path:
        _remove_stale_run_dirs()
        _interrupt_on_ending_signals()
        prefix = f"{RUN_DIR_PREFIX}{os.getpid()}-"
        check_socket_room(Path(tempfile.gettempdir()) / f"{prefix}{'x' * MKDTEMP_RANDOM}")
        # 0700, private to this process; the pid in the name lets a later session clean up after a SIGKILL.
        return Path(tempfile.mkdtemp(prefix=prefix))

    @functools.cached_property
    def ssh_key(self) -> SessionKey:
        return make_session_key(self.run_root / "ssh")

    @functools.cached_property
    def kernel(self) -> Kernel:
        """The kernel the built-in guests boot, looked up once (boot files and JUnit properties)."""
        return boot_kernel(self.settings.kernel, self.settings.modules)

    @functools.cached_property
    def boot_files(self) -> plan.BootFiles:
        seeds = {level: self.run_root / f"l{level}-seed.iso" for level in plan.seed_levels(self.settings)}
        for level, seed in seeds.items():
            write_nocloud_seed(seed, public_key=self.ssh_key.public_line, hostname=f"nestedkvm-l{level}",
                               instance_id=self.run_root.name)
        formats = {image: image_format(image) for image in (self.settings.l1_image, self.settings.l2_image)
                   if image is not None}
        if self.settings.l1_image is not None and self.settings.levels < 2:  # a disk image boots its own kernel
            return plan.BootFiles(kernel=None, initrd=None, firmware=None, seeds=seeds, image_formats=formats)
        kernel = self.kernel
        firmware = QBOOT if QBOOT.is_file() else None
        if self.settings.l1_image is not None:  # the built-in guest at L2 boots from copies inside the image
            return plan.in_image(boot_image(kernel), build_initramfs(kernel), firmware, seeds, formats)
        files = plan.BootFiles(kernel=boot_image(kernel), initrd=build_initramfs(kernel), firmware=firmware,
                               seeds=seeds)
        shared = [cache_dir(), *python_dirs(), *self.settings.share, *modules_share(kernel),
                  *self.settings.suite_dirs(), *self.settings.qemu_shares()]
        view = build_view(filtered_etc(cache_dir()), shared, project=self.rootdir)
        view = with_modules(view, kernel)  # for modprobe in guests
        # /boot: the kernel the guests run, for a hypervisor (or this plugin) inside them to boot
        boot_dir = guest_boot_dir(kernel)
        view = dataclasses.replace(view, links=(*view.links, ("/boot", str(boot_dir))))
        bzimage = boot_dir / f"vmlinuz-{kernel.release}" if self.settings.hypervisor == "xen" else None
        return dataclasses.replace(files, view=view, image_formats=formats, xen=self._xen_boot(), bzimage=bzimage)

    def _xen_boot(self) -> XenBoot | None:
        """With --nested-hypervisor=xen: Debian's Xen packages unpacked in the cache (fetched on first
        use) and the hypervisor (the user's --nested-xen, else the packages')."""
        if self.settings.hypervisor != "xen":
            return None
        tools = unpacked_packages(cache_dir())
        chosen = self.settings.xen
        hypervisor = tools / TREE_HYPERVISOR if chosen is None else hypervisor_image(chosen, cache_dir())
        return XenBoot(hypervisor=hypervisor, tools=tools)

    @functools.cached_property
    def pool(self) -> GuestPool:
        for line in self.plan_lines():  # the plan, once, when the first guest is wanted
            self.progress(line)
        return GuestPool(self._new_guest, self.progress, self.hooks.lifecycle)

    @functools.cache  # noqa: B019 (one Lab per session: caching per instance is the point)
    def spec_for(self, level: int) -> GuestSpec:
        """What boots at `level` this session (the same spec for every restart)."""
        return plan.spec_for(level, self.settings, self.report, self.boot_files, self.hooks.guest_spec)

    def _new_guest(self, level: int, parent: Guest | None) -> Guest:
        spec = self.spec_for(level)
        boot_timeout, command_timeout = plan.timeouts(spec, self.settings, self.report)
        return new_guest(spec, self.run_root, parent=parent, boot_timeout=boot_timeout,
                         command_timeout=command_timeout, edit_argv=functools.partial(self.hooks.qemu_argv, spec),
                         ssh_key=self.ssh_key, console_limit=self.settings.console_limit << 20,
                         output_limit=self.settings.output_limit << 20, emulated=self.report.pace == "tcg")

    # -- what callers use ------------------------------------------------------------------

    def unavailable_reason(self, level: int) -> str | None:
        """Why this session cannot provide a guest at `level`, or None."""
        return plan.skip_reason(level, self.settings, self.report)

    def guest(self, level: int) -> Guest:
        """The running guest at `level` (booted with the levels above it when needed); raises
        LevelUnavailable when this session cannot provide that level."""
        reason = self.unavailable_reason(level)
        if reason:
            raise LevelUnavailable(reason, level=level)
        return self.pool.get(level)

    @property
    def guests(self) -> dict[int, Guest]:
        """The guests made so far, by level (nothing is started here)."""
        return self.pool.guests if "pool" in self.__dict__ else {}

    @property
    def in_use(self) -> bool:
        """A guest was asked for: the plan was printed and the pool made."""
        return "pool" in self.__dict__

    @property
    def boot_failures(self) -> list[tuple[Guest, BootError]]:
        """The boots that failed since the caller last cleared this list (the pool keeps them)."""
        return self.pool.boot_failures if "pool" in self.__dict__ else []

    def stop_from(self, level: int) -> None:
        """Stop the guests at `level` and deeper (they boot again, pristine, when next asked for)."""
        if "pool" in self.__dict__:
            self.pool.stop_from(level)

    def qemu_of(self, level: int) -> QemuInfo | None:
        """The QEMU that runs the guest at `level` (for L2 and deeper: inside its parent); None where
        that is a disk image's own, which the plugin knows nothing of before the image runs."""
        chosen = self.settings.qemu_for(level)
        if chosen is None and level >= 2 and self.settings.l1_image is not None:
            return None
        return self.report.qemu if chosen is None else chosen.info

    def plan_lines(self) -> list[str]:
        """The accelerator plan, its deciding reason, the QEMU of each deeper level where it is
        not L1's, and the levels of this session."""
        summary = [line.removeprefix("nestedkvm: ") for line in self.report.summary_lines()]
        inner = [f"L{level} QEMU {qemu.version} {qemu.binary}" for level in range(2, self.settings.levels + 1)
                 if (qemu := self.qemu_of(level)) is not None and qemu != self.report.qemu]
        if self.settings.l1_image is not None and self.settings.levels >= 2 and self.settings.qemu_for(2) is None:
            inner.insert(0, f"L2 QEMU the image's own (qemu-system-{self.report.arch} on its PATH)")
        xen = [f"L1 hypervisor xen {self.settings.xen or 'from Debian packages'}, the built-in guest as dom0"
               ] if self.settings.hypervisor == "xen" else []
        return [*summary, *xen, *inner, f"levels {self.settings.levels}"]

    @functools.cached_property
    def properties(self) -> list[tuple[str, str]]:
        """The plan and versions: which accelerator, CPU, QEMU and kernel ran the tests."""
        props = [("nestedkvm_accel", self.report.accel), ("nestedkvm_cpu", self.report.cpu),
                 ("nestedkvm_levels", str(self.settings.levels)), ("nestedkvm_hypervisor", self.settings.hypervisor)]
        if self.report.qemu is not None:
            props.append(("nestedkvm_qemu", self.report.qemu.version))
        for level in range(1, self.settings.levels + 1):  # which QEMU ran each level
            if (qemu := self.qemu_of(level)) is not None:
                props.append((f"nestedkvm_qemu_l{level}", f"{qemu.version} {qemu.binary}"))
        with contextlib.suppress(NestedKvmError):  # reported where the kernel is needed
            props.append(("nestedkvm_kernel", self.kernel.release))
        return props

    def close(self) -> None:
        """Stop every guest and remove the run directory, private key included; again: nothing."""
        try:
            if "pool" in self.__dict__:
                self.pool.close()
        finally:  # a guest_teardown hook that raised still leaves no key behind
            if "run_root" in self.__dict__:
                shutil.rmtree(self.run_root, ignore_errors=True)


# SIGTERM (a CI job cancelled, `timeout`), SIGHUP (the terminal closed) and SIGQUIT (Ctrl-\\)
# end the session as Ctrl-C does: pytest tears down, and the session stops its guests and
# removes the run directory, private key included. Only where nobody else handles them.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _interrupt_on_ending_signals() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check_socket_room(run_root: Path) -> None:
    """HostError, before anything is made, where the deepest guest's sockets under `run_root` would
    have a path longer than a UNIX socket's (QEMU would refuse each boot with a line of its own)."""
    longest = RunPaths(run_root / f"l{MAX_LEVELS}").end(CONSOLE)  # no socket name is longer (layout)
    size = len(os.fsencode(longest))
    if size > SOCKET_PATH_MAX:
        temp = run_root.parent
        room = SOCKET_PATH_MAX - (size - len(os.fsencode(temp)))  # what the rest of the path leaves TMPDIR
        raise HostError(f"the temporary directory {temp} is too long for the guests' sockets: {longest} would "
                        f"be {size} bytes, and a UNIX socket's path has at most {SOCKET_PATH_MAX}: point TMPDIR "
                        f"at a directory of at most {room} bytes (e.g. /tmp)")


def _remove_stale_run_dirs() -> None:
    """Remove run directories whose process is gone (it was killed before it could)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        try:
            ours = path.stat().st_uid == os.getuid()  # by uid: an owner without a passwd entry is not ours
        except OSError:
            continue
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and ours:
            shutil.rmtree(path, ignore_errors=True)
