"""How often guests wedge or reset under TCG's emulated SVM, per configuration (prints a table).

    python benchmarks/stress.py [--workload NAME ...] [--runs 20] [--busy] [--label TEXT]
                                [--option NAME=VALUE ...] [--qemu-dir DIR] [--json FILE]
    python benchmarks/stress.py --workload l3-loop --runs 10 --option smp=1 --label smp1 --json stress.jsonl
    nohup .venv/bin/python benchmarks/stress.py --busy > /tmp/stress.log 2>&1 &    # all workloads, hours

Workloads (default: all), each run on freshly booted guests (a new session, closed after the run):
  kselftests-l1  KVM selftests inside L1 (--kselftests), as the plugin's items run them
  kut-l2         kvm-unit-tests at L2 (--kut-tests), each through the tree's own x86/run in L2
  kvm-hello-l2   example_suites/kvm_api/kvm_hello.py at L2: a VM of its own on L2's KVM
  l3-loop        L1, L2 and L3 booted, then `cat /proc/uptime` at L3 (--commands times)
Guests boot the kernel built from source (scripts/build_suites.sh kernel; --host-kernel: the
plugin's default). --option NAME=VALUE sets a plugin option (settings.OPTIONS names: smp=1,
append=clocksource=tsc, qemu_args=..., l2_cpu=...); --qemu-dir DIR puts DIR first on PATH, so
its qemu-system-* runs every level (DIR is shared with the guests). --busy keeps one host core
busy (a niced shell loop) for the whole measurement.

Each run ends as exactly one of:
  pass   every command answered and every test passed
  wedge  a guest's console shows an RCU stall, a soft or hard lockup or a hung task, or a
         command or boot got no answer within its timeout
  reset  a guest's QEMU exited without a kernel panic (the guests run with -no-reboot)
  fail   anything else: a test failing, a kernel panic, QEMU exiting with an error
A run is capped at --run-timeout seconds and each command at --command-timeout (boots keep the
plugin's timeouts; the plugin also ends a wait at once when a console shows a stall), so a wedge
costs minutes, not hours. Nothing is retried: a boot that resets ends its run.
Progress goes to stderr; the table and one line per run that did not pass go to stdout; the
consoles of those runs are kept (--logs DIR, default benchmarks/results/stress-logs); --json FILE
appends one JSON line per workload and configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from boot_and_latency import session_for
from kvm_suites import KUT_TARBALL, build

from pytest_nestedkvm.base.errors import (
    BootError,
    CommandTimeout,
    GuestCrashed,
    GuestWedged,
    LevelUnavailable,
    NestedKvmError,
)
from pytest_nestedkvm.config.plan import scaled_timeout
from pytest_nestedkvm.config.settings import OPTION_BY_NAME
from pytest_nestedkvm.lab import Lab
from pytest_nestedkvm.machine.channel import CommandResult
from pytest_nestedkvm.machine.guest import Guest, exit_error
from pytest_nestedkvm.suites import kselftests, kut

REPO = Path(__file__).resolve().parents[1]
KVM_HELLO = REPO / "example_suites" / "kvm_api" / "kvm_hello.py"
# Quick selftests (under a second each on L1 when all is well); not kvm_create_max_vcpus, which
# once ran for 600 s on a loaded host and would measure load, not wedges.
KSELFTESTS = ("set_sregs_test", "kvm_binary_stats_test", "svm_int_ctl_test", "svm_vmcall_test", "state_test",
              "xapic_state_test", "sync_regs_test", "userspace_msr_exit_test")
# Tests that pass at L2 here and make many exits. Not msr (a known failure under TCG:
# known-failures-tcg.txt), ioapic (4 vCPUs) nor svm_npt (2 vCPUs, 4 GiB): at L2 they fail or skip every time.
KUT_TESTS = ("vmexit_cpuid", "vmexit_vmcall", "setjmp")
L3_COMMAND = "cat /proc/uptime"
WORKLOADS = ("kselftests-l1", "kut-l2", "kvm-hello-l2", "l3-loop")

Outcome = Literal["pass", "wedge", "reset", "fail"]
OUTCOMES: tuple[Outcome, ...] = ("pass", "wedge", "reset", "fail")
# Console lines worth quoting for a guest that went down: kernel problems and the OOM killer.
NOTABLE = re.compile(r"^.*(Kernel panic|BUG: |Oops: |general protection fault|WARNING: CPU: |Out of memory|"
                     r"oom-kill|KVM internal error|emulation failure).*$", re.MULTILINE)


# -- what a run saw ---------------------------------------------------------------------------


@dataclass
class Run:
    outcome: Outcome
    seconds: float = 0.0
    level: int | None = None  # where it happened
    during: str = ""  # what the run was doing then: "booting L2", a test's name
    note: str = ""  # what was seen, one line
    ready_s: dict[int, float] = field(default_factory=dict)  # each level's boot, of the last boot
    logs: list[str] = field(default_factory=list)  # consoles and QEMU log kept for a run that did not pass


class GuestTestFailed(Exception):
    """A test in the guest failed (its own verdict), or answered something else than expected."""

    def __init__(self, message: str, *, level: int) -> None:
        super().__init__(message)
        self.level = level


class NoAnswer(Exception):
    """A command of the workload got no answer within its timeout (or its test VM made no progress)."""

    def __init__(self, message: str, *, level: int) -> None:
        super().__init__(message)
        self.level = level


class RunCapReached(Exception):
    """The run's --run-timeout ran out (a slow run, not necessarily a wedge)."""


class WorkloadSkipped(Exception):
    """The Lab cannot provide the level (LevelUnavailable): every run would skip."""


@dataclass
class Budget:
    """The run's hard cap and the cap of one command: a command gets the least of those and what it wants."""

    deadline: float  # time.monotonic()
    command: float
    cap: float
    clipped: bool = False  # the last timeout handed out was cut short by the run's cap
    doing: str = ""  # what the run is doing, for the report of a run that did not pass

    def timeout(self, wanted: float | None = None) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining < 1:
            raise RunCapReached(f"the run's cap of {self.cap:g} s (--run-timeout) was reached")
        own = self.command if wanted is None else min(wanted, self.command)
        self.clipped = remaining < own
        return min(own, remaining)


@dataclass
class Context:
    """What the workloads need, resolved once before the first run."""

    budget_seconds: float
    command_timeout: float
    commands: int
    kernel: Path | None = None
    kselftests_dir: Path | None = None
    selftests: list[str] = field(default_factory=list)  # relative to the suite's root
    kut_tree: Path | None = None
    kut_tests: list[kut.UnitTest] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # workload -> why it cannot run here
    label: str = "default"
    logs: Path | None = None  # where the logs of runs that did not pass go


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step(message: str) -> None:
    progress(f"    {message}")


def answer(guest: Guest, command: str, timeout: float) -> CommandResult:
    """guest.run, with a timeout that names the level (CommandTimeout does not carry it)."""
    try:
        return guest.run(command, timeout=timeout)
    except CommandTimeout as exc:
        raise NoAnswer(f"L{guest.level}: {exc.command[:80]!r} gave no answer within {exc.timeout:g} s",
                       level=guest.level) from None


def ready(session: Lab, budget: Budget, level: int) -> Guest:
    """The guest at `level`, its parents booted one by one so that progress shows which level is slow."""
    for lv in range(1, level + 1):
        budget.doing = f"booting L{lv}"
        guest = session.guest(lv)
        step(f"L{lv} ready in {guest.boot_seconds or 0:.1f} s")
    return guest


# -- the workloads ----------------------------------------------------------------------------


def kselftests_l1(session: Lab, budget: Budget, ctx: Context) -> None:
    assert ctx.kselftests_dir is not None
    l1 = ready(session, budget, 1)
    root = kselftests.discover(ctx.kselftests_dir).root
    base = kselftests.timeout_seconds(root)
    for test in ctx.selftests:
        budget.doing = test
        timeout = budget.timeout(scaled_timeout(base, session.report.pace, 1))
        result = answer(l1, kselftests.guest_command(root, test), timeout)
        verdict = kselftests.outcome(test, result.exit_status, result.stdout + result.stderr, timeout)
        step(f"{test}: {verdict.verdict} in {result.duration:.1f} s")
        if verdict.verdict == "failed":
            raise GuestTestFailed(verdict.message, level=1)


def kut_l2(session: Lab, budget: Budget, ctx: Context) -> None:
    assert ctx.kut_tree is not None
    tree, level = ctx.kut_tree, 2
    config = kut.read_config_mak(tree)
    l2 = ready(session, budget, level)
    for test in ctx.kut_tests:
        budget.doing = test.name
        facts = kut.parse_probe(test, level, answer(l2, kut.probe_command(test, tree), budget.timeout()).stdout)
        reason = kut.guest_skip(test, facts)
        if reason is not None:
            step(f"{test.name}: skipped ({reason})")
            continue
        # x86/run's timeout(1) ends the test's QEMU first; the channel's timeout is the backstop.
        command_timeout = budget.timeout(scaled_timeout(kut.timeout_seconds(test), session.report.pace, level))
        margin = min(30.0, command_timeout / 4)
        timeout = command_timeout - margin
        result = answer(l2, kut.guest_command(tree, kut.command_line(test, config, timeout), facts.cpus),
                        command_timeout)
        verdict = kut.outcome(test, result.exit_status, result.stdout, result.stderr, timeout)
        step(f"{test.name}: {verdict.verdict} in {result.duration:.1f} s")
        if result.exit_status == 124:  # L2 answers, but the test's VM (L3) made no progress
            raise NoAnswer(f"{verdict.message}: the kvm-unit-tests VM inside L2 did not end", level=level)
        if verdict.verdict == "failed":  # the last lines of each stream say how the test's QEMU ended
            said = [line for stream in (result.stdout, result.stderr) for line in stream.strip().splitlines()[-4:]]
            raise GuestTestFailed(" | ".join([verdict.message, *said]), level=level)


def kvm_hello_l2(session: Lab, budget: Budget, ctx: Context) -> None:
    l2 = ready(session, budget, 2)
    budget.doing = "kvm_hello.py"
    result = answer(l2, shlex.join(["python3", "-B", str(KVM_HELLO), "0x10"]), budget.timeout())
    lines = result.stdout.splitlines()
    step(f"kvm_hello: exit {result.exit_status} in {result.duration:.1f} s")
    if result.exit_status != 0 or lines[-1:] != ["kvm_hello: OK"]:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise GuestTestFailed(f"kvm_hello.py exit {result.exit_status}: {' '.join(said)}", level=2)


def l3_loop(session: Lab, budget: Budget, ctx: Context) -> None:
    l3 = ready(session, budget, 3)
    durations = []
    for number in range(1, ctx.commands + 1):
        budget.doing = f"command {number} at L3"
        result = answer(l3, L3_COMMAND, budget.timeout(60.0))  # a wedge, not latency, past a minute
        if result.exit_status != 0:
            raise GuestTestFailed(f"{L3_COMMAND!r} exit {result.exit_status}: {result.stderr.strip()[:200]}",
                                  level=3)
        durations.append(result.duration)
    step(f"{ctx.commands} commands, median {statistics.median(durations) * 1000:.1f} ms, "
         f"max {max(durations) * 1000:.0f} ms")


BODIES: dict[str, Callable[[Lab, Budget, Context], None]] = {
    "kselftests-l1": kselftests_l1, "kut-l2": kut_l2, "kvm-hello-l2": kvm_hello_l2, "l3-loop": l3_loop,
}


def workload_options(name: str, ctx: Context) -> dict[str, str]:
    """The plugin options a workload needs (the suite trees are shared with the guests through them)."""
    if name == "kselftests-l1":
        return {"levels": "1", "kselftests": str(ctx.kselftests_dir)}
    if name == "kut-l2":
        return {"levels": "2", "kut": str(ctx.kut_tree), "kut_level": "2"}
    if name == "kvm-hello-l2":
        return {"levels": "2", "share": str(KVM_HELLO.parent)}  # the checkout may not be the working directory
    return {"levels": "3"}


def options_for(name: str, ctx: Context, user: dict[str, str], qemu_dir: Path | None) -> dict[str, str]:
    """The workload's options, the kernel and command timeout, then the user's (theirs win; shares add up)."""
    options = {"command_timeout": f"{ctx.command_timeout:g}", **workload_options(name, ctx)}
    if ctx.kernel is not None:
        options["kernel"] = str(ctx.kernel)
    # L2 and deeper run the same QEMU binary as L1 (its path on L0): the guests must see it.
    shares = [options.pop("share", ""), str(qemu_dir or ""), user.get("share", "")]
    options.update({k: v for k, v in user.items() if k != "share"})
    if any(shares):
        options["share"] = ",".join(s for s in shares if s)
    return options


# -- one run and its verdict ------------------------------------------------------------------


def one_run(name: str, options: dict[str, str], ctx: Context, facts: dict[str, str]) -> Run:
    started = time.monotonic()
    budget = Budget(started + ctx.budget_seconds, ctx.command_timeout, ctx.budget_seconds)
    session = session_for(**options)
    run = Run("fail")
    try:
        error: Exception | None = None
        try:
            BODIES[name](session, budget, ctx)
        except LevelUnavailable as exc:
            raise WorkloadSkipped(str(exc)) from None
        except Exception as exc:  # every kind is classified below, none ends the measurement
            error = exc
        run = judge(session, error, budget)
        run.during = budget.doing if run.outcome != "pass" else ""
        run.seconds = time.monotonic() - started  # the run itself, not the teardown
        run.ready_s = {lv: round(g.boot_seconds, 2) for lv, g in session.guests.items() if g.boot_seconds}
        with contextlib.suppress(NestedKvmError):
            facts.setdefault("qemu", session.report.qemu.version if session.report.qemu else "none")
            facts.setdefault("kernel", session.kernel.release)
        if run.outcome != "pass" and ctx.logs is not None:
            label = re.sub(r"[^\w.-]+", "_", ctx.label)  # a file name
            run.logs = keep_logs(session, ctx.logs / f"{label}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    finally:
        close(session, fast=run.outcome != "pass")
    return run


def judge(session: Lab, error: Exception | None, budget: Budget) -> Run:
    guests = dict(sorted(session.guests.items()))
    for level, guest in guests.items():  # the consoles first, outermost first: a stall explains what follows
        with contextlib.suppress(Exception):
            guest.link.settle_console(level)
        stall = guest.console.first_stall()  # the plugin's watchdog lines (RCU stall, lockups, hung task)
        if stall is not None:
            after = "" if error is None or isinstance(error, GuestWedged) else f"; then {first_line(error)}"
            return Run("wedge", level=level, note=stall + after)
    if error is None:
        return Run("pass")
    if isinstance(error, NoAnswer) and budget.clipped:  # its timeout was what the run's cap left
        return Run("fail", level=error.level, note=f"run cap of {budget.cap:g} s reached: {first_line(error)}")
    if isinstance(error, NoAnswer | CommandTimeout):  # CommandTimeout: one of the plugin's own commands
        return Run("wedge", level=getattr(error, "level", None), note=first_line(error))
    if isinstance(error, RunCapReached):
        return Run("fail", note=str(error))
    if isinstance(error, GuestTestFailed):
        return Run("fail", level=error.level, note=str(error))
    if isinstance(error, GuestWedged):
        return Run("wedge", level=error.level, note=error.line)
    if isinstance(error, BootError):
        if error.why in ("timeout", "wedged"):
            return Run("wedge", level=error.level, note=first_line(error))
        if error.why == "reset":
            return reset(guests.get(error.level), error.level, error)
        if error.why != "parent_down":
            return Run("fail", level=error.level, note=first_line(error))
    if isinstance(error, GuestCrashed) and not error.parent_down:
        return crashed(guests.get(error.level), error)
    if isinstance(error, BootError | GuestCrashed):  # went down with its parent: find the outermost
        found = outermost_down(guests)
        if found is not None:
            return found
    return Run("fail", level=getattr(error, "level", None), note=f"{type(error).__name__}: {first_line(error)}")


def outermost_down(guests: dict[int, Guest]) -> Run | None:
    """The outermost guest whose QEMU exited or whose shell is gone, and what its console says."""
    for guest in guests.values():
        try:
            if guest.process.parent_lost:
                continue  # gone with its parent, which came first in this loop
            trouble = guest.channel_trouble
            # A closed channel usually means QEMU is exiting: give it a moment to be reaped.
            status = exit_status(guest, wait=5.0 if trouble else 0.0)
            if status is not None:
                return crashed(guest, exit_error(guest))
        except NestedKvmError as exc:  # its parent did not answer for the details
            return Run("fail", level=guest.level, note=f"L{guest.level} is down; {first_line(exc)}")
        if trouble is not None:
            return Run("fail", level=guest.level, note=f"L{guest.level}'s QEMU runs but its shell is gone ({trouble})"
                       + console_summary(guest))
    return None


def exit_status(guest: Guest, wait: float) -> int | None:
    deadline = time.monotonic() + wait
    while True:
        status = guest.process.exit_status()
        if status is not None or time.monotonic() >= deadline:
            return status
        time.sleep(0.2)


def console_summary(guest: Guest) -> str:
    """The first kernel problem or OOM kill on the guest's console, and its last line."""
    text = guest.console.read(max(guest.console_start, guest.console_ready))  # boot warnings were the boot's
    notable = NOTABLE.search(text)
    last = text.rstrip().rpartition("\n")[2].strip()
    return (f"; console: {notable.group(0).strip()[:200]}" if notable else "") + (
        f"; last console line: {last[:160]}" if last else "")


def crashed(guest: Guest | None, error: GuestCrashed) -> Run:
    if error.panicked:
        panic = guest.console.first_panic(guest.console_start) if guest else None
        return Run("fail", level=error.level, note=panic or first_line(error))
    if error.exit_status in (0, None):
        return reset(guest, error.level, error)
    return Run("fail", level=error.level, note=first_line(error))


def reset(guest: Guest | None, level: int, error: BootError | GuestCrashed) -> Run:
    """A QEMU that exited without a panic: what QMP said about it and where its console stopped."""
    note = f"L{level} QEMU exited with status {error.exit_status} and no kernel panic"
    if guest is not None:
        with contextlib.suppress(Exception):
            shutdowns = [e for e in guest.qmp_events(wait=0.5) if e.get("event") == "SHUTDOWN"]
            if shutdowns:
                note += f"; QMP SHUTDOWN reason {shutdowns[0].get('data', {}).get('reason', '?')}"
        note += console_summary(guest)
    return Run("reset", level=level, note=note)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def keep_logs(session: Lab, prefix: Path) -> list[str]:
    """Copy each guest's console and L1's QEMU log (the run directory goes with the session)."""
    sources = {f"L{lv}.console": g.console_log for lv, g in session.guests.items()}
    if "run_root" in session.__dict__:
        sources["L1.qemu.log"] = session.run_root / "l1" / "qemu.log"
    kept = []
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix, source in sorted(sources.items()):
        target = Path(f"{prefix}-{suffix}")
        with contextlib.suppress(OSError):
            shutil.copyfile(source, target)
            kept.append(str(target))
    return kept


def close(session: Lab, fast: bool) -> None:
    """Stop the guests. After trouble L1's QEMU goes first: the deeper guests need no commands
    through a parent that may not answer (each would wait for its command timeout)."""
    l1 = session.guests.get(1)
    try:
        if fast and l1 is not None:
            l1.process.stop()
        session.close()
    except Exception as exc:  # a teardown problem must not end the measurement
        progress(f"    closing the session: {type(exc).__name__}: {first_line(exc)}")


# -- configurations, the table ------------------------------------------------------------------


@dataclass
class Row:
    label: str
    workload: str
    busy: bool
    options: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(r.outcome == outcome for r in self.runs)

    def median(self, passed_only: bool) -> float | None:
        values = [r.seconds for r in self.runs if r.outcome == "pass" or not passed_only]
        return statistics.median(values) if values else None


def print_table(rows: list[Row], facts: dict[str, str]) -> None:
    machine = f"{os.cpu_count()} cores, {platform.machine()}, {platform.node()}"
    print(f"stress under emulated SVM ({machine}; QEMU {facts.get('qemu', '?')}, kernel {facts.get('kernel', '?')})")
    head = ("label", "workload", "busy", "runs", "pass", "wedge", "reset", "fail", "med pass s", "med all s")
    cells: list[list[str]] = [list(head)]
    for row in rows:
        seconds = [row.median(True), row.median(False)]
        cells.append([row.label, row.workload, "yes" if row.busy else "no", str(len(row.runs)),
                      *(str(row.count(o)) for o in OUTCOMES),
                      *("-" if s is None else f"{s:.1f}" for s in seconds)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for cell in cells:
        print("  ".join(text.ljust(width) if i < 3 else text.rjust(width)
                        for i, (text, width) in enumerate(zip(cell, widths, strict=True))))
    for row in rows:
        if row.skipped:
            print(f"{row.label} {row.workload}: not run: {row.skipped}")
        for number, run in enumerate(row.runs, start=1):
            if run.outcome != "pass":
                where = (f" at L{run.level}" if run.level else "") + (f" during {run.during}" if run.during else "")
                note = f": {run.note}" if run.note else ""
                print(f"{row.label} {row.workload} run {number}: {run.outcome}{where} after {run.seconds:.0f} s{note}")
                if run.logs:
                    print(f"    logs: {', '.join(run.logs)}")


def write_json(path: Path, row: Row, facts: dict[str, str], interrupted: bool) -> None:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "label": row.label, "workload": row.workload, "busy": row.busy,
        "options": row.options, "host": f"{os.cpu_count()} cores, {platform.node()}", **facts,
        "counts": {o: row.count(o) for o in OUTCOMES},
        "median_pass_s": row.median(True), "median_all_s": row.median(False), "skipped": row.skipped,
        "interrupted": interrupted, "runs": [asdict(r) for r in row.runs],
    }
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    """One host core kept busy: a shell loop, niced so the guests' threads still come first."""
    if not enabled:
        yield
        return
    # setpriv --pdeathsig: the loop dies with this script even when it is killed with SIGKILL.
    guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    loop = subprocess.Popen([*guard, "nice", "-n", "5", "sh", "-c", "while :; do :; done"])
    progress(f"busy loop on one core: pid {loop.pid}")
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


# -- setup --------------------------------------------------------------------------------------


def prepare(workloads: list[str], args: argparse.Namespace, ctx: Context) -> None:
    """Build (or find, cached) the kernel and suite trees the chosen workloads need."""
    if not args.host_kernel and "kernel" not in dict(args.option):
        progress("kernel: scripts/build_suites.sh kernel (cached after the first build)")
        ctx.kernel = build("kernel")
        if ctx.kernel is None:
            for name in workloads:
                ctx.unavailable[name] = "the kernel did not build (see stderr); --host-kernel boots the host's"
            return
    if "kselftests-l1" in workloads:
        ctx.kselftests_dir = build("kselftests")
        if ctx.kselftests_dir is None:
            ctx.unavailable["kselftests-l1"] = "the KVM selftests did not build (see stderr)"
        else:
            ctx.selftests = resolve_selftests(ctx.kselftests_dir, args.kselftests.split(","))
    if "kut-l2" in workloads:
        ctx.kut_tree = build("kut", str(KUT_TARBALL)) if KUT_TARBALL.is_file() else None
        if ctx.kut_tree is None:
            ctx.unavailable["kut-l2"] = f"no kvm-unit-tests tree (needs {KUT_TARBALL})"
        else:
            ctx.kut_tests = resolve_kut(ctx.kut_tree, args.kut_tests.split(","))
    if "kvm-hello-l2" in workloads and not KVM_HELLO.is_file():
        ctx.unavailable["kvm-hello-l2"] = f"no {KVM_HELLO}"


def resolve_selftests(directory: Path, names: list[str]) -> list[str]:
    """Names (x86_64/state_test or just state_test) as the suite lists them; missing ones are said and dropped."""
    tests = kselftests.discover(directory).tests
    found = []
    for name in filter(None, (n.strip() for n in names)):
        match = [t for t in tests if t == name or t.rpartition("/")[2] == name]
        if match:
            found.append(match[0])
        else:
            progress(f"kselftests: {name} is not built in {directory}: left out")
    return found


def resolve_kut(tree: Path, names: list[str]) -> list[kut.UnitTest]:
    """The named tests of unittests.cfg; unknown ones and those the runner skips anywhere are said and dropped."""
    tests = {t.name: t for t in kut.load(tree)}
    config = kut.read_config_mak(tree)
    found = []
    for name in filter(None, (n.strip() for n in names)):
        test = tests.get(name)
        reason = "not in x86/unittests.cfg" if test is None else kut.static_skip(test, config, tree)
        if test is None or reason is not None:
            progress(f"kut: {name}: {reason}: left out")
        else:
            found.append(test)
    return found


def user_options(pairs: list[tuple[str, str]]) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, value in pairs:
        if name == "share" and options.get("share"):
            value = f"{options['share']},{value}"
        options[name] = value
    return options


def option_pair(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or name not in OPTION_BY_NAME:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE with NAME one of {', '.join(OPTION_BY_NAME)}")
    return name, value


def use_qemu_dir(directory: Path) -> Path:
    """Put `directory` first on PATH: the plugin's find_qemu takes the first qemu-system-<arch> there."""
    directory = directory.expanduser().resolve()
    binary = directory / f"qemu-system-{platform.machine()}"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        sys.exit(f"--qemu-dir: no executable {binary}")
    os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable (default: all)")
    parser.add_argument("--runs", type=int, default=20, help="runs per workload (default 20)")
    parser.add_argument("--busy", action="store_true", help="keep one host core busy throughout")
    parser.add_argument("--label", default="default", help="names this configuration in the table and JSON")
    parser.add_argument("--option", action="append", type=option_pair, default=[], metavar="NAME=VALUE",
                        help="a plugin option for every session (repeatable), e.g. smp=1")
    parser.add_argument("--qemu-dir", type=Path, help="a directory whose qemu-system-* to use (first on PATH)")
    parser.add_argument("--host-kernel", action="store_true", help="boot the plugin's default kernel, not the "
                        "one built from source")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="hard cap of one run, s (default 600)")
    parser.add_argument("--command-timeout", type=float, default=180.0, help="cap of one command, s (default 180)")
    parser.add_argument("--commands", type=int, default=50, help="commands per l3-loop run (default 50)")
    parser.add_argument("--kselftests", default=",".join(KSELFTESTS), help="comma list for kselftests-l1")
    parser.add_argument("--kut-tests", default=",".join(KUT_TESTS), help="comma list for kut-l2")
    parser.add_argument("--json", type=Path, metavar="FILE", help="append one JSON line per workload")
    parser.add_argument("--logs", type=Path, default=REPO / "benchmarks" / "results" / "stress-logs",
                        help="where the consoles of runs that did not pass are kept (default: %(default)s)")
    args = parser.parse_args()
    workloads = list(dict.fromkeys(args.workload or WORKLOADS))
    qemu_dir = use_qemu_dir(args.qemu_dir) if args.qemu_dir else None
    user = user_options(args.option)
    ctx = Context(args.run_timeout, args.command_timeout, args.commands, label=args.label, logs=args.logs)
    prepare(workloads, args, ctx)
    progress(f"{time.strftime('%Y-%m-%d %H:%M')}: {shlex.join(sys.argv)}")
    rows: list[Row] = []
    facts: dict[str, str] = {}
    interrupted = False
    with busy_core(args.busy):
        for name in workloads:
            options = options_for(name, ctx, user, qemu_dir)
            row = Row(args.label, name, args.busy, options, skipped=ctx.unavailable.get(name))
            rows.append(row)
            if row.skipped is None:
                try:
                    session_for(**options)  # a bad --option fails here, before any guest boots
                except NestedKvmError as exc:
                    row.skipped = str(exc)
            for number in range(1, args.runs + 1):
                if row.skipped is not None:
                    break
                progress(f"[{args.label} {name} {number}/{args.runs}{' busy' if args.busy else ''}]")
                try:
                    run = one_run(name, options, ctx, facts)
                except WorkloadSkipped as exc:
                    row.skipped = f"skipped by the plugin: {exc}"
                    break
                except KeyboardInterrupt:
                    interrupted = True
                    break
                row.runs.append(run)
                where = (f" at L{run.level}" if run.level else "") + (f" during {run.during}" if run.during else "")
                progress(f"  -> {run.outcome}{where} in {run.seconds:.1f} s" + (f": {run.note}" if run.note else ""))
            if args.json:
                write_json(args.json, row, facts, interrupted)
            if interrupted:
                break
    print_table(rows, facts)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
