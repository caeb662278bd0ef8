"""The session plugin object: the pytest face of one Lab (lab.py), which owns the guests.

Registered under SESSION_PLUGIN by plugin.py at configure time, like pytest-xdist's DSession.
It turns the Lab's errors into skips and test errors, blames a test for what happened to its
guests, reruns a test after an emulator fault and relays the plan from pytest-xdist workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import pytest
from _pytest.runner import runtestprotocol

from . import artifacts
from .base.errors import LevelUnavailable, NestedKvmError
from .base.host import HostReport
from .config.settings import Settings
from .lab import Lab, LabHooks
from .machine import forensics
from .machine.forensics import ConsoleMark, Trouble
from .machine.guest import Guest, evidence_of, mark, trouble_since
from .machine.pool import LifecycleHooks
from .trouble import REPORT_ATTRIBUTE, RERUNS_ATTRIBUTE, RERUNS_KEY, TROUBLE_KEY, trouble_of

T = TypeVar("T")
SESSION_PLUGIN = "nestedkvm-session"
SESSION_KEY = pytest.StashKey["NestedSession"]()
MARKS = pytest.StashKey[dict[int, ConsoleMark]]()
PLAN_OUTPUT = "nestedkvm_plan"  # what a pytest-xdist worker hands its controller
# Fixture name -> the guest level it needs.
LEVEL_FIXTURES = {"l1": 1, "l2": 2}


class NestedSession:
    """The pytest face of one Lab: the user's hooks and the terminal in, skips and reports out,
    the reruns after emulator faults, and the pytest-xdist relay of the plan."""

    def __init__(self, settings: Settings, config: pytest.Config) -> None:
        self.config = config
        self.settings = settings
        hook = config.hook
        self.lab = Lab(settings, rootdir=config.rootpath, progress=self.progress, hooks=LabHooks(
            guest_spec=lambda level, spec: hook.pytest_nestedkvm_guest_spec(config=config, level=level, spec=spec),
            qemu_argv=lambda spec, argv: hook.pytest_nestedkvm_qemu_argv(config=config, spec=spec, argv=argv),
            lifecycle=LifecycleHooks(
                guest_ready=lambda guest: hook.pytest_nestedkvm_guest_ready(config=config, guest=guest),
                guest_teardown=lambda guest: hook.pytest_nestedkvm_guest_teardown(config=config, guest=guest),
            )))
        self.marks_made = 0
        self.workers_plan: dict[str, None] = {}  # pytest-xdist controller: the workers' plan lines

    @property
    def report(self) -> HostReport:
        return self.lab.report

    @property
    def guests(self) -> dict[int, Guest]:
        return self.lab.guests

    def guest(self, level: int) -> Guest:
        """The running guest at `level`; a test that cannot have it is skipped with the reason."""
        try:
            return self.lab.guest(level)
        except LevelUnavailable as exc:
            pytest.skip(str(exc))

    def progress(self, message: str) -> None:
        """A line on the terminal now, also while pytest captures output (guests boot inside tests)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(f"nestedkvm: {message}")

    # -- hooks -----------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        """The plan with -v (it runs `qemu --version`); otherwise it is printed when a guest is first used."""
        if config.get_verbosity() < 1:
            return []
        try:
            return [f"nestedkvm: {line}" for line in self.lab.plan_lines()]
        except NestedKvmError as exc:
            return [f"nestedkvm: {exc}"]

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
                trouble = trouble_of(report)
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
            item.stash[RERUNS_KEY] = list(faults)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            fault = next((r for r in reports if r.failed and _emulator_fault(r)), None)
            trouble = trouble_of(fault) if fault is not None else None
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
            # The whole chain, not only the level at fault: a guest that printed stalls but answered
            # can be what kept its child from booting (CI: L2 lost its timer, L3 never answered),
            # and a parent that slow may not even have stopped that child's QEMU yet.
            self.lab.stop_from(1)
            _forget_failed_fixtures(item)
        hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.lab.boot_failures.clear()  # a boot that fails from here on is this test's
        levels = levels_used(item)
        if not levels or not_run(item):
            return
        reported(self._setup_levels, item, levels)

    def _setup_levels(self, item: pytest.Item, levels: list[int]) -> None:
        item.user_properties.extend(self.lab.properties)  # JUnit XML: what ran this test
        for level in levels:
            reason = self.lab.unavailable_reason(level)
            if reason:
                pytest.skip(reason)
        if item.get_closest_marker("nested_fresh"):
            for level in levels:
                self.lab.stop_from(level)
        if levels[-1] >= 1:
            # Booted here (the deepest with the levels above it), not in the fixture: a boot that
            # fails is this test's error, not one that a session-scoped fixture caches for every
            # later test. A guest an earlier test crashed or wedged comes back pristine.
            try:
                self.lab.guest(levels[-1])
            except LevelUnavailable as exc:  # found only once the parent runs (a disk image without QEMU)
                pytest.skip(str(exc))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        if self.guests:
            self.marks_made += 1
            item.stash[MARKS] = mark(self.guests, self.marks_made, self.settings.artifacts is not None)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        marks = item.stash.get(MARKS, {}) if call.when == "call" else {}
        trouble = trouble_since(self.guests, marks) if marks else None
        if trouble is not None:
            # Blame this test: the crash happened while it ran. The next test gets a fresh guest.
            item.stash[TROUBLE_KEY] = trouble
            setattr(report, REPORT_ATTRIBUTE, trouble.as_dict())
            report.outcome = "failed"
            report.longrepr = trouble.headline
            report.sections.append((f"L{trouble.level} console during this test", trouble.console[-20000:]))
        elif report.failed and call.when in ("setup", "call") and self.lab.boot_failures:
            guest, error = self.lab.boot_failures[0]  # a guest this test needed did not boot
            trouble = forensics.boot_trouble(evidence_of(guest), error)
            item.stash[TROUBLE_KEY] = trouble
            setattr(report, REPORT_ATTRIBUTE, trouble.as_dict())
        reruns = item.stash.get(RERUNS_KEY, None)
        if reruns:
            setattr(report, RERUNS_ATTRIBUTE, [t.as_dict() for t in reruns])
        if report.failed and call.when in ("setup", "call") and self.settings.artifacts and self.guests:
            report.sections.append(artifacts.report_section(self.settings.artifacts, item.nodeid, self.guests, marks))
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self) -> Generator[None, None, None]:
        worker_output = getattr(self.config, "workeroutput", None)  # on a pytest-xdist worker; sent in this hook
        if worker_output is not None and self.lab.in_use:
            worker_output[PLAN_OUTPUT] = self.lab.plan_lines()
        try:
            return (yield)
        finally:
            self.lab.close()  # after the session's fixtures are torn down: the one place guests stop


def uses_guests(item: pytest.Item) -> bool:
    """The test asks for a guest: a level fixture, the nested marker, or the nested_guest factory."""
    return bool(levels_used(item)) or "nested_guest" in getattr(item, "fixturenames", ())


def _emulator_fault(report: pytest.TestReport) -> bool:
    trouble = trouble_of(report)
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


def not_run(item: pytest.Item) -> bool:
    """An unconditional xfail(run=False) (a known failure that hangs): pytest's skipping plugin,
    whose setup hook comes after this plugin's, ends it unrun, so booting a guest for it is waste."""
    return not item.config.option.runxfail and any(
        mark.kwargs.get("run", True) is False and not mark.args and mark.kwargs.get("condition", True) is True
        for mark in item.iter_markers("xfail"))


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
