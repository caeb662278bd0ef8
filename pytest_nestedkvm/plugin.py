"""pytest hooks only: options and ini keys, markers, settings; the session object does the rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import hookspecs
from . import suite_items as suites
from .base.errors import ConfigError, HostError
from .base.host import HostReport, probe
from .boot.initramfs import find_kernel
from .boot.qemu import GuestSpec
from .boot.view import unshareable
from .config.settings import OPTIONS, Settings
from .fixtures import l0, l1, l2, nested_guest
from .session import SESSION_KEY, SESSION_PLUGIN, NestedSession

__all__ = ["l0", "l1", "l2", "nested_guest"]


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_nestedkvm_guest_spec(config: pytest.Config, level: int, spec: GuestSpec) -> GuestSpec:
    """The plugin's own answer, after every user's: the built-in guest as it is."""
    return spec


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
    settings = configured_settings(config)
    session = NestedSession(settings, config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, SESSION_PLUGIN)
    suites.register(config, settings)  # --nested-kut / --nested-kselftests items, when set


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--nested-shard: keep this run's share of the tests, deselecting the rest.

    Last, after -k, -m, --deselect and any reordering: a test's share depends on its node id
    alone, so the order of the hooks changes nothing in what runs, and running last means each
    test another filter already dropped is not reported as deselected a second time. Under
    pytest-xdist every worker collects and picks the same share, so it composes with -n.
    """
    settings = config.stash[SESSION_KEY].settings
    if settings.shard is None:
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (kept if settings.in_shard(item.nodeid) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def configured_settings(config: pytest.Config) -> Settings:
    """The settings, validated once; any bad value is a UsageError that names its source.

    The host is read here (files only, no process) so that an accelerator, CPU model, vCPU
    count or memory size the host or the kernel contradicts is refused before any test runs.
    """
    host_cpus = len(os.sched_getaffinity(0))
    try:
        settings = Settings.from_sources(
            {o.name: config.getoption(o.dest) for o in OPTIONS},
            ini={o.name: str(config.getini(o.ini)) for o in OPTIONS},
            host_memory_mib=_host_memory_mib(), host_cpus=host_cpus,
        )
        report = _host_plan(settings)
        settings.check_host_plan(accel=report.accel, host_cpus=host_cpus, default_kernel=_default_kernel)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    reason = unshareable(config.rootpath, project=True)  # the built-in guests see the project
    if reason is not None:
        raise pytest.UsageError(f"pytest's rootdir {config.rootpath}: {reason}: run pytest from a project "
                                "directory (or give --rootdir one)")
    return settings


def _host_plan(settings: Settings) -> HostReport:
    try:
        return probe(accel=settings.accel, cpu=settings.cpu)
    except ConfigError as exc:  # the plan contradicts the accelerator or CPU the user asked for
        culprit = exc.option or "accel"
        raise ConfigError(f"--nested-{culprit}={getattr(settings, culprit)} (from "
                          f"{settings.describe_source(culprit)}): {exc}", option=culprit) from None


def _default_kernel() -> Path | None:
    """The kernel the built-in guest boots without --nested-kernel (reads /boot only); None when
    there is none, which is reported when a guest is wanted."""
    try:
        return find_kernel().path
    except HostError:
        return None


def _host_memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None
