"""pytest hooks only: options and ini keys, markers, report header, skips, teardown."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Generator
from pathlib import Path

import pytest

from . import artifacts, hookspecs
from .errors import ConfigError, NestedKvmError
from .fixtures import POOL_KEY, l0, l1, l2, nested_guest, reported
from .host import enable_nested, find_qemu, probe
from .pool import GuestPool, Hooks, Mark
from .qemu import GuestSpec
from .settings import OPTIONS, Settings

__all__ = ["l0", "l1", "l2", "nested_guest"]

MARKS = pytest.StashKey[dict[int, Mark]]()
# Fixture name -> the guest level it needs.
LEVEL_FIXTURES = {"l1": 1, "l2": 2}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_nestedkvm_guest_spec(config: pytest.Config, level: int, spec: GuestSpec) -> GuestSpec:
    """The plugin's own answer, after every user's: the built-in guest as it is."""
    return spec


def _user_hooks(config: pytest.Config) -> Hooks:
    hook = config.hook
    return Hooks(
        guest_spec=lambda level, spec: hook.pytest_nestedkvm_guest_spec(config=config, level=level, spec=spec),
        qemu_argv=lambda spec, argv: hook.pytest_nestedkvm_qemu_argv(config=config, spec=spec, argv=argv),
        guest_ready=lambda guest: hook.pytest_nestedkvm_guest_ready(config=config, guest=guest),
        guest_teardown=lambda guest: hook.pytest_nestedkvm_guest_teardown(config=config, guest=guest),
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nestedkvm", "nested KVM guests (pytest-nestedkvm)")
    for option in OPTIONS:
        text = f"{option.help} [ini {option.ini}, env {option.env}]"
        if option.flag:
            group.addoption(option.cli, dest=option.dest, action="store_const", const="1", default=None, help=text)
        else:
            group.addoption(option.cli, dest=option.dest, default=None, metavar=option.metavar, help=text)
        parser.addini(option.ini, option.help, default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nested(level=N): the test needs guest level N; skipped, with the reason, when the session "
        "or the host cannot provide it")
    config.addinivalue_line("markers", "nested_fresh: the test starts on freshly booted guests")
    try:
        settings = Settings.from_sources(
            {o.name: config.getoption(o.dest) for o in OPTIONS},
            ini={o.name: str(config.getini(o.ini)) for o in OPTIONS},
            host_memory_mib=_host_memory_mib(), host_cpus=len(os.sched_getaffinity(0)),
        )
        arch = platform.machine()
        try:
            report = probe(accel=settings.accel, cpu=settings.cpu, qemu=find_qemu(arch), arch=arch)
        except ConfigError as exc:  # the plan contradicts the accelerator or CPU the user asked for
            culprit = "cpu" if settings.cpu and "cpu" in str(exc) else "accel"
            value = getattr(settings, culprit)
            raise ConfigError(f"--nested-{culprit}={value} (from {settings.describe_source(culprit)}): {exc}") from None
        if settings.enable and report.kvm_backend in ("kvm_intel", "kvm_amd") and report.nested is False:
            for line in enable_nested(report):
                print(f"nestedkvm: {line}")
            report = probe(accel=settings.accel, cpu=settings.cpu, qemu=report.qemu, arch=arch)
    except NestedKvmError as exc:
        raise pytest.UsageError(str(exc)) from None

    def progress(message: str) -> None:
        # Looked up when used: the terminal reporter registers after this hook may have run.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or config.get_verbosity() < 0:
            return
        capture = config.pluginmanager.get_plugin("capturemanager")  # guests boot while output is captured
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(f"nestedkvm: {message}")

    config.stash[POOL_KEY] = GuestPool(settings, report, progress, _user_hooks(config))


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(POOL_KEY, None)
    if pool is not None:
        pool.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    pool = config.stash.get(POOL_KEY, None)
    if pool is None:
        return []
    return [*pool.report.summary_lines(), f"nestedkvm: levels {pool.settings.levels}"]


def _levels_used(item: pytest.Item) -> list[int]:
    levels = [level for name, level in LEVEL_FIXTURES.items() if name in getattr(item, "fixturenames", ())]
    marker = item.get_closest_marker("nested")
    if marker is not None:
        levels.append(int(marker.kwargs.get("level", marker.args[0] if marker.args else 1)))
    return sorted(set(levels))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    pool = item.config.stash[POOL_KEY]
    levels = _levels_used(item)
    if levels:
        item.user_properties.extend(pool.properties)  # JUnit XML: what ran this test
    for level in levels:
        reason = pool.skip_reason(level)
        if reason:
            pytest.skip(reason)
    if item.get_closest_marker("nested_fresh"):
        for level in levels:
            pool.restart(level)
    for level in levels:
        reported(pool.restore, level)  # a guest an earlier test crashed comes back pristine


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[MARKS] = item.config.stash[POOL_KEY].mark()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    pool = item.config.stash[POOL_KEY]
    marks = item.stash.get(MARKS, {}) if call.when == "call" else {}
    trouble = pool.trouble_since(marks) if marks else None
    if trouble is not None:
        # Blame this test: the crash happened while it ran. The next test gets a fresh guest.
        report.outcome = "failed"
        report.longrepr = trouble.headline
        report.sections.append((f"L{trouble.level} console during this test", trouble.console[-20000:]))
    if report.failed and call.when in ("setup", "call") and pool.settings.artifacts and pool.guests:
        kept = artifacts.save(artifacts.directory_for(pool.settings.artifacts, item.nodeid), pool, marks)
        report.sections.append(("nestedkvm artifacts", str(kept)))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    yield
    pool = session.config.stash.get(POOL_KEY, None)
    if pool is not None:
        pool.close()


def _host_memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None
