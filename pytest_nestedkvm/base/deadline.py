"""One way to wait: a Deadline that travels down from the caller's budget, and one retry helper.

A boot or a command gets a budget once (the boot and command timeouts); every wait
below it takes the time that is left, or a share of it. The few waits of a fixed number
of seconds are all in the table below, each with the reason it is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# -- The table: every wait of a fixed number of seconds ------------------------------------------
#
# Shares: a step takes deadline.share(NAME), at most NAME seconds and never more than what is left
# of the boot or command budget it runs in.
CONNECT_STEP = 10.0  # ssh.connect: one attempt to reach sshd (through the parent, TCP, banner), so another still fits
# link: QMP negotiation once QEMU greeted. It takes milliseconds, but a QEMU inside a guest that dies
# right after its greeting never closes the stream (the parent's port stays open).
QMP_NEGOTIATION = 10.0
CLOSE_GRACE = 5.0  # forensics.boot_error: a QEMU whose channel closed, to exit, so the error says how it died
PANIC_REPLY = 5.0  # Guest.crash: the sysrq-c command, whose reply may never come; the rest waits for the exit
LOGIN_STEP = 1.0  # serial_login: one wait for the getty's next line, then the guest's check and another Enter
SETPRIV_EXEC = 5.0  # HostProcess.start: setpriv exec'ing QEMU (milliseconds); until then pytest's death orphans it
#
# Fixed grace periods: where no budget exists, or the one there was is spent.
# A timed-out command (its budget is spent): the control shell's kill, then again the rest of the
# reply, before the channel counts as broken.
KILL_GRACE = 10.0
# Guest.close: QEMU's time between SIGTERM and SIGKILL, on L0 and inside a parent (whose stop
# command gets three times this: two such waits and the round trip). A close has no budget.
QEMU_STOP_GRACE = 5.0
QMP_REPLY = 10.0  # each QMP command's reply: the monitor outlives the boot that connected it; Guest.qmp() takes none
EXIT_EVENTS = 0.5  # forensics, after a test: QMP events that say why QEMU ended (a diagnosis has no budget)
# forensics: a dead guest's last console bytes reaching its log file: done once the stream was quiet
# CONSOLE_QUIET s, at most CONSOLE_SETTLE s (a diagnosis has no budget).
CONSOLE_SETTLE = 1.0
CONSOLE_QUIET = 0.1
RECORDER_JOIN = 1.0  # HostLink.close: a console recorder thread ending once its socket was shut down
SENDER_JOIN = 1.0  # hosting.put_through_port: the thread that wrote a file into a port, once the image read it
MIN_WAIT = 0.1  # ssh: a step or a copy started with nothing left gets this (a socket timeout of 0: "never block")
# Seconds x level: on emulated virtualization, while a command runs the control shell must answer
# `true` within this long (else GuestWedged). Fixed, not a share: near the command's end a share
# would report the command's own timeout as a frozen guest. It is asked every POKE seconds: each
# question is also an interrupt, which wakes a guest whose timer interrupt TCG lost (it would sleep
# until some interrupt came). benchmarks/stress.py, KVM selftests in L1, 20 runs each: asked every
# 30 s, 12 runs stalled 30 s; every 5 s, none (median 9.0 s); every 2 s, none (median 7.3 s).
HEARTBEAT = 30.0
POKE = 2.0
# guest.check_timer: a KVM guest on TCG's emulated SVM, once it answers, sleeps 0.1 s (an L2 lost its
# timer while booting and still answered its commands; nothing that waits on a timer ran on it).
TIMER_CHECK = 15.0
QEMU_VERSION_PROBE = 10.0  # base/host.py: `qemu-system-* --version` while probing the host, before any budget
QEMU_IMG_INFO = 60.0  # config/settings.py: qemu-img reading a disk image's backing chain while options are read
LDD = 30.0  # config/settings.py: ldd listing an inner QEMU's libraries while options are read
# suite_items: a kvm-unit-test's channel limit past x86/run's own timeout(1), scaled by pace and level
# like the suite's timeout: a backstop for a QEMU that timeout(1) did not end.
SUITE_BACKSTOP = 30.0
#
# Not here: poll intervals (channel.POLL, retry's `interval`), which never outlast the deadline.

# The clock and the sleep of every Deadline and retry: module names, so a unit test can run them on a fake clock.
monotonic = time.monotonic
sleep = time.sleep


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, and the budget it was made from (for messages)."""

    at: float
    budget: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - monotonic())

    def expired(self) -> bool:
        return monotonic() >= self.at

    def share(self, seconds: float) -> Deadline:
        """A deadline for one step: at most `seconds` from now, and never past this one."""
        return Deadline(min(self.at, monotonic() + seconds), self.budget)


def retry(
    what: str, check: Callable[[], T | None], deadline: Deadline, *, interval: float = 0.05,
    last_seen: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something truthy, and return that; the one bounded wait loop.

    `check` may raise to stop waiting (a guest found dead). On timeout, TimeoutError says
    what was awaited, for how long, and, when given, what was last seen.
    """
    while True:
        value = check()
        if value:
            return value
        if deadline.expired():
            seen = f"; last seen:\n{last_seen()}" if last_seen else ""
            raise TimeoutError(f"{what} did not happen within {deadline.budget:g} s{seen}")
        sleep(min(interval, deadline.remaining()) or interval)
