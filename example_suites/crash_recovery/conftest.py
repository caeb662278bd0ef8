"""`@pytest.mark.expect_crash(level=N)`: this test panics LN on purpose.

The plugin fails the test during which a guest crashed, with a headline such as
`L1 kernel panic during this test: ...` (that is what a hypervisor under test
crashing its guest should cost), and offers what it saw as `trouble_of(report)`:
the level, the kind of trouble, the headline and the console. A test whose job is to panic the guest says so
with this marker, and then passes only if exactly that happened:

- the plugin blamed a kernel panic of LN on it, and the test itself raised nothing:
  passed, the headline kept in an "expected crash" report section;
- no panic of LN was seen: failed ("expected L1 to panic during this test ...");
- anything else (the test's own assertion, another level crashing): failed as usual.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from pytest_nestedkvm import trouble_of


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expect_crash(level=1): the test panics guest LN on purpose; it passes "
                                       "only if the plugin saw that panic during the test")


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees the report after the plugin judged the test
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    marker = item.get_closest_marker("expect_crash")
    if marker is None or call.when != "call":
        return report
    level = int(marker.kwargs.get("level", 1))
    trouble = trouble_of(report)  # what the plugin blamed on this test, if anything
    expected = trouble is not None and trouble.level == level and trouble.kind == "kernel panic"
    if report.failed and expected and call.excinfo is None:
        assert trouble is not None
        report.sections.append(("expected crash", trouble.headline))
        report.outcome = "passed"
        report.longrepr = None
    elif report.passed:
        report.outcome = "failed"
        report.longrepr = f"expected L{level} to panic during this test (@pytest.mark.expect_crash), but it did not"
    return report
