"""The Xen Test Framework (XTF): one item per test instance, run by XTF's own runner in dom0.

A built XTF tree (`make xtfdir=DIR` in DIR: scripts/build_suites.sh xtf TARBALL) holds, per test,
`tests/NAME/info.json` (its category, environments and variations) and, per instance, the test
kernel `test-ENV-NAME` with its xl config `test-ENV-NAME[~VARIATION].cfg`. Each instance runs as a
domU of the Xen L1 through `xtf-runner --results-mode=logfile` (xl create -F; the verdict is the
last line dom0's xenconsoled logged for it), so its verdicts are XTF's own: SUCCESS passes, SKIP
skips with the test's reason, FAILURE, ERROR and CRASH fail with the console, as does a timeout.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .kut import SuiteResult

RUNNER = "xtf-runner"
TIMEOUT = 60.0  # seconds per instance at hardware speed (scaled for TCG): XTF's tests take a second
# xtf-runner's exit statuses (exit_code() there), and the status of a runner that failed itself.
STATUSES = {0: "SUCCESS", 3: "SKIP", 4: "ERROR", 5: "FAILURE", 6: "CRASH"}
RESULT_LINE = "Test result:"
PANIC = "PANIC:"  # XTF's own panic handler (an unhandled exception), between lines of asterisks
FAIL_LINE = "Fail"  # how XTF's tests start the line of each failed check


@dataclass(frozen=True)
class Instance:
    """One test in one environment (and variation): XTF's name for it is the item's name."""

    test: str  # tests/<test>
    env: str  # pv64, hvm32pae, ...
    variation: str | None
    category: str  # special, functional, xsa, utility, in-development
    info: Path  # its info.json, the item's location

    @property
    def name(self) -> str:
        return f"test-{self.env}-{self.test}" + (f"~{self.variation}" if self.variation else "")

    @property
    def marker(self) -> str:
        """Its category as a marker name (-m xtf_functional, -m xtf_in_development)."""
        return "xtf_" + self.category.replace("-", "_")


def validate_tree(path: Path) -> Path:
    """`path` if it is a built XTF tree; ValueError saying how to get one otherwise."""
    if not (path / RUNNER).is_file() or not any(path.glob("tests/*/info.json")):
        raise ValueError(f"{path} is not an XTF tree (no {RUNNER}, no tests/*/info.json): point it at the top of "
                         "a xen-test-framework checkout")
    if not discover(path):
        raise ValueError(f"{path} has no built XTF test: run `make xtfdir={path}` there "
                         "(or scripts/build_suites.sh xtf TARBALL)")
    return path


def discover(tree: Path) -> list[Instance]:
    """The built instances of `tree`, in XTF's order (by test, then as info.json lists them)."""
    found = []
    for info in sorted(tree.glob("tests/*/info.json")):
        meta = json.loads(info.read_text(encoding="utf-8"))
        for env in meta.get("environments", []):
            for variation in meta.get("variations") or [None]:
                instance = Instance(meta["name"], env, variation, meta.get("category", "uncategorised"), info)
                built = info.parent / f"test-{env}-{instance.test}", info.parent / f"{instance.name}.cfg"
                if all(path.is_file() for path in built):
                    found.append(instance)
    return found


def guest_command(tree: Path, name: str) -> str:
    """The dom0 command that runs instance `name` and exits with xtf-runner's status; the domain
    is destroyed afterwards whatever happened (a runner killed at its timeout leaves it behind)."""
    return (f"cd {shlex.quote(str(tree))} && python3 ./{RUNNER} --results-mode=logfile {shlex.quote(name)}; "
            f"s=$?; xl destroy {shlex.quote(name)} >/dev/null 2>&1; exit $s")


def outcome(name: str, status: int, output: str) -> SuiteResult:
    """XTF's verdict for instance `name`, from xtf-runner's exit status and output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    result = _last(lines, lambda line: RESULT_LINE in line)
    said = lines[result - 1] if result else ""  # the test's own last words before its verdict
    if result and result >= 2 and said[:1].islower():  # they go on from the line before (a wrapped message)
        said = f"{lines[result - 2]} {said}"
    verdict = STATUSES.get(status)
    if verdict == "SUCCESS":
        return SuiteResult("passed", f"SUCCESS {name}")
    if verdict == "SKIP":
        why = said if result is not None else "Xen lacks the virtualization this environment needs (xl info virt_caps)"
        return SuiteResult("skipped", f"SKIP {name}: {why}")
    if verdict == "CRASH":
        panic = _last(lines, lambda line: line.startswith(PANIC))
        if panic is not None:  # XTF's own panic: "PANIC: Unhandled exception at e033:...", then the vector
            after = lines[panic + 1] if panic + 1 < len(lines) and not lines[panic + 1].startswith("*") else ""
            return SuiteResult("failed", f"CRASH {name}: {lines[panic]}" + (f" {after}" if after else ""))
        return SuiteResult("failed", f"CRASH {name} (no '{RESULT_LINE}' line: the domain crashed or was destroyed)")
    if verdict is not None:
        # A test that checks many cases prints a "Fail ..." line for each: the first says most.
        fails = [line for line in lines if line.startswith(FAIL_LINE)]
        if fails:
            more = f" (first of {len(fails)} '{FAIL_LINE}' lines)" if len(fails) > 1 else ""
            return SuiteResult("failed", f"{verdict} {name}: {fails[0]}{more}")
        return SuiteResult("failed", f"{verdict} {name}" + (f": {said}" if said else ""))
    last = lines[-1] if lines else "no output"
    return SuiteResult("failed", f"FAIL {name} ({RUNNER} exited with status {status}: {last})")


def _last(lines: list[str], wanted: Callable[[str], bool]) -> int | None:
    """The index of the last of `lines` that is `wanted`, if any."""
    return next((i for i in range(len(lines) - 1, -1, -1) if wanted(lines[i])), None)
