"""A guest's serial console: a log file QEMU writes, read back for tails and problems;
and, for disk images without cloud-init, a login on it (pexpect)."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pexpect.fdpexpect

from ..base.deadline import CONSOLE_QUIET, CONSOLE_SETTLE, LOGIN_STEP, Deadline, retry
from ..base.errors import printable

# Lines that mean the kernel under test is in trouble, each with the kind it names (the first
# fragment a line holds decides): the one place console lines are classified.
# A Xen L1 (--nested-hypervisor=xen) prints its own end: Xen's panic, or dom0 crashed under Xen
# (Xen then reboots, and QEMU exits without a kernel panic line): the hypervisor under test, not an
# emulator's reset.
ProblemKind = Literal["kernel panic", "kernel oops", "kernel BUG", "kernel WARN", "hypervisor panic",
                      "kernel problem"]
XEN_PREFIX = "(XEN) "
XEN_PANIC = XEN_PREFIX + "Panic on CPU"
PANICS: tuple[tuple[str, ProblemKind], ...] = (
    ("Kernel panic - not syncing", "kernel panic"), (XEN_PANIC, "hypervisor panic"),
    ("(XEN) Hardware Dom0 crashed", "hypervisor panic"),
)
PROBLEMS: tuple[tuple[str, ProblemKind], ...] = (
    *PANICS, ("Oops: ", "kernel oops"), ("BUG: ", "kernel BUG"),
    ("general protection fault", "kernel oops"), ("WARNING: CPU: ", "kernel WARN"),
)


def _any_line(fragments: tuple[tuple[str, ProblemKind], ...]) -> re.Pattern[bytes]:
    return re.compile(rb"^.*(" + b"|".join(re.escape(f.encode()) for f, _ in fragments) + rb").*$", re.MULTILINE)


PROBLEM = _any_line(PROBLEMS)
PANIC = _any_line(PANICS)

# Lines of a kernel whose CPUs or tasks stopped making progress (its own watchdogs speak), and
# the name of each kind. Under emulated virtualization these mean the emulator wedged the guest.
STALL = re.compile(
    rb"^.*(rcu: INFO: rcu_\w+ (?:detected stalls|self-detected stall)|rcu_\w+ kthread starved for|"
    rb"BUG: soft lockup|Watchdog detected hard LOCKUP|INFO: task .{1,64} blocked for more than|"
    rb"BUG: workqueue lockup).*$", re.MULTILINE)
STALL_KINDS: tuple[tuple[str, str], ...] = (
    ("rcu", "RCU stall"), ("soft lockup", "soft lockup"), ("hard LOCKUP", "hard lockup"),
    ("blocked for more than", "hung task"), ("workqueue lockup", "workqueue lockup"),
)


def problem_kind(line: str) -> ProblemKind:
    """What a PROBLEM line reports: "kernel panic", "kernel oops", ...; "kernel problem" otherwise."""
    return next((kind for fragment, kind in PROBLEMS if fragment in line), "kernel problem")


def stall_kind(line: str) -> str:
    """What a STALL line reports, in words: "RCU stall", "soft lockup", ..."""
    return next((kind for fragment, kind in STALL_KINDS if fragment in line), "stall")


def _line(data: bytes, match: re.Match[bytes]) -> str:
    """The matched line; Xen's panic header ("(XEN) Panic on CPU 0:") with its reason, which Xen
    prints on the next line ("(XEN) FATAL TRAP: vec 2, NMI")."""
    line = match.group(0).decode("utf-8", "replace").strip()
    if XEN_PANIC in line:
        after = data[match.end():].lstrip(b"\r\n").split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        reason = after.removeprefix(XEN_PREFIX).strip()
        if after.startswith(XEN_PREFIX) and reason.strip("*"):
            return f"{line} {reason}"
    return line


class Console:
    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, start: int = 0, end: int | None = None) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def tail(self, lines: int = 15) -> str:
        """The last `lines` lines, for error messages (control characters escaped)."""
        size = self.size()
        text = self.read(max(0, size - 64 * 1024))
        return printable("\n".join(text.rstrip("\n").splitlines()[-lines:]))

    def first_problem(self, start: int = 0) -> str | None:
        """The first panic/oops/BUG/WARN line printed at or after byte `start`, not counting
        stall lines (`BUG: soft lockup`): those are first_stall's."""
        data = self._bytes(start)
        found = (m for m in PROBLEM.finditer(data) if not STALL.match(m.group(0)))
        return next((_line(data, m) for m in found), None)

    def first_panic(self, start: int = 0) -> str | None:
        """The first kernel (or Xen) panic line at or after byte `start` (a WARN may come before it)."""
        return self._first(PANIC, start)

    def first_stall(self, start: int = 0) -> str | None:
        """The first RCU stall, soft or hard lockup or hung-task line at or after byte `start`."""
        return self._first(STALL, start)

    def scan_stall(self, start: int) -> tuple[str | None, int]:
        """The first stall line from byte `start`, and where a later scan may begin: after that
        line, or after the last whole line read (a line still being written is read again)."""
        data = self._bytes(start)
        match = STALL.search(data)
        if match is not None:
            return match.group(0).decode("utf-8", "replace").strip(), start + match.end()
        return None, start + data.rfind(b"\n") + 1

    def _first(self, pattern: re.Pattern[bytes], start: int) -> str | None:
        data = self._bytes(start)
        match = pattern.search(data)
        return _line(data, match) if match else None

    def _bytes(self, start: int) -> bytes:
        try:
            with self.path.open("rb") as f:
                f.seek(start)
                return f.read()
        except FileNotFoundError:
            return b""


class ConsoleRecorder:
    """Copies a console stream into its log file, up to `limit` bytes; past that one line says
    so and the rest is read and dropped (a guest printing in a loop cannot fill L0's disk)."""

    def __init__(self, stream: socket.socket, path: Path, limit: int) -> None:
        self.stream, self.path, self.limit = stream, path, limit
        self.last_byte = time.monotonic()
        self.thread = threading.Thread(target=self._copy, name=f"nestedkvm-console-{path.parent.name}", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        with self.path.open("ab") as log:
            written = log.tell()
            while True:
                try:
                    chunk = self.stream.recv(1 << 16)
                except OSError:
                    return  # closed by the link
                if not chunk:
                    return
                self.last_byte = time.monotonic()
                if written < self.limit:
                    kept = chunk[: self.limit - written]
                    log.write(kept)
                    written += len(kept)
                    if written >= self.limit:
                        log.write(f"\n[nestedkvm: console output beyond {self.limit >> 20} MiB dropped "
                                  "(--nested-console-limit)]\n".encode())
                    log.flush()

    def settle(self, quiet: float = CONSOLE_QUIET, at_most: float = CONSOLE_SETTLE) -> None:
        """Wait until the stream ended or was quiet for `quiet` s: what was sent is in the file."""
        def settled() -> bool:
            if not self.thread.is_alive():
                return True
            waiting = select.select([self.stream], [], [], 0)[0]
            return not waiting and time.monotonic() - self.last_byte >= quiet

        with contextlib.suppress(TimeoutError):
            retry("console output settling", settled, Deadline.after(at_most), interval=0.02)


# After the login: a raw, echo-less terminal (bytes pass unchanged both ways) and a
# non-interactive sh (stderr not a terminal: no prompts) for the command channel.
RAW_SHELL = b"stty raw -echo; exec sh 2>/dev/null\n"


def serial_login(
    sock: socket.socket, user: str, password: str, deadline: Deadline, check: Callable[[], None],
) -> None:
    """Log in on a getty at the far end of `sock` and leave a plain sh there for channel.py.

    `check` is called between waits and raises when the guest died.
    """
    session = pexpect.fdpexpect.fdspawn(sock.fileno())
    sent_user = sent_password = False
    while True:
        check()
        if deadline.expired():
            raise TimeoutError(f"no shell prompt after logging in within {deadline.budget:g} s")
        if not sent_user:
            session.send(b"\r")  # wakes a getty that printed its prompt before we connected
        index = session.expect([rb"login: ?$", rb"[Pp]assword: ?$", rb"Login incorrect", rb"[$#] ?$",
                                pexpect.TIMEOUT, pexpect.EOF], timeout=deadline.share(LOGIN_STEP).remaining())
        if index == 0:
            session.send(user.encode() + b"\r")
            sent_user = True
        elif index == 1 and sent_user:
            session.send(password.encode() + b"\r")
            sent_password = True
        elif index == 2:
            raise PermissionError(f"the guest refused the login as {user!r}: check --nested-login")
        elif index == 3 and sent_password:
            session.send(RAW_SHELL)
            return
        elif index == 5:
            raise ConnectionError("the serial console closed")
