"""What went wrong with a guest, and which test it happened to.

Marks record where each running guest stood when a test started; after the test,
`trouble_since` names the first (outermost) guest that crashed or printed a kernel
problem meanwhile. A test's Trouble reaches users through trouble.py.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..base.deadline import CLOSE_GRACE, EXIT_EVENTS, Deadline, retry
from ..base.errors import (
    BootEnd,
    BootError,
    ChannelError,
    GuestCrashed,
    GuestWedged,
    LoginFailed,
    NestedKvmError,
    SshError,
)
from .console import ProblemKind, problem_kind, stall_kind

if TYPE_CHECKING:
    from .guest import Guest

TroubleKind = ProblemKind | Literal[  # ProblemKind: seen on the console
    "kernel stall",  # an RCU stall, lockup or hung task on hardware KVM: possibly the hypervisor under test
    "wedged",  # the same on emulated virtualization, or a boot that never answered there: the emulator's
    "reset", "shut down", "qemu exited", "unresponsive",  # seen from outside
]
# Kinds that emulated virtualization produces on its own here (TCG's SVM): with `emulated` set,
# such a test runs again on fresh guests (--nested-emulator-reruns).
EMULATOR_KINDS: frozenset[TroubleKind] = frozenset({"wedged", "reset"})


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


def wedge_error(guest: Guest, line: str, stall: str | None = None) -> GuestWedged:
    """The error for a guest on emulated virtualization whose console printed the stall `line`
    (or that showed `stall` otherwise): "L1 wedged: RCU stall while its KVM guest ran (...): <line>"."""
    stall = stall or stall_kind(line)
    return GuestWedged(f"L{guest.level} wedged: {stall}{_stall_context(guest, line)} (its virtualization is "
                       f"emulated, so this is taken as the emulator's fault): {line}",
                       level=guest.level, stall=stall, line=line)


def _stall_context(guest: Guest, line: str) -> str:
    """" while its KVM guest ran" when the kernel's report of the stall shows KVM at work, else ""."""
    text = guest.console.read(max(guest.console_start, guest.console.size() - (64 << 10)))
    at = text.find(line)
    report = text[at: at + 8192] if at >= 0 else ""
    return " while its KVM guest ran" if re.search(r"\bkvm|svm_vcpu_run|vmx_vcpu_run", report) else ""


def mark(guests: dict[int, Guest], number: int, tag_kernel_log: bool) -> dict[int, ConsoleMark]:
    """Where each running guest stands now: a test's trouble is what comes after."""
    return {
        level: ConsoleMark(guest.console.size(), _tag_kernel_log(guest, number) if tag_kernel_log else None)
        for level, guest in guests.items() if guest.alive
    }


def trouble_since(guests: dict[int, Guest], marks: dict[int, ConsoleMark]) -> Trouble | None:
    """The first guest (outermost) that crashed or printed a kernel problem since `marks`."""
    for level, at in sorted(marks.items()):
        guest = guests[level]
        if guest.stopped_on_purpose:
            continue  # the test (or the plugin, for nested_fresh) stopped it
        if not guest.alive:
            guest.link.settle_console(level)  # its last words are on their way to the file
        since = max(at.console, guest.console_ready)  # a reboot inside the test starts a new boot log
        if guest.emulated and guest.alive:  # a stall line it runs on from is no trouble (Guest.watch_stalls)
            with contextlib.suppress(GuestWedged):
                guest.watch_stalls()
        if guest.wedged is not None:  # seen while a command waited: a stall line, or no answer at all
            return Trouble(level, "wedged", str(guest.wedged), guest.console.read(at.console), emulated=True)
        stall = None if guest.emulated and guest.alive else guest.console.first_stall(since)
        if stall is not None:
            return _stall_trouble(guest, stall, guest.console.read(at.console))
        problem = guest.console.first_problem(since)
        if problem is None and guest.alive:
            continue
        status = guest.process.exit_status()
        kind, headline = _what_happened(guest, problem, status)
        deeper = [f"L{d}" for d in sorted(marks) if d > level]
        if deeper and status is not None:
            headline += f"; {', '.join(deeper)} went down with it"
        return Trouble(level, kind, f"L{level} {headline}", guest.console.read(at.console), guest.emulated)
    return None


def _stall_trouble(guest: Guest, line: str, console: str) -> Trouble:
    """A stall line during a test: the emulator wedging the guest where its virtualization is
    emulated (the guest is replaced), else a kernel stall for the user to look into."""
    if guest.emulated:
        return Trouble(guest.level, "wedged", str(guest.mark_wedged(line)), console, emulated=True)
    return Trouble(guest.level, "kernel stall", f"L{guest.level} {stall_kind(line)} during this test on hardware "
                   f"KVM (possibly the hypervisor under test): {line}", console)


def boot_trouble(guest: Guest, error: BootError) -> Trouble:
    """The trouble of a test whose guest did not boot."""
    kind: TroubleKind = ("wedged" if error.why in ("wedged", "timeout") else "reset" if error.why == "reset"
                         else "kernel panic" if error.panicked else "qemu exited")
    return Trouble(error.level, kind, f"L{error.level} {kind} while booting: {str(error).splitlines()[0]}",
                   guest.console.read(guest.console_start), guest.emulated)


def _what_happened(guest: Guest, problem: str | None, status: int | None) -> tuple[TroubleKind, str]:
    if problem is not None:
        named = problem_kind(problem)
        return named, f"{named} during this test: {problem}"
    event = _exit_event(guest) if status is not None else None  # waits up to EXIT_EVENTS
    if event is not None:
        kind, source = event
        return kind, f"{kind} during this test ({source}; QEMU exit status {status})"
    if status is not None:
        return "qemu exited", f"QEMU exited with status {status} during this test (no panic on its console)"
    broken = guest.channel_trouble or "its QEMU runs but its shell does not answer"
    if guest.emulated:  # a guest that froze whole: the emulator's, as a stall is
        return "wedged", f"wedged: no answer during this test (its virtualization is emulated): {broken}"
    return "unresponsive", f"stopped answering during this test: {broken}"


def _exit_event(guest: Guest) -> tuple[TroubleKind, str] | None:
    """What QEMU's own events say ended the guest: a pvpanic report, or a guest shutdown/reset."""
    events = guest.qmp_events(wait=EXIT_EVENTS)
    for event in events:
        if event.get("event") == "GUEST_PANICKED":
            return "kernel panic", "QMP GUEST_PANICKED"
    for event in events:
        if event.get("event") == "SHUTDOWN":
            reason = event.get("data", {}).get("reason", "unknown")
            # A reset under -no-reboot ends QEMU: a triple fault, or the guest asking for a reboot.
            return "reset" if reason == "guest-reset" else "shut down", f"QMP SHUTDOWN, reason {reason}"
    return None


def exit_error(guest: Guest) -> GuestCrashed:
    """The error for a guest whose QEMU is gone: status, console problem, QEMU's last words."""
    if guest.process.parent_lost:
        parent = guest.parent
        assert parent is not None
        why = (str(exit_error(parent)) if parent.process.exit_status() is not None or parent.process.parent_lost
               else parent.channel_trouble or f"{parent.name} was restarted (boot {parent.boots})")
        return GuestCrashed(f"{guest.name} went down with its parent: {why}", level=guest.level, parent_down=True)
    status = guest.process.exit_status()
    guest.link.settle_console(guest.level)
    problem = guest.console.first_problem(guest.console_start)
    what = f"kernel problem: {problem}" if problem else "no kernel panic on the console"
    qemu_said = _qemu_said(guest)
    return GuestCrashed(
        f"{guest.name} QEMU exited with status {status} ({what})"
        + (f"\nQEMU said:\n{qemu_said}" if qemu_said else "")
        + f"\nlast console lines:\n{guest.console.tail()}",
        level=guest.level, exit_status=status,
        panicked=guest.console.first_panic(guest.console_start) is not None,
    )


def boot_error(guest: Guest, exc: NestedKvmError | TimeoutError, deadline: Deadline) -> BootError:
    """Why a boot ended without a ready guest, as a BootError whose `why` callers decide on."""
    tail = f"\nlast console lines:\n{guest.console.tail()}"
    if isinstance(exc, ChannelError) and not isinstance(exc, SshError | LoginFailed):
        # A closed channel usually means QEMU is exiting: give it a moment to be reaped.
        with contextlib.suppress(TimeoutError):
            retry("QEMU exit", guest.exited, deadline.share(CLOSE_GRACE), interval=0.1)
    if not isinstance(exc, GuestCrashed) and guest.exited():
        exc = exit_error(guest)  # whatever the wait saw, a QEMU that is gone says why
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


def _qemu_said(guest: Guest) -> str:
    """QEMU's last words, without its note that it waited for the console reader (wait=on)."""
    lines = guest.process.output(8).splitlines()
    return "\n".join([line for line in lines if "QEMU waiting for connection" not in line][-5:])


def _tag_kernel_log(guest: Guest, number: int) -> str | None:
    """Write a line into the guest's kernel log: what a test added comes after it.

    (A tag, not a timestamp: printk's clock and /proc/uptime drift apart under TCG.)
    """
    tag = f"nestedkvm: test {number} starts"
    try:
        guest.succeed(f"echo '{tag}' > /dev/kmsg")
    except (NestedKvmError, AssertionError):
        return None
    return tag

