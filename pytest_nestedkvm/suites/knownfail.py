"""The known-failure list of the hypervisor suites: one file, one reason per entry.

    # comments and blank lines are ignored
    kut:msr                  Expected #GP on WRMSR(MSR_FS_BASE, non-canonical) is not raised under TCG
    kselftests:x86_64/amx_test   TCG has no AMX
    xtf:test-hvm64-lbr-tsx-vmentry   no LBR under TCG
    xtf:test-hvm32pae-*              hangs: spins at its first CPUID under TCG

Each entry is `<suite>:<test name>`, whitespace, then the reason (required). The name may be a
shell pattern (`*`, `?`, `[...]`); a test's own entry wins over a pattern, and of two patterns
the first in the file. A listed test that fails or times out is an xfail with that reason; one
that passes is an XPASS. A reason that starts with `hangs:` is an xfail that is not run at all:
a test known to hang would only cost its timeout. A listed test whose guest does not boot,
crashes or stops answering is not an xfail: that is an error of the guests, not the known failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

SuiteName = Literal["kut", "kselftests", "xtf"]
SUITES: tuple[SuiteName, ...] = ("kut", "kselftests", "xtf")
HANGS = "hangs:"  # a reason that starts so: the test is not run


@dataclass(frozen=True)
class Entry:
    reason: str
    line: int  # where it is in the file, for the xfail reason

    @property
    def run(self) -> bool:
        """False for a test known to hang: its xfail is not run."""
        return not self.reason.startswith(HANGS)


@dataclass(frozen=True)
class KnownFailures:
    path: Path
    entries: Mapping[tuple[str, str], Entry] = field(default_factory=dict)  # (suite, name) -> entry

    def lookup(self, suite: SuiteName, name: str) -> Entry | None:
        """The test's own entry, else the first pattern (in file order) that matches its name."""
        exact = self.entries.get((suite, name))
        if exact is not None:
            return exact
        return next((entry for (listed, pattern), entry in self.entries.items()
                     if listed == suite and fnmatchcase(name, pattern)), None)

    def __str__(self) -> str:  # how settings show the value in an error message
        return str(self.path)


def parse(text: str, path: Path) -> KnownFailures:
    """The entries of a known-failure file; ValueError names the first bad line and how to fix it."""
    entries: dict[tuple[str, str], Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split(None, 1)
        reason = rest[0].strip() if rest else ""
        suite, colon, name = key.partition(":")
        where = f"{path}:{number}"
        if not colon or suite not in SUITES or not name:
            raise ValueError(f"{where}: {key!r} is not <suite>:<test name> with suite one of "
                             f"{', '.join(SUITES)}: write e.g. 'kut:msr <reason>'")
        if not reason or reason.removeprefix(HANGS).strip() == "":
            raise ValueError(f"{where}: {key} has no reason: write why it fails after the name"
                             + (f" (and after '{HANGS}')" if reason else ""))
        if (suite, name) in entries:
            raise ValueError(f"{where}: {key} is listed twice (first on line {entries[suite, name].line}): "
                             "keep one entry")
        entries[suite, name] = Entry(reason, number)
    return KnownFailures(path, entries)


def load(path: Path) -> KnownFailures:
    return parse(path.read_text(encoding="utf-8"), path)
