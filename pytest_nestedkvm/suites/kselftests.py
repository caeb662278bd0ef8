"""KVM selftests: which binaries are tests, their timeout, and what an exit status and KTAP output mean.

Pure, except the functions that read the tree. The meaning follows the kselftest runner
(tools/testing/selftests/kselftest/runner.sh): the test runs in its own directory with
stderr joined to stdout, exit 0 is a pass, 4 (KSFT_SKIP) a skip, anything else a failure;
the directory's `settings` file may set `timeout=` (45 s without one).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..base.host import read_text_or_none
from . import ktap
from .kut import Verdict

KSFT_SKIP = 4
DEFAULT_TIMEOUT = 45.0  # runner.sh: kselftest_default_timeout
LIST_FILE = "kselftest-list.txt"  # what `make install` writes at the top of an installed tree
_ELF_PROGRAMS = (2, 3)  # e_type ET_EXEC, ET_DYN: a linked program, not an object file (ET_REL)


@dataclass(frozen=True)
class SelftestTree:
    """Where the tests are (`root`), and each test as its path relative to it."""

    root: Path
    tests: tuple[str, ...]


def discover(path: Path) -> SelftestTree:
    """The tests of a built tools/testing/selftests/kvm directory, or of an installed kselftest tree
    (its kselftest-list.txt, collection kvm); ValueError when there are none."""
    if (path / LIST_FILE).is_file() and (path / "kvm").is_dir():
        listed = [line.strip().partition(":")[2] for line in (path / LIST_FILE).read_text().splitlines()
                  if line.strip().startswith("kvm:")]
        tests = tuple(name for name in listed if _is_program(path / "kvm" / name))
        root = path / "kvm"
    else:
        root = path
        tests = tuple(sorted(str(p.relative_to(path)) for p in _programs(path)))
    if not tests:
        raise ValueError(f"{path} holds no KVM selftest binaries: run make in tools/testing/selftests/kvm "
                         "(or pass an installed kselftest tree that has kvm/)")
    return SelftestTree(root, tests)


def _programs(path: Path) -> list[Path]:
    found = []
    for directory, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in ("lib", "include") and not d.startswith("."))
        found += [Path(directory) / name for name in filenames if _is_program(Path(directory) / name)]
    return found


def _is_program(path: Path) -> bool:
    """An executable ELF program (tests are; objects, archives, sources and scripts are not)."""
    try:
        if not path.is_file() or not os.access(path, os.X_OK):
            return False
        with path.open("rb") as f:
            head = f.read(18)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") in _ELF_PROGRAMS


def timeout_seconds(root: Path) -> float:
    """The runner's timeout: `timeout=` in the settings file of the collection directory (kvm/, not
    its subdirectories), else 45 s."""
    return parse_settings_timeout(read_text_or_none(root / "settings"))


def parse_settings_timeout(text: str | None) -> float:
    if text is None:
        return DEFAULT_TIMEOUT
    value = DEFAULT_TIMEOUT
    for line in text.splitlines():
        key, eq, raw = line.strip().partition("=")
        if eq and key.strip() == "timeout" and not line.lstrip().startswith("#"):
            if not re.fullmatch(r"\d+", raw.strip()):
                raise ValueError(f"settings: timeout={raw.strip()!r} is not a whole number of seconds")
            value = float(raw.strip())
    return value


def guest_command(root: Path, test: str) -> str:
    """Run the test as the runner does: from its directory, stderr joined to stdout."""
    directory, name = os.path.split(test)
    where = root / directory if directory else root
    return f"cd {shlex.quote(str(where))} && ./{shlex.quote(name)} 2>&1"


@dataclass(frozen=True)
class SelftestResult:
    """One selftest's verdict and why, with its parsed KTAP output."""

    verdict: Verdict
    message: str
    report: ktap.Report


def outcome(test: str, status: int | None, output: str, timeout: float) -> SelftestResult:
    """The runner's verdict from the exit status (None: killed at `timeout`), explained from the KTAP
    output: the skip's reason, the failed subtests, the assertion the test printed."""
    report = ktap.parse(output)
    if status == 0:
        return SelftestResult("passed", f"ok {test}", report)
    if status == KSFT_SKIP:
        reason = report.skip_reason or _last_line(output) or "exit status 4 (KSFT_SKIP)"
        return SelftestResult("skipped", f"{test}: SKIP {reason}", report)
    head = f"{test}: TIMEOUT {timeout:g} seconds, killed" if status is None else f"{test}: exit={status}"
    details = [f"failed subtests: {'; '.join(r.line for r in report.failed)}"] if report.failed else []
    if report.bail_out:
        details.append(f"Bail out! {report.bail_out}")
    assertion = _assertion(output)
    if assertion:
        details.append(assertion)
    return SelftestResult("failed", "; ".join([head, *details]), report)


def _assertion(output: str) -> str:
    """The first lines of a `==== Test Assertion Failure ====` block (kvm selftests' TEST_ASSERT)."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if "Test Assertion Failure" in line:
            body = [x.strip() for x in lines[index + 1:index + 6] if x.strip() and not x.strip().startswith("0x")]
            return " ".join(body[:3])
    return ""


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def properties(report: ktap.Report) -> list[tuple[str, str]]:
    """One JUnit property per KTAP result: `ktap <number> <name>` -> status (and reason)."""
    props = []
    for result in report.results:
        indent = "  " * result.depth
        value = result.status + (f": {result.reason}" if result.reason else "")
        props.append((f"ktap {indent}{result.number} {result.name}".rstrip(), value))
    return props
