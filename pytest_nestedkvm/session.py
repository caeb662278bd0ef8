"""The session plugin object: owns the guests of one pytest process and everything behind them.

Registered under SESSION_PLUGIN by plugin.py at configure time, like pytest-xdist's DSession.
Nothing expensive happens until a test asks for a guest: the QEMU lookup (`--version`),
the run directory, the session key, the initramfs and the pool are made on first use,
so `pytest --help`, `--collect-only` and sessions without guest tests start no process.
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
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _pytest.runner import runtestprotocol

from . import artifacts, forensics, plan
from .cloudinit import write_nocloud_seed
from .errors import NestedKvmError
from .forensics import ConsoleMark, Trouble
from .guest import Guest, new_guest
from .host import HARDWARE_BACKENDS, HostReport, enable_nested, find_qemu, probe
from .initramfs import Kernel, boot_image, build_initramfs, cache_dir
from .kernel_tree import boot_kernel, modules_share, with_modules
from .pool import GuestPool, LifecycleHooks
from .qemu import QBOOT, GuestSpec
from .settings import Settings, image_format
from .ssh import SessionKey, make_session_key
from .view import build_view, filtered_etc, python_dirs

T = TypeVar("T")
SESSION_PLUGIN = "nestedkvm-session"
SESSION_KEY = pytest.StashKey["NestedSession"]()
MARKS = pytest.StashKey[dict[int, ConsoleMark]]()
RUN_DIR_PREFIX = "nestedkvm-"
PLAN_OUTPUT = "nestedkvm_plan"  # what a pytest-xdist worker hands its controller
# Fixture name -> the guest level it needs.
LEVEL_FIXTURES = {"l1": 1, "l2": 2}


class NestedSession:
    """The guests of one pytest process. Without a pytest config (benchmarks, scripts) it runs
    no user hooks and prints nothing."""

    def __init__(self, settings: Settings, config: pytest.Config | None = None) -> None:
        self.config = config
        self.settings = settings
        self.marks_made = 0
        self.workers_plan: dict[str, None] = {}  # pytest-xdist controller: the workers' plan lines

    # -- made on first use -----------------------------------------------------------------

    @functools.cached_property
    def report(self) -> HostReport:
        """The host check with the QEMU that will run L1 (its `--version` runs here, once)."""
        arch = platform.machine()
        report = probe(accel=self.settings.accel, cpu=self.settings.cpu, qemu=find_qemu(arch), arch=arch)
        if self.settings.enable and report.kvm_backend in HARDWARE_BACKENDS and report.nested is False:
            for line in enable_nested(report):
                self.progress(line)
            report = probe(accel=self.settings.accel, cpu=self.settings.cpu, qemu=report.qemu, arch=arch)
        return report

    @functools.cached_property
    def run_root(self) -> Path:
        _remove_stale_run_dirs()
        _interrupt_on_sigterm()
        # 0700, private to this process; the pid in the name lets a later session clean up after a SIGKILL.
        return Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))

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
        if self.settings.l1_image is not None:  # a disk image boots its own kernel
            return plan.BootFiles(kernel=None, initrd=None, firmware=None, seeds=seeds, image_formats=formats)
        kernel = self.kernel
        files = plan.BootFiles(kernel=boot_image(kernel), initrd=build_initramfs(kernel),
                               firmware=QBOOT if QBOOT.is_file() else None, seeds=seeds)
        shared = [cache_dir(), *python_dirs(), *self.settings.share, *modules_share(kernel),
                  *self.settings.suite_dirs()]
        view = build_view(filtered_etc(cache_dir()), shared, project=self.rootdir)
        view = with_modules(view, kernel)  # for modprobe in guests
        return dataclasses.replace(files, view=view, image_formats=formats)

    @property
    def rootdir(self) -> Path:
        """The project under test: pytest's rootdir (the working directory without pytest)."""
        return Path.cwd() if self.config is None else self.config.rootpath

    @functools.cached_property
    def pool(self) -> GuestPool:
        for line in self.plan_lines():  # the plan, once, when the first guest is wanted
            self.progress(line)
        hooks = None
        if self.config is not None:
            hook, config = self.config.hook, self.config
            hooks = LifecycleHooks(
                guest_ready=lambda guest: hook.pytest_nestedkvm_guest_ready(config=config, guest=guest),
                guest_teardown=lambda guest: hook.pytest_nestedkvm_guest_teardown(config=config, guest=guest),
            )
        return GuestPool(self._new_guest, self.progress, hooks)

    @functools.cache  # noqa: B019 (one session object per pytest process: caching per instance is the point)
    def spec_for(self, level: int) -> GuestSpec:
        """What boots at `level` this session (the same spec for every restart)."""
        def users(lv: int, spec: GuestSpec) -> GuestSpec:
            if self.config is None:
                return spec
            return self.config.hook.pytest_nestedkvm_guest_spec(config=self.config, level=lv, spec=spec)  # type: ignore[no-any-return]

        return plan.spec_for(level, self.settings, self.report, self.boot_files, users)

    def _new_guest(self, level: int, parent: Guest | None) -> Guest:
        spec = self.spec_for(level)
        boot_timeout, command_timeout = plan.timeouts(spec, self.settings, self.report)
        config = self.config

        def edit(argv: list[str]) -> None:
            if config is not None:
                config.hook.pytest_nestedkvm_qemu_argv(config=config, spec=spec, argv=argv)

        return new_guest(spec, self.run_root, parent=parent, boot_timeout=boot_timeout,
                         command_timeout=command_timeout, edit_argv=edit, ssh_key=self.ssh_key,
                         console_limit=self.settings.console_limit << 20,
                         output_limit=self.settings.output_limit << 20, emulated=self.report.pace == "tcg")

    # -- what fixtures and hooks use -------------------------------------------------------

    def skip_reason(self, level: int) -> str | None:
        return plan.skip_reason(level, self.settings, self.report)

    def guest(self, level: int) -> Guest:
        """The running guest at `level`; a test that cannot have it is skipped with the reason."""
        reason = self.skip_reason(level)
        if reason:
            pytest.skip(reason)
        return self.pool.get(level)

    @property
    def guests(self) -> dict[int, Guest]:
        return self.pool.guests if "pool" in self.__dict__ else {}

    @functools.cached_property
    def properties(self) -> list[tuple[str, str]]:
        """The plan and versions, for JUnit XML: which accelerator, CPU, QEMU and kernel ran the tests."""
        props = [("nestedkvm_accel", self.report.accel), ("nestedkvm_cpu", self.report.cpu),
                 ("nestedkvm_levels", str(self.settings.levels))]
        if self.report.qemu is not None:
            props.append(("nestedkvm_qemu", self.report.qemu.version))
        with contextlib.suppress(NestedKvmError):  # reported where the kernel is needed
            props.append(("nestedkvm_kernel", self.kernel.release))
        return props

    def progress(self, message: str) -> None:
        """A line on the terminal now, also while pytest captures output (guests boot inside tests)."""
        if self.config is None:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(f"nestedkvm: {message}")

    def close(self) -> None:
        try:
            if "pool" in self.__dict__:
                self.pool.close()
        finally:  # a guest_teardown hook that raised still leaves no key behind
            if "run_root" in self.__dict__:
                shutil.rmtree(self.run_root, ignore_errors=True)

    # -- hooks -----------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        """The plan with -v (it runs `qemu --version`); otherwise it is printed when a guest is first used."""
        if config.get_verbosity() < 1:
            return []
        try:
            return [f"nestedkvm: {line}" for line in self.plan_lines()]
        except NestedKvmError as exc:
            return [f"nestedkvm: {exc}"]

    def plan_lines(self) -> list[str]:
        """The accelerator plan, its deciding reason, and the levels of this session."""
        summary = [line.removeprefix("nestedkvm: ") for line in self.report.summary_lines()]
        return [*summary, f"levels {self.settings.levels}"]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """pytest-xdist controller: keep the plan a worker used (its own lines never reach the terminal)."""
        for line in node.workeroutput.get(PLAN_OUTPUT, []):
            self.workers_plan.setdefault(line)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.workers_plan:  # in order, each line once
            terminalreporter.write_line(f"nestedkvm: {line}")
        reruns = terminalreporter.stats.get("rerun", [])
        if reruns:
            terminalreporter.write_sep("=", "nestedkvm: reruns after emulator faults", yellow=True)
            for report in reruns:
                trouble = forensics.trouble_of(report)
                why = trouble.headline if trouble is not None else "an emulator fault"
                terminalreporter.write_line(f"RERUN {report.nodeid} - {why}")

    def pytest_report_teststatus(
        self, report: pytest.TestReport,
    ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        # "rerun" is an outcome of our own (pytest_runtest_protocol below), as pytest-rerunfailures' is
        if str(report.outcome) == "rerun":
            return "rerun", "R", ("RERUN", {"yellow": True})
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        """A test that uses guests, run again on fresh guests when an emulator fault ended it.

        Where the guests' virtualization is emulated (TCG, or KVM on TCG's SVM), a wedge (a stall
        on the console, a boot that never answers) or a reset without a panic is the emulator's,
        not the test's: such a run is reported as RERUN (progress line, summary, JUnit property,
        `reruns_of`) and the test runs once more, up to --nested-emulator-reruns times. A test
        that fails in any other way, or the same way on its last run, fails.
        """
        if self.settings.emulator_reruns == 0 or not uses_guests(item):
            return None  # pytest's own protocol
        hook = item.ihook
        hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        faults: list[Trouble] = []
        while True:
            item.stash[forensics.RERUNS_KEY] = list(faults)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            fault = next((r for r in reports if r.failed and _emulator_fault(r)), None)
            trouble = forensics.trouble_of(fault) if fault is not None else None
            if fault is None or trouble is None or len(faults) >= self.settings.reruns:
                for report in reports:
                    hook.pytest_runtest_logreport(report=report)
                break
            faults.append(trouble)
            for report in reports[:reports.index(fault)]:
                hook.pytest_runtest_logreport(report=report)
            fault.outcome = "rerun"  # type: ignore[assignment]
            hook.pytest_runtest_logreport(report=fault)
            item.user_properties.append(("nestedkvm_emulator_rerun", trouble.headline))  # JUnit XML
            self.progress(f"{item.nodeid}: {trouble.headline}; running it again on fresh guests "
                          f"(rerun {len(faults)} of {self.settings.reruns})")
            self.pool.stop_from(trouble.level)
            _forget_failed_fixtures(item)
        hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if "pool" in self.__dict__:
            self.pool.boot_failures.clear()  # a boot that fails from here on is this test's
        levels = levels_used(item)
        if not levels:
            return
        reported(self._setup_levels, item, levels)

    def _setup_levels(self, item: pytest.Item, levels: list[int]) -> None:
        item.user_properties.extend(self.properties)  # JUnit XML: what ran this test
        for level in levels:
            reason = self.skip_reason(level)
            if reason:
                pytest.skip(reason)
        if item.get_closest_marker("nested_fresh"):
            for level in levels:
                self.pool.stop_from(level)
        if levels[-1] >= 1:
            # Booted here (the deepest with the levels above it), not in the fixture: a boot that
            # fails is this test's error, not one that a session-scoped fixture caches for every
            # later test. A guest an earlier test crashed or wedged comes back pristine.
            self.pool.get(levels[-1])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        if self.guests:
            self.marks_made += 1
            item.stash[MARKS] = forensics.mark(self.guests, self.marks_made, self.settings.artifacts is not None)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        marks = item.stash.get(MARKS, {}) if call.when == "call" else {}
        trouble = forensics.trouble_since(self.guests, marks) if marks else None
        if trouble is not None:
            # Blame this test: the crash happened while it ran. The next test gets a fresh guest.
            item.stash[forensics.TROUBLE_KEY] = trouble
            setattr(report, forensics.REPORT_ATTRIBUTE, trouble.as_dict())
            report.outcome = "failed"
            report.longrepr = trouble.headline
            report.sections.append((f"L{trouble.level} console during this test", trouble.console[-20000:]))
        elif report.failed and call.when in ("setup", "call") and "pool" in self.__dict__ and self.pool.boot_failures:
            guest, error = self.pool.boot_failures[0]  # a guest this test needed did not boot
            trouble = forensics.boot_trouble(guest, error)
            item.stash[forensics.TROUBLE_KEY] = trouble
            setattr(report, forensics.REPORT_ATTRIBUTE, trouble.as_dict())
        reruns = item.stash.get(forensics.RERUNS_KEY, None)
        if reruns:
            setattr(report, forensics.RERUNS_ATTRIBUTE, [t.as_dict() for t in reruns])
        if report.failed and call.when in ("setup", "call") and self.settings.artifacts and self.guests:
            report.sections.append(artifacts.report_section(self.settings.artifacts, item.nodeid, self.guests, marks))
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self) -> Generator[None, None, None]:
        worker_output = getattr(self.config, "workeroutput", None)  # on a pytest-xdist worker; sent in this hook
        if worker_output is not None and "pool" in self.__dict__:
            worker_output[PLAN_OUTPUT] = self.plan_lines()
        try:
            return (yield)
        finally:
            self.close()  # after the session's fixtures are torn down: the one place guests stop


def uses_guests(item: pytest.Item) -> bool:
    """The test asks for a guest: a level fixture, the nested marker, or the nested_guest factory."""
    return bool(levels_used(item)) or "nested_guest" in getattr(item, "fixturenames", ())


def _emulator_fault(report: pytest.TestReport) -> bool:
    trouble = forensics.trouble_of(report)
    return trouble is not None and trouble.emulator_fault


def _forget_failed_fixtures(item: pytest.Item) -> None:
    """pytest keeps a fixture's error for the rest of its scope: forget the errors of this test's
    fixtures so its rerun sets them up again (a session-scoped fixture would otherwise fail it)."""
    info = getattr(item, "_fixtureinfo", None)
    for definitions in (info.name2fixturedefs.values() if info is not None else ()):
        for definition in definitions:
            cached = definition.cached_result
            if cached is not None and cached[2] is not None:
                definition.cached_result = None


def levels_used(item: pytest.Item) -> list[int]:
    """The guest levels a test asks for, through its fixtures or @pytest.mark.nested(level=N)."""
    levels = [level for name, level in LEVEL_FIXTURES.items() if name in getattr(item, "fixturenames", ())]
    marker = item.get_closest_marker("nested")
    if marker is not None:
        levels.append(int(marker.kwargs.get("level", marker.args[0] if marker.args else 1)))
    return sorted(set(levels))


def reported(function: Callable[..., T], *args: object) -> T:
    """`function(*args)`, with plugin errors turned into a test error that shows just the message.

    Infrastructure trouble says what and why; the plugin's own stack does not help.
    """
    try:
        return function(*args)
    except NestedKvmError as exc:
        error = exc
    pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)


# SIGTERM (a CI job cancelled, `timeout`), SIGHUP (the terminal closed) and SIGQUIT (Ctrl-\\)
# end the session as Ctrl-C does: pytest tears down, and the session stops its guests and
# removes the run directory, private key included. Only where nobody else handles them.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _interrupt_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _remove_stale_run_dirs() -> None:
    """Remove run directories whose pytest process is gone (it was killed before it could)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        try:
            ours = path.stat().st_uid == os.getuid()  # by uid: an owner without a passwd entry is not ours
        except OSError:
            continue
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and ours:
            shutil.rmtree(path, ignore_errors=True)
