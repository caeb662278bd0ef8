"""What went wrong with a guest, and which test it happened to.

Forensics judges an `Evidence` record, what a guest showed, and acts on nothing: guest.py
gathers the record and does what acts on a guest (settling its console, asking whether a
stalled guest still answers, marking it wedged) before it gathers or after forensics decided.
Marks record where each running guest stood when a test started; after the test, the first
(outermost) guest that crashed or printed a kernel problem meanwhile is the test's Trouble
(guest.trouble_since), which reaches users through trouble.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..base.errors import (
    BootEnd,
    BootError,
    GuestCrashed,
    GuestWedged,
    LoginFailed,
    NestedKvmError,
    SshError,
)
from .console import Console, ProblemKind, problem_kind, stall_kind

TroubleKind = ProblemKind | Literal[  # ProblemKind: seen on the console
    "kernel stall",  # an RCU stall, lockup or hung task on hardware KVM: possibly the hypervisor under test
    "wedged",  # the same on emulated virtualization, or a boot that never answered there: the emulator's
    "reset", "shut down", "qemu exited", "unresponsive",  # seen from outside
]
# Kinds that emulated virtualization produces on its own here (TCG's SVM): with `emulated` set,
# such a test runs again on fresh guests (--nested-emulator-reruns).
EMULATOR_KINDS: frozenset[TroubleKind] = frozenset({"wedged", "reset"})
QEMU_LINES = 8  # lines of QEMU's own output gathered for an error (the last 5 that say something are shown)


@dataclass(frozen=True)
class Trouble:
    """A guest that crashed or complained during a test: which level, what kind, a one-line
    headline, and its console output from the start of the test."""

    level: int
    kind: TroubleKind
    headline: str
    console: str
    emulated: bool = False  # the guest's virtualization was emulated (TCG, or KVM on TCG's SVM)

    @property
    def emulator_fault(self) -> bool:
        """A wedge or a reset without a panic where the virtualization is emulated: the emulator's doing."""
        return self.emulated and self.kind in EMULATOR_KINDS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConsoleMark:
    """Where a running guest stood when a test started."""

    console: int  # bytes in its console log
    kernel_log_tag: str | None  # a line written into its kernel log (only when artifacts are kept)


@dataclass(frozen=True)
class Evidence:
    """What a guest showed, for a judgement here; gathered by guest.py (evidence_of and the
    gatherers beside it). The fields from `alive` on are gathered only for the judgements that
    read them, as their comments say; elsewhere they keep their defaults."""

    level: int
    name: str
    console: Console  # its serial console log: read here, never written
    console_start: int = 0  # console bytes before this boot
    console_ready: int = 0  # console bytes before it was ready
    emulated: bool = False  # its virtualization is emulated (TCG, or KVM on TCG's SVM)
    process: str = "QEMU"  # what runs it, in messages: "xl create" for a Xen domU (its device model is a QEMU)
    wedged: GuestWedged | None = None  # taken as wedged (a stall line, or no answer)
    channel_trouble: str | None = None  # why its command channel stopped working, if it did
    boots: int = 1  # how many times it was started
    boot_timeout: float = 0.0
    alive: bool = False  # trouble_in: it ran and answered when the judgement began
    exit_status: int | None = None  # trouble_in (a guest down), exit_error: None while its QEMU runs
    qmp_events: tuple[dict[str, Any], ...] = ()  # trouble_in: QEMU's events, once it exited
    parent_lost: bool = False  # exit_error: its QEMU went down with the guest it ran in
    parent: Evidence | None = None  # exit_error, where parent_lost: that guest's evidence
    qemu_output: str = ""  # exit_error, boot_error: the last QEMU_LINES lines of QEMU's output
    console_tail: str = ""  # boot_error: its last console lines as the boot ended


def wedge_error(guest: Evidence, line: str, stall: str | None = None) -> GuestWedged:
    """The error for a guest on emulated virtualization whose console printed the stall `line`
    (or that showed `stall` otherwise): "L1 wedged: RCU stall while its KVM guest ran (...): <line>"."""
    stall = stall or stall_kind(line)
    return GuestWedged(f"L{guest.level} wedged: {stall}{_stall_context(guest, line)} (its virtualization is "
                       f"emulated, so this is taken as the emulator's fault): {line}",
                       level=guest.level, stall=stall, line=line)


def _stall_context(guest: Evidence, line: str) -> str:
    """" while its KVM guest ran" when the kernel's report of the stall shows KVM at work, else ""."""
    text = guest.console.read(max(guest.console_start, guest.console.size() - (64 << 10)))
    at = text.find(line)
    report = text[at: at + 8192] if at >= 0 else ""
    return " while its KVM guest ran" if re.search(r"\bkvm|svm_vcpu_run|vmx_vcpu_run", report) else ""


def trouble_in(
    guest: Evidence, at: ConsoleMark, deeper: Sequence[int],
) -> tuple[Trouble | None, GuestWedged | None]:
    """Whether `guest` crashed or printed a kernel problem since `at`; `deeper`: the levels below it
    that were marked too (they go down with it). Second, a wedge found here (a stall line on a guest
    that is down where its virtualization is emulated): the caller marks the guest with it."""
    level = guest.level
    since = max(at.console, guest.console_ready)  # a reboot inside the test starts a new boot log
    if guest.wedged is not None:  # seen while a command waited: a stall line, or no answer at all
        return Trouble(level, "wedged", str(guest.wedged), guest.console.read(at.console), emulated=True), None
    # A live emulated guest's stall lines are its stall watch's, which ran before this was gathered.
    stall = None if guest.emulated and guest.alive else guest.console.first_stall(since)
    if stall is not None:
        return _stall_trouble(guest, stall, guest.console.read(at.console))
    problem = guest.console.first_problem(since)
    if problem is None and guest.alive:
        return None, None
    status = guest.exit_status
    kind, headline = _what_happened(guest, problem, status)
    if deeper and status is not None:
        headline += f"; {', '.join(f'L{d}' for d in deeper)} went down with it"
    return Trouble(level, kind, f"L{level} {headline}", guest.console.read(at.console), guest.emulated), None


def _stall_trouble(guest: Evidence, line: str, console: str) -> tuple[Trouble, GuestWedged | None]:
    """A stall line during a test: the emulator wedging the guest where its virtualization is
    emulated (the guest is replaced: the wedge comes back for the caller to mark), else a kernel
    stall for the user to look into."""
    if guest.emulated:
        wedged = wedge_error(guest, line)
        return Trouble(guest.level, "wedged", str(wedged), console, emulated=True), wedged
    return Trouble(guest.level, "kernel stall", f"L{guest.level} {stall_kind(line)} during this test on hardware "
                   f"KVM (possibly the hypervisor under test): {line}", console), None


def boot_trouble(guest: Evidence, error: BootError) -> Trouble:
    """The trouble of a test whose guest did not boot."""
    kind: TroubleKind = ("wedged" if error.why in ("wedged", "timeout") else "reset" if error.why == "reset"
                         else "kernel panic" if error.panicked else "qemu exited")
    return Trouble(error.level, kind, f"L{error.level} {kind} while booting: {str(error).splitlines()[0]}",
                   guest.console.read(guest.console_start), guest.emulated)


def _what_happened(guest: Evidence, problem: str | None, status: int | None) -> tuple[TroubleKind, str]:
    if problem is not None:
        named = problem_kind(problem)
        return named, f"{named} during this test: {problem}"
    event = _exit_event(guest) if status is not None else None
    if event is not None:
        kind, source = event
        return kind, f"{kind} during this test ({source}; {guest.process} exit status {status})"
    if status is not None:
        return "qemu exited", f"{guest.process} exited with status {status} during this test (no panic on its console)"
    broken = guest.channel_trouble or "its QEMU runs but its shell does not answer"
    if guest.emulated:  # a guest that froze whole: the emulator's, as a stall is
        return "wedged", f"wedged: no answer during this test (its virtualization is emulated): {broken}"
    return "unresponsive", f"stopped answering during this test: {broken}"


def _exit_event(guest: Evidence) -> tuple[TroubleKind, str] | None:
    """What QEMU's own events say ended the guest: a pvpanic report, or a guest shutdown/reset."""
    events = guest.qmp_events
    for event in events:
        if event.get("event") == "GUEST_PANICKED":
            return "kernel panic", "QMP GUEST_PANICKED"
    for event in events:
        if event.get("event") == "SHUTDOWN":
            reason = event.get("data", {}).get("reason", "unknown")
            # A reset under -no-reboot ends QEMU: a triple fault, or the guest asking for a reboot.
            return "reset" if reason == "guest-reset" else "shut down", f"QMP SHUTDOWN, reason {reason}"
    return None


def exit_error(guest: Evidence) -> GuestCrashed:
    """The error for a guest whose QEMU is gone: status, console problem, QEMU's last words."""
    if guest.parent_lost:
        parent = guest.parent
        assert parent is not None
        why = (str(exit_error(parent)) if parent.exit_status is not None or parent.parent_lost
               else parent.channel_trouble or f"{parent.name} was restarted (boot {parent.boots})")
        return GuestCrashed(f"{guest.name} went down with its parent: {why}", level=guest.level, parent_down=True)
    status = guest.exit_status
    # The panic that ended it, else the first problem line: a WARN while booting named "kernel WARN",
    # not taken for the reason QEMU exited (it was "kernel problem" either way).
    panic = guest.console.first_panic(guest.console_start)
    problem = panic or guest.console.first_problem(guest.console_start)
    what = f"{problem_kind(problem)}: {problem}" if problem else "no kernel panic on the console"
    qemu_said = _qemu_said(guest)
    return GuestCrashed(
        f"{guest.name} {guest.process} exited with status {status} ({what})"
        + (f"\nQEMU said:\n{qemu_said}" if qemu_said else "")
        + f"\nlast console lines:\n{guest.console.tail()}",
        level=guest.level, exit_status=status,
        panicked=panic is not None,
    )


def boot_error(guest: Evidence, exc: NestedKvmError | TimeoutError) -> BootError:
    """Why a boot ended without a ready guest, as a BootError whose `why` callers decide on (`exc`:
    what ended it, the guest's exit_error where its QEMU is gone)."""
    tail = f"\nlast console lines:\n{guest.console_tail}"
    if isinstance(exc, GuestWedged):
        return BootError(f"{guest.name} wedged while booting: {exc}{tail}", level=guest.level, why="wedged")
    if isinstance(exc, GuestCrashed):
        why: BootEnd = "parent_down" if exc.parent_down else (
            "reset" if exc.exit_status == 0 and not exc.panicked else "crashed")
        return BootError(f"{guest.name} died while booting: {exc}", level=guest.level, why=why,
                         exit_status=exc.exit_status, panicked=exc.panicked)
    if isinstance(exc, LoginFailed):
        return BootError(f"{exc}{tail}", level=guest.level, why="login")
    if isinstance(exc, SshError):
        hint = ("\nIf the image has no cloud-init, pass --nested-login USER:PASSWORD to log in on its serial "
                "console instead.")
        return BootError(f"{exc}{hint}{tail}", level=guest.level, why="ssh")
    what = str(exc) if isinstance(exc, TimeoutError) else "its command channel never answered"
    qemu_said = _qemu_said(guest)
    return BootError(
        f"{guest.name} did not boot within {guest.boot_timeout:g} s: {what} "
        "(raise --nested-boot-timeout if the host is just slow)"
        + (f"\nQEMU said:\n{qemu_said}" if qemu_said else "") + tail,
        level=guest.level, why="timeout",
    )


def _qemu_said(guest: Evidence) -> str:
    """QEMU's last words, without its note that it waited for the console reader (wait=on)."""
    lines = guest.qemu_output.splitlines()
    return "\n".join([line for line in lines if "QEMU waiting for connection" not in line][-5:])
