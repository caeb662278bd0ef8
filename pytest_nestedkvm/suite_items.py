"""kvm-unit-tests, KVM selftests and XTF tests as pytest items that run inside a guest.

Each test of `--nested-kut` / `--nested-kselftests` / `--nested-xtf` is an item carrying the marker
`nested(level=N)`, so the session treats it like any test that uses a guest: skipped when
the level cannot be had, the guest booted again when an earlier test crashed it, a crash
during the test blamed on it. The item runs the suite's own runner step for its test in
that guest and turns the verdict into passed / skipped / failed; the test's output is a
report section. Known failures (`--nested-known-failures`) are xfail markers.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import pytest

from .base.deadline import SUITE_BACKSTOP
from .base.errors import CommandTimeout
from .base.host import Accel
from .config.plan import scaled_timeout, timeout_note
from .config.settings import Settings
from .machine.channel import CommandResult
from .machine.guest import Guest
from .session import SESSION_KEY, NestedSession, reported
from .suites import kselftests, kut, xtf
from .suites.knownfail import SuiteName

SUITES_PLUGIN = "nestedkvm-suites"
SECTION_LIMIT = 100_000  # characters of a test's log kept in its report section


class SuiteFailure(Exception):
    """The suite's verdict was a failure: the message says which, the log is a report section."""


class SuiteItem(pytest.Item):
    """One test of a suite, run inside the guest at `level`."""

    suite: SuiteName = "kut"

    def __init__(self, *, level: int, location: tuple[Path, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.level = level
        self.source, self.lineno = location
        self.log: str | None = None
        self.add_marker(pytest.mark.nested(level=level))
        self.add_marker(self.suite)

    @property
    def nested(self) -> NestedSession:
        return self.config.stash[SESSION_KEY]

    def runtest(self) -> None:
        guest = reported(self.nested.guest, self.level)
        reported(self.run_in, guest)

    def run_in(self, guest: Guest) -> None:
        raise NotImplementedError

    def keep_log(self, text: str) -> None:
        self.log = text if len(text) <= SECTION_LIMIT else "...\n" + text[-SECTION_LIMIT:]

    def keep_output(self, stdout: str, stderr: str) -> None:
        """The runner's output as the log, its stderr (when any) after a separator line."""
        self.keep_log(stdout + (f"\n--- stderr ---\n{stderr}" if stderr.strip() else ""))

    def run_runner(self, guest: Guest, command: str, limit: float, base: float) -> CommandResult:
        """The suite's runner `command` in `guest`, its output kept as the log; a failure that says so
        where it outlived `limit` (the channel killed it; `base` is the suite's own timeout)."""
        try:
            result = guest.run(command, timeout=limit)
        except CommandTimeout as exc:
            self.keep_log(_text(exc.stdout) + _text(exc.stderr))
            raise SuiteFailure(f"FAIL {self.name} (did not end within {limit:g} s and was killed; "
                               f"timeout {self.scaling_note(base)})") from None
        self.keep_output(result.stdout, result.stderr)
        return result

    def timeout_for(self, seconds: float) -> float:
        """The suite's own timeout scaled to this host's pace and the level, kept as a JUnit property."""
        timeout = scaled_timeout(seconds, self.pace, self.level)
        self.user_properties.append(("timeout_s", f"{timeout:g}"))
        return timeout

    def scaling_note(self, seconds: float) -> str:
        return timeout_note(seconds, self.pace, self.level)

    @property
    def pace(self) -> Accel:
        return self.nested.report.pace  # KVM on an emulated CPU is TCG's pace

    def conclude(self, verdict: kut.Verdict, message: str, note: str = "") -> None:
        """The suite's verdict as pytest's: a pass returns, a skip skips, a failure raises with `note` added."""
        if verdict == "skipped":
            skip(message)
        if verdict == "failed":
            raise SuiteFailure(message + note)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SuiteFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int, str]:  # a line is needed for skips at the item
        return self.source, self.lineno, f"{self.suite}: {self.name}"


class KutItem(SuiteItem):
    suite: SuiteName = "kut"

    def __init__(self, *, test: kut.UnitTest, tree: Path, config_mak: dict[str, str], **kwargs: Any) -> None:
        self.test, self.tree, self.config_mak = test, tree, config_mak
        super().__init__(**kwargs)
        for group in test.groups:
            self.add_marker(group)

    def run_in(self, guest: Guest) -> None:
        test = self.test
        reason = kut.static_skip(test, self.config_mak, self.tree)
        if reason is not None:
            skip(f"SKIP {test.name} ({reason})")
        facts = kut.parse_probe(test, self.level, guest.succeed(kut.probe_command(test, self.tree)))
        reason = kut.guest_skip(test, facts)
        if reason is not None:
            skip(f"SKIP {test.name} ({reason})")
        base = kut.timeout_seconds(test)
        timeout = self.timeout_for(base)
        command = kut.guest_command(self.tree, kut.command_line(test, self.config_mak, timeout), facts.cpus)
        # x86/run's timeout(1) ends QEMU at `timeout`; the channel's own limit is the backstop for a
        # runner that hangs around it (QEMU probes, a stuck kill), and kills everything left.
        backstop = timeout + scaled_timeout(SUITE_BACKSTOP, self.pace, self.level)
        result = self.run_runner(guest, command, backstop, base)
        verdict = kut.outcome(test, result.exit_status, result.stdout, result.stderr, timeout)
        self.conclude(verdict.verdict, verdict.message,
                      f"; timeout {self.scaling_note(base)}" if result.exit_status == 124 else "")


class KselftestItem(SuiteItem):
    suite: SuiteName = "kselftests"

    def __init__(self, *, root: Path, **kwargs: Any) -> None:
        self.root = root
        super().__init__(**kwargs)

    def run_in(self, guest: Guest) -> None:
        base = kselftests.timeout_seconds(self.root)
        timeout = self.timeout_for(base)
        status: int | None
        try:
            result = guest.run(kselftests.guest_command(self.root, self.name), timeout=timeout)
            status, output = result.exit_status, result.stdout + result.stderr
        except CommandTimeout as exc:  # killed where it could be; else the channel broke and the guest is replaced
            status, output = None, _text(exc.stdout) + _text(exc.stderr)
        self.keep_log(output)
        verdict = kselftests.outcome(self.name, status, output, timeout)
        self.user_properties.extend(kselftests.properties(verdict.report))
        self.conclude(verdict.verdict, verdict.message, f" ({self.scaling_note(base)})" if status is None else "")


class XtfItem(SuiteItem):
    """An XTF test instance, run by XTF's runner as a domU of the Xen L1 (dom0 runs the runner)."""

    suite: SuiteName = "xtf"

    def __init__(self, *, instance: xtf.Instance, tree: Path, **kwargs: Any) -> None:
        self.instance, self.tree = instance, tree
        super().__init__(**kwargs)
        self.add_marker(instance.marker)

    def run_in(self, guest: Guest) -> None:
        timeout = self.timeout_for(xtf.TIMEOUT)
        result = self.run_runner(guest, xtf.guest_command(self.tree, self.name), timeout, xtf.TIMEOUT)
        verdict = xtf.outcome(self.name, result.exit_status, result.stdout + result.stderr)
        self.conclude(verdict.verdict, verdict.message)


class SuiteCollector(pytest.Collector):
    """The tests of one suite, children of the session (they live outside the test paths)."""

    def __init__(self, *, items: list[dict[str, Any]], item_class: type[SuiteItem], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item_specs, self.item_class = items, item_class

    def collect(self) -> Iterable[pytest.Item]:
        for spec in self.item_specs:
            yield self.item_class.from_parent(self, **spec)


class SuitesPlugin:
    """Collects the suites' items and keeps their logs; registered only when a suite is configured."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.settings = settings
        config.addinivalue_line("markers", "kut: a kvm-unit-tests test (--nested-kut)")
        config.addinivalue_line("markers", "kselftests: a KVM selftest (--nested-kselftests)")
        config.addinivalue_line("markers", "xtf: an XTF test instance (--nested-xtf)")
        self.kut_tests = kut.load(settings.kut) if settings.kut is not None else []
        for group in sorted({g for test in self.kut_tests for g in test.groups}):
            config.addinivalue_line("markers", f"{group}: kvm-unit-tests group {group} (unittests.cfg groups)")
        self.xtf_tests = xtf.discover(settings.xtf) if settings.xtf is not None else []
        for marker in sorted({(i.marker, i.category) for i in self.xtf_tests}):
            config.addinivalue_line("markers", f"{marker[0]}: XTF category {marker[1]} (info.json)")

    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        """Without test paths on the command line or in `testpaths`, run the suites only: pytest would
        otherwise import every test_*.py / *_test.py below the current directory (a kernel tree)."""
        if config.args_source == pytest.Config.ArgsSource.INVOCATION_DIR:
            return True
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        """Add the suites' items before -k, -m, --deselect and --nested-shard look at the list."""
        for collector in self._collectors(session):
            ihook = collector.ihook
            ihook.pytest_collectstart(collector=collector)
            report = ihook.pytest_make_collect_report(collector=collector)
            ihook.pytest_collectreport(report=report)  # counted in "collected N items", errors included
            if report.passed:
                items.extend(node for node in report.result if isinstance(node, pytest.Item))
        self._mark_known_failures(items)

    def _collectors(self, session: pytest.Session) -> list[SuiteCollector]:
        settings, collectors = self.settings, []
        if settings.kut is not None:
            tree, cfg = settings.kut, settings.kut / kut.CONFIG
            config_mak = kut.read_config_mak(tree)
            specs = [dict(name=t.name, level=settings.kut_level, location=(cfg, t.line - 1), test=t, tree=tree,
                          config_mak=config_mak) for t in self.kut_tests]
            collectors.append(SuiteCollector.from_parent(session, name="kut", nodeid="kut", path=tree,
                                                         items=specs, item_class=KutItem))
        if settings.kselftests is not None:
            suite = kselftests.discover(settings.kselftests)
            specs = [dict(name=name, level=settings.kselftests_level, location=(suite.root / name, 0),
                          root=suite.root) for name in suite.tests]
            collectors.append(SuiteCollector.from_parent(session, name="kselftests", nodeid="kselftests",
                                                         path=settings.kselftests, items=specs,
                                                         item_class=KselftestItem))
        if settings.xtf is not None:
            specs = [dict(name=i.name, level=1, location=(i.info, 0), instance=i, tree=settings.xtf)
                     for i in self.xtf_tests]
            collectors.append(SuiteCollector.from_parent(session, name="xtf", nodeid="xtf", path=settings.xtf,
                                                         items=specs, item_class=XtfItem))
        return collectors

    def _mark_known_failures(self, items: list[pytest.Item]) -> None:
        known = self.settings.known_failures
        if known is None:
            return
        for item in items:
            if isinstance(item, SuiteItem):
                entry = known.lookup(item.suite, item.name)
                if entry is not None:
                    reason = f"known failure ({known.path.name}:{entry.line}): {entry.reason}"
                    # raises=: only the suite's own verdict is absorbed; a guest that did not boot,
                    # crashed or lost its channel is the error it is.
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=False, raises=SuiteFailure,
                                                      run=entry.run))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if isinstance(item, SuiteItem) and call.when == "call" and item.log is not None:
            if not report.passed or hasattr(report, "wasxfail"):  # a pass's log is noise; an XPASS's is not
                report.sections.append((f"{item.suite} {item.name} log (L{item.level})", item.log))
        return report


def register(config: pytest.Config, settings: Settings) -> None:
    """Register the suites plugin when a suite is configured (nothing changes otherwise)."""
    if settings.suite_dirs():
        config.pluginmanager.register(SuitesPlugin(config, settings), SUITES_PLUGIN)


def skip(reason: str) -> None:
    """Skip, reported at the test's own location (its unittests.cfg section, its binary), not this file's."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
