"""Generated pytest suites run through the plugin as real pytest sessions (for run_all.py, xdist_scaling.py)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

TEST_FILE = '''\
import pytest

CHECKS = {checks!r}


@pytest.mark.parametrize("command", list(CHECKS.values()), ids=list(CHECKS))
def test_check(l1, command):
    l1.succeed(command)
'''


@dataclass(frozen=True)
class SuiteRun:
    seconds: float  # wall time of the whole pytest process: start, collection, guest boots, tests, teardown
    tests: int
    passed: int
    output_tail: str


def write_suite(directory: Path, checks: dict[str, str]) -> None:
    """One test per check (id -> shell command that must exit 0 in L1), each `l1.succeed(command)`."""
    (directory / "pytest.ini").write_text("[pytest]\n")  # pins the rootdir: no ini from outside applies
    (directory / "test_generated.py").write_text(TEST_FILE.format(checks=checks))


def run_suite(directory: Path, *pytest_args: str) -> SuiteRun:
    report = directory / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junit-xml={report}", *pytest_args]
    # Plugin defaults, as in the in-process benchmarks: no NESTEDKVM_* from the caller's environment.
    env = {key: value for key, value in os.environ.items() if not key.startswith("NESTEDKVM_")}
    started = time.monotonic()
    done = subprocess.run(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.monotonic() - started
    tests = passed = 0
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            tests += int(suite.get("tests", 0))
            passed += int(suite.get("tests", 0)) - sum(int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        report.unlink()
    return SuiteRun(seconds, tests, passed, (done.stdout + done.stderr)[-2000:])


def machine() -> dict[str, str]:
    """What ran the figures: cores, CPU model, host name, load average now."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": model.group(1) if model else platform.processor(),
            "host": platform.node(), "host_kernel": platform.release(), "load": load()}


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
