"""KTAP / TAP 13 output of kernel selftests: plan, results and directives, nesting by indentation.

What `tools/testing/selftests/kselftest.h` prints: `TAP version 13`, `1..N` (or
`1..0 # SKIP reason` when the whole test skips), `ok N name`, `not ok N name`,
`ok N # SKIP reason`, `ok N # XFAIL name`, `not ok N # error name`, `Bail out! msg`,
and `# ...` diagnostics. Subtests of the kselftest harness are indented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Status = Literal["pass", "fail", "skip", "xfail", "xpass", "error", "timeout"]

_RESULT = re.compile(r"^(?P<not>not )?ok (?P<number>\d+)\b\s*(?:-\s*)?(?P<rest>.*)$")
_PLAN = re.compile(r"^1\.\.(?P<count>\d+)\s*(?:#\s*(?P<directive>.*))?$")


@dataclass(frozen=True)
class Result:
    """One `ok`/`not ok` line: its number, name, status, the directive's text and its nesting depth."""

    number: int
    name: str
    status: Status
    reason: str = ""  # the text after `# SKIP`, `# TIMEOUT`, ...
    depth: int = 0  # 0 for the test's own lines; subtests are indented

    @property
    def line(self) -> str:
        word = "ok" if self.status in ("pass", "skip", "xfail") else "not ok"
        return f"{word} {self.number} {self.name}".rstrip()


@dataclass(frozen=True)
class Report:
    """Everything the parser found in one test's output."""

    planned: int | None
    plan_skip: str | None  # `1..0 # SKIP reason`: the test skipped as a whole
    results: tuple[Result, ...]
    bail_out: str | None

    @property
    def failed(self) -> tuple[Result, ...]:
        return tuple(r for r in self.results if r.status in ("fail", "error", "xpass", "timeout"))

    @property
    def skip_reason(self) -> str | None:
        """Why the test skipped, as it said: the plan's SKIP directive, else the first skipped result's."""
        if self.plan_skip is not None:
            return self.plan_skip
        return next((r.reason or r.name for r in self.results if r.status == "skip"), None)


def parse(text: str) -> Report:
    """Parse KTAP/TAP lines; anything else (diagnostics, the test's own prints) is ignored."""
    planned: int | None = None
    plan_skip: str | None = None
    bail_out: str | None = None
    results: list[Result] = []
    for raw in text.splitlines():
        stripped = raw.rstrip("\r").lstrip(" \t")
        depth = (len(raw) - len(raw.lstrip(" \t"))) // 2
        if stripped.startswith("Bail out!"):
            bail_out = bail_out or stripped.removeprefix("Bail out!").strip()
            continue
        plan = _PLAN.match(stripped)
        if plan is not None:
            if depth == 0 and planned is None:
                planned = int(plan.group("count"))
                directive = plan.group("directive") or ""
                if directive[:4].upper() == "SKIP":
                    plan_skip = _clean(directive[4:])
            continue
        result = _result(stripped, depth)
        if result is not None:
            results.append(result)
    return Report(planned, plan_skip, tuple(results), bail_out)


def _result(line: str, depth: int) -> Result | None:
    match = _RESULT.match(line)
    if match is None:
        return None
    ok = match.group("not") is None
    rest = match.group("rest")
    name, _, directive = rest.partition("#")
    word, _, reason = directive.strip().partition(" ")
    kind = word.upper()
    status: Status
    if kind == "SKIP":
        status = "skip"
    elif kind == "XFAIL":
        status = "xfail" if ok else "fail"
    elif kind == "TIMEOUT":
        status = "timeout"
    elif kind == "ERROR":
        status = "error"
    else:
        status = "pass" if ok else "fail"
        reason, name = "", rest  # a `#` that starts no directive belongs to the name
    if kind in ("XFAIL", "ERROR") and not name.strip():
        name, reason = reason, ""  # kselftest.h prints `ok N # XFAIL name`: the name follows the directive
    return Result(int(match.group("number")), name.strip(), status, _clean(reason), depth)


def _clean(text: str) -> str:
    return text.strip().removeprefix("-").strip()
