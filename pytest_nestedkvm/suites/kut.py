"""kvm-unit-tests: the x86 test list, the runner's skip rules, its command line and its exit statuses.

Pure, except `validate_tree`, which reads the tree. What a test does follows the suite's own
runner (scripts/common.bash `for_each_unittest`, scripts/runtime.bash `run`, x86/run,
scripts/arch-run.bash): the test runs through the tree's own `x86/run` with the environment
and arguments `run` gives it, and its status means what `run` says it means. The checks
`run` makes before starting QEMU are made here, with facts read from the guest, plus two
the suite leaves to QEMU: a test that wants more vCPUs or memory than the guest has.
"""

from __future__ import annotations

import re
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CONFIG = Path("x86/unittests.cfg")
DEFAULT_TIMEOUT = 90.0  # runtime.bash: ${TIMEOUT:-${11:-90s}}
QEMU_DEFAULT_MIB = 128  # what QEMU gives a machine without -m
NO_FILE = "_NO_FILE_4Uhere_"  # runtime.bash's marker for "QEMU ran without a test kernel"

Verdict = Literal["passed", "skipped", "failed"]


@dataclass(frozen=True)
class UnitTest:
    """One [section] of unittests.cfg, fields as the runner reads them (raw text, unexpanded)."""

    name: str
    file: str
    line: int  # of the [name] header, for the item's location
    smp: str = "1"
    test_args: str = ""
    opts: str = ""  # qemu_params / extra_params
    groups: tuple[str, ...] = ()
    arch: str = ""
    machine: str = ""
    check: tuple[str, ...] = ()  # path=value, all must hold
    accel: str = ""
    timeout: str = ""
    disabled_if: str = ""


_KEYS = ("file", "smp", "test_args", "qemu_params", "extra_params", "groups", "arch", "machine", "check",
         "accel", "timeout", "disabled_if")
_KEY_LINE = re.compile(r"^(" + "|".join(_KEYS) + r") *= *(.*)$")


def parse_config(text: str) -> list[UnitTest]:
    """The tests of a unittests.cfg, in file order (what `for_each_unittest` reads, the same way)."""
    tests: list[UnitTest] = []
    current: dict[str, str] | None = None
    header_line = 0
    lines = text.splitlines()
    index = 0

    def flush() -> None:
        if current is not None and current["name"]:
            tests.append(_unit_test(current, header_line))

    while index < len(lines):
        line = lines[index].strip()  # `read -r` drops leading and trailing blanks
        index += 1
        header = re.fullmatch(r"\[(.*)\]", line)
        if header:
            flush()
            current, header_line = {"name": header.group(1)}, index
            continue
        match = _KEY_LINE.match(line)
        if match is None or current is None:
            continue
        key, value = match.groups()
        if key in ("qemu_params", "extra_params"):
            key = "opts"
            if value.startswith('"""'):  # a multi-line value, up to the closing """
                value, index = _multiline(value[3:], lines, index)
        current[key] = value
    flush()
    return tests


def _multiline(first: str, lines: list[str], index: int) -> tuple[str, int]:
    """A triple-quoted value: its lines joined with newlines (backslash-newline joins lines)."""
    parts = [first]
    while index < len(lines):
        raw = lines[index]
        index += 1
        end = re.fullmatch(r'(.*)"""[ \t]*', raw)
        if end:
            parts.append(end.group(1))
            break
        parts.append(raw)
    text = ""
    for part in parts:
        if text.endswith("\\\n") and not text.endswith("\\\\\n"):
            text = text[:-2]
        text += part + "\n"
    return text.rstrip("\n"), index


def _unit_test(fields: dict[str, str], line: int) -> UnitTest:
    return UnitTest(
        name=fields["name"], file=fields.get("file", ""), line=line, smp=fields.get("smp", "1"),
        test_args=fields.get("test_args", ""), opts=fields.get("opts", ""),
        groups=tuple(fields.get("groups", "").split()), arch=fields.get("arch", ""),
        machine=fields.get("machine", ""), check=tuple(fields.get("check", "").split()),
        accel=fields.get("accel", ""), timeout=fields.get("timeout", ""), disabled_if=fields.get("disabled_if", ""),
    )


def read_config_mak(tree: Path) -> dict[str, str]:
    """The variables of the tree's config.mak (ARCH, CONFIG_EFI, ...)."""
    values = {}
    for line in (tree / "config.mak").read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key.strip()):
            values[key.strip()] = value.strip()
    return values


def validate_tree(tree: Path) -> Path:
    """A configured and built kvm-unit-tests tree, or ValueError saying what is missing and how to fix it."""
    if not (tree / CONFIG).is_file():
        raise ValueError(f"{tree} is not a kvm-unit-tests tree (no {CONFIG}): pass the top directory of a "
                         "kvm-unit-tests checkout")
    built = any((tree / "x86").glob("*.flat")) or any((tree / "x86").glob("*.efi"))
    if not (tree / "config.mak").is_file() or not built:
        missing = "config.mak" if not (tree / "config.mak").is_file() else "built x86/*.flat"
        raise ValueError(f"{tree} is not built (no {missing}): run ./configure && make in it")
    try:
        parse_config((tree / CONFIG).read_text())
    except UnicodeDecodeError as exc:
        raise ValueError(f"{tree / CONFIG} is not text ({exc.reason}): restore it from the kvm-unit-tests "
                         "source") from None
    return tree


def load(tree: Path) -> list[UnitTest]:
    return parse_config((tree / CONFIG).read_text())


# -- before QEMU starts: the runner's skip rules ---------------------------------------------------


@dataclass(frozen=True)
class GuestFacts:
    """What the guest that runs the test has, read from it just before the test."""

    level: int
    cpus: int
    memory_mib: int
    kvm: bool  # /dev/kvm exists
    checks: Mapping[str, str | None]  # check path -> its contents (None: no such file)
    disabled: bool = False  # the test's disabled_if held


def kernel_path(test: UnitTest, config: Mapping[str, str]) -> str:
    """The test binary, relative to the tree: $TEST_DIR/<file>, .efi under CONFIG_EFI=y."""
    path = f"{config.get('TEST_DIR', 'x86')}/{test.file}"
    if config.get("CONFIG_EFI") == "y" and path.endswith(".flat"):
        path = path[: -len(".flat")] + ".efi"
    return path


def static_skip(test: UnitTest, config: Mapping[str, str], tree: Path) -> str | None:
    """Why the runner skips `test` before looking at the guest, in its words; or None."""
    if "pv-host" in test.groups and not config.get("GEN_SE_HEADER"):
        return "no gen-se-header available for pv-host test"
    if "nodefault" in test.groups:
        return "test marked as manual run only"
    if test.arch and test.arch != config.get("ARCH"):
        return f"{test.arch} only"
    if not (tree / kernel_path(test, config)).is_file():
        return f"Test file '{kernel_path(test, config)}' not found"
    return None


def guest_skip(test: UnitTest, facts: GuestFacts) -> str | None:
    """Why `test` cannot run in this guest, or None: the runner's accel, disabled_if and check rules,
    then the vCPUs and memory it asks QEMU for."""
    where = f"L{facts.level}"
    if test.accel and test.accel.split(",")[0] == "kvm" and not facts.kvm:
        return f"kvm only, but {where} has no /dev/kvm"
    if facts.disabled:
        return f"disabled because: {test.disabled_if}"
    for path, value in check_params(test).items():
        if facts.checks.get(path) != value:
            return f"{path} not equal to {value}"
    cpus = smp_count(test, facts.cpus)
    if cpus is not None and cpus > facts.cpus:
        return (f"needs {cpus} vCPUs (smp = {test.smp}), {where} has {facts.cpus}: give {where} more with "
                "--nested-smp")
    mib = memory_mib(test.opts)
    if mib > facts.memory_mib:
        return (f"needs {mib} MiB of guest memory (qemu_params -m), {where} has {facts.memory_mib} MiB: give "
                f"{where} more with --nested-memory (e.g. {_suggest_memory(mib, facts.level)})")
    return None


def _suggest_memory(mib: int, level: int) -> str:
    """A --nested-memory value that gives `level` room for `mib` plus its own kernel and QEMU."""
    need = -(-(mib + 512) // 1024) * 1024
    sizes = [need << (level - lv) for lv in range(1, level + 1)]
    return "--nested-memory=" + ",".join(map(str, sizes))


def check_params(test: UnitTest) -> dict[str, str]:
    """check = path=value ... as a mapping."""
    return {param.split("=", 1)[0]: param.split("=", 1)[1] if "=" in param else "" for param in test.check}


def smp_count(test: UnitTest, max_smp: int) -> int | None:
    """The vCPUs the test asks for; $MAX_SMP is the guest's CPU count, as runtime.bash sets it."""
    value = test.smp.strip()
    if value in ("$MAX_SMP", "${MAX_SMP}"):
        return max_smp
    return int(value) if value.isdigit() else None


_SIZE = re.compile(r"(?:^|\s)-m\s+(?:size=)?(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?(?=[\s,]|$)")
_UNITS = {"k": 1 / 1024, "m": 1, "": 1, "g": 1024, "t": 1024 * 1024}


def memory_mib(opts: str) -> int:
    """MiB of guest memory the QEMU options ask for (the last -m wins, as in QEMU); QEMU's default without one."""
    sizes = _SIZE.findall(opts)
    if not sizes:
        return QEMU_DEFAULT_MIB
    number, unit = sizes[-1]
    return int(float(number) * _UNITS[unit.lower()])


def timeout_seconds(test: UnitTest) -> float:
    """The test's timeout as timeout(1) reads it (90 s when unset): a number with an optional s/m/h/d."""
    value = test.timeout.strip() or f"{DEFAULT_TIMEOUT:g}"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", value)
    if match is None:
        raise ValueError(f"timeout = {value!r} is not a duration timeout(1) understands (e.g. 90, 90s, 2m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# -- the run: command line and what its status means --------------------------------------------------


def command_line(test: UnitTest, config: Mapping[str, str], timeout: float) -> str:
    """runtime.bash's `get_cmdline` for the test (run with `eval`, so quotes and backticks in
    unittests.cfg mean what they mean to the runner), with the suite's MIGRATION/PANIC switches."""
    args = [kernel_path(test, config), f"-smp {test.smp}"]
    if test.test_args:
        args.append(f"-append {test.test_args}")  # -append only when there are arguments, as the runner does
    if test.opts:
        args.append(test.opts)
    env = [f"TESTNAME={test.name}", f"TIMEOUT={timeout:g}s", f"MACHINE={test.machine}", f"ACCEL={test.accel}"]
    if "migration" in test.groups:
        env.insert(0, "MIGRATION=yes")
    if "panic" in test.groups:
        env.insert(0, "PANIC=yes")
    arch_run = f"./{config.get('TEST_SUBDIR', 'x86')}/run"
    return " ".join([*env, arch_run, *args])


def guest_command(tree: Path, cmdline: str, max_smp: int) -> str:
    """The shell command that runs `cmdline` in the tree under bash, as the runner does (with
    MAX_SMP set, which unittests.cfg may use, to the guest's CPU count).

    Its stdout and stderr reach the channel through pipes: arch-run.bash reopens its stdout
    through /dev/fd and tees stderr to /dev/stderr, which fails on the guest's virtio port
    (one opener at a time) and would truncate a regular file.
    """
    script = 'MAX_SMP=$2; { eval "$1" 2>&1 >&3 3>&- | cat >&2; } 3>&1 | cat'
    return (f"cd {shlex.quote(str(tree))} && bash -o pipefail -c {shlex.quote(script)} kut {shlex.quote(cmdline)} "
            f"{max_smp}")


def probe_command(test: UnitTest, tree: Path) -> str:
    """One guest command that prints what `parse_probe` reads: CPUs, MemTotal, /dev/kvm, each check file."""
    parts = ["nproc", "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
             "if [ -e /dev/kvm ]; then echo kvm; else echo none; fi"]
    for path in check_params(test):
        quoted = shlex.quote(path)
        parts.append(f"if [ -f {quoted} ]; then echo \"=$(cat {quoted})\"; else echo missing; fi")
    if test.disabled_if:
        script = 'cd "$1" && . ./config.mak && (eval "$2")'
        parts.append(f"if bash -c {shlex.quote(script)} kut {shlex.quote(str(tree))} {shlex.quote(test.disabled_if)}"
                     " >/dev/null 2>&1; then echo disabled; else echo enabled; fi")
    return "; ".join(parts)


def parse_probe(test: UnitTest, level: int, output: str) -> GuestFacts:
    lines = output.splitlines()
    paths = list(check_params(test))
    checks = {path: (line[1:] if line.startswith("=") else None) for path, line in zip(paths, lines[3:], strict=False)}
    disabled = bool(test.disabled_if) and lines[3 + len(paths):4 + len(paths)] == ["disabled"]
    return GuestFacts(level=level, cpus=int(lines[0]), memory_mib=int(lines[1]) // 1024, kvm=lines[2] == "kvm",
                      checks=checks, disabled=disabled)


@dataclass(frozen=True)
class SuiteResult:
    """A suite test's verdict and the line its runner would print for it (PASS/SKIP/FAIL, SUCCESS ...)."""

    verdict: Verdict
    message: str  # PASS/SKIP/FAIL line as the runner prints it, without colours


def summary(log: str) -> str:
    """runtime.bash's `extract_summary`: the SUMMARY line among the last five, as `(...)`."""
    for line in log.rstrip("\n").splitlines()[-5:]:
        if line.startswith("SUMMARY: "):
            return "(" + line.removeprefix("SUMMARY: ").rstrip("\r") + ")"
    return ""


def outcome(test: UnitTest, status: int, stdout: str, stderr: str, timeout: float) -> SuiteResult:
    """What the runner makes of x86/run's exit status (runtime.bash `run`), given its output.

    x86/run already fixed QEMU's status (vmm.bash `qemu_fixup_return_code`). One addition of
    the runner happens before the run there (`premature_failure`: QEMU failing to start even
    without a test kernel is a SKIP with its last line); here it is recognised after the run:
    status 1 with nothing from the test kernel on the serial console and QEMU's error on stderr.
    """
    name, found = test.name, summary(stdout)
    said = [line for line in stdout.splitlines()[1:] if line.strip()]  # the first line echoes the command
    if status == 1 and not said and stderr.strip():
        return SuiteResult("skipped", f"SKIP {name} ({stderr.strip().splitlines()[-1]})")
    if status == 0:
        return SuiteResult("passed", f"PASS {name} {found}".rstrip())
    if status == 77:
        why = next((line.strip() for line in said if line.startswith(("WARNING:", "SKIP:"))), "")
        return SuiteResult("skipped", f"SKIP {name} {found}".rstrip() + (f": {why}" if why else ""))
    if status == 124:
        return SuiteResult("failed", f"FAIL {name} (timeout; duration={timeout:g}s)")
    if status > 127:
        return SuiteResult("failed", f"FAIL {name} (terminated on {_signal_name(status - 128)})")
    failures = [line.strip() for line in said if line.startswith("FAIL")]
    detail = f"; first failure: {failures[0]}" if failures else ""
    meaning = f", {STATUS_MEANING[status]}" if status in STATUS_MEANING else ""
    return SuiteResult("failed", f"FAIL {name} {found}".rstrip() + f" (exit status {status}{meaning}){detail}")


# vmm.bash's table of x86/run's statuses, for a failure's message.
STATUS_MEANING = {
    1: "most likely QEMU failed, or the test ended without reporting (a triple fault ends QEMU under --no-reboot)",
    2: "most likely a run script failed",
    3: "most likely the unittest failed",
    127: "most likely the unittest called abort()",
}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
