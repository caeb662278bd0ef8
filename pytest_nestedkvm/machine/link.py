"""How bytes reach a guest: on the host (unix sockets of L0) or through its parent.

L1's QEMU ends every stream of the chain on L0: its own, and those of deeper levels,
which pass through the virtio ports of each level above them (see qemu.py). So a
HostLink holds the sockets of all levels, and a ParentLink asks its parent's link for
the ones of its level; a nested guest never touches another guest's internals.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

from ..base.deadline import QMP_NEGOTIATION, RECORDER_JOIN, Deadline, retry
from ..boot.layout import CONSOLE, QMP, SOCKET_ROLES, Role
from ..boot.qemu import Ends, HostEnds, ParentEnds, RunPaths
from .console import ConsoleRecorder
from .qmp import Qmp

# Streams of a deeper guest that L1's QEMU carries to L0 (its console goes to a file).
Check = Callable[[], None]  # raises when the guest's QEMU died
DEFAULT_CONSOLE_LIMIT = 64 << 20  # bytes of console log kept per guest


class Link(Protocol):
    """What a guest needs to reach its QEMU's streams."""

    level: int

    @property
    def ends(self) -> Ends:
        """Where this guest's QEMU puts each stream (for its argv)."""

    @property
    def console_path(self) -> Path:
        """The file on L0 that holds this guest's console output."""

    def console_of(self, level: int) -> Path:
        """The console file of the guest at `level` (this one or deeper)."""

    def settle_console(self, level: int) -> None:
        """Wait briefly until what the guest at `level` printed is in its console file."""

    def prepare(self) -> None:
        """Before QEMU starts: a clean place for the streams (bytes of an earlier instance dropped)."""

    def after_start(self, deadline: Deadline, check: Check) -> None:
        """Once QEMU runs: connect what it serves."""

    def stream(self, role: Role, deadline: Deadline, check: Check) -> socket.socket:
        """This guest's own stream `role` ("cmd", "ctl", "serial"), connected."""

    def carried(self, level: int, role: Role) -> socket.socket:
        """A deeper level's stream that this link's chain carries."""

    def qmp(self, deadline: Deadline, check: Check) -> Qmp:
        """A connected QMP monitor of this guest's QEMU."""

    def close(self, keep_files: bool = False) -> None:
        """Drop the streams (and, on the host, the run files unless `keep_files`)."""


class HostLink:
    """L1: its QEMU serves unix sockets (and console files) in a private run directory per level."""

    def __init__(self, run_root: Path, deepest: int, *, console_limit: int = DEFAULT_CONSOLE_LIMIT,
                 l1_console: bool = True) -> None:
        self.level = 1
        self.run_root = run_root
        self.host_ends = HostEnds(run_root)
        self.deepest = deepest
        self.console_limit = console_limit
        self.l1_console = l1_console  # False: L1's console is its login socket, logged by QEMU itself
        self._sockets: dict[tuple[int, str], socket.socket] = {}
        self._recorders: dict[int, ConsoleRecorder] = {}

    @property
    def ends(self) -> Ends:
        return self.host_ends

    def paths(self, level: int) -> RunPaths:
        return self.host_ends.paths(level)

    @property
    def console_path(self) -> Path:
        return self.paths(1).console

    def console_of(self, level: int) -> Path:
        return self.paths(level).console

    def prepare(self) -> None:
        self._remove_run_dirs()
        for level in range(1, self.deepest + 1):
            self.paths(level).run_dir.mkdir(mode=0o700, parents=True)

    def after_start(self, deadline: Deadline, check: Check) -> None:
        """Connect the consoles (L1's QEMU waits for its own) and the streams of deeper levels:
        L1's QEMU serves them from its start."""
        for level in range(1 if self.l1_console else 2, self.deepest + 1):
            sock = self._connect(self.paths(level).end(CONSOLE), deadline, check)
            self._sockets[(level, CONSOLE)] = sock
            self._recorders[level] = ConsoleRecorder(sock, self.paths(level).console, self.console_limit)
        for level in range(2, self.deepest + 1):
            for role in SOCKET_ROLES:
                self._sockets[(level, role)] = self._connect(self.paths(level).end(role), deadline, check)

    def settle_console(self, level: int) -> None:
        recorder = self._recorders.get(level)
        if recorder is not None:
            recorder.settle()

    def stream(self, role: Role, deadline: Deadline, check: Check) -> socket.socket:
        key = (1, role)
        if key not in self._sockets:
            self._sockets[key] = self._connect(self.paths(1).end(role), deadline, check)
        return self._sockets[key]

    def carried(self, level: int, role: Role) -> socket.socket:
        return self._sockets[(level, role)]

    def qmp(self, deadline: Deadline, check: Check) -> Qmp:
        # Connected by _connect: the socket file exists a moment before QEMU listens on it.
        sock = self._connect(self.paths(1).qmp, deadline, check, what="L1 QMP socket")
        return Qmp(sock, deadline.share(QMP_NEGOTIATION))

    def close(self, keep_files: bool = False) -> None:
        for sock in self._sockets.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a console recorder blocked in recv()
            sock.close()
        self._sockets.clear()
        for recorder in self._recorders.values():
            recorder.thread.join(RECORDER_JOIN)
        self._recorders.clear()
        if not keep_files:
            self._remove_run_dirs()

    def _remove_run_dirs(self) -> None:
        for level in range(1, self.deepest + 1):
            shutil.rmtree(self.paths(level).run_dir, ignore_errors=True)

    @staticmethod
    def _connect(path: Path, deadline: Deadline, check: Check, what: str = "QEMU socket") -> socket.socket:
        def attempt() -> socket.socket | None:
            check()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))  # refused while QEMU has bound the socket but not yet listens
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                return None
            return sock

        return retry(f"{what} {path}", attempt, deadline)


class ParentLink:
    """L2 and deeper: streams end on the parent's pass-through virtio ports and reach L0 through
    the chain above; the sockets on L0 belong to L1's HostLink and are borrowed from there."""

    def __init__(self, parent: Link, level: int) -> None:
        self.parent = parent
        self.level = level

    @property
    def ends(self) -> Ends:
        return ParentEnds()

    @property
    def console_path(self) -> Path:
        return self.console_of(self.level)

    def console_of(self, level: int) -> Path:
        return self.parent.console_of(level)

    def settle_console(self, level: int) -> None:
        self.parent.settle_console(level)

    def prepare(self) -> None:
        for role in SOCKET_ROLES:
            _drain(self.carried(self.level, role))  # bytes left by a previous instance

    def after_start(self, deadline: Deadline, check: Check) -> None:
        return None  # the sockets were connected when L1 started

    def stream(self, role: Role, deadline: Deadline, check: Check) -> socket.socket:
        return self.carried(self.level, role)

    def carried(self, level: int, role: Role) -> socket.socket:
        return self.parent.carried(level, role)

    def qmp(self, deadline: Deadline, check: Check) -> Qmp:
        # QEMU inside the parent is up once its greeting arrives; connecting before that would block.
        sock = self.carried(self.level, QMP)
        retry(f"L{self.level} QMP greeting", partial(_checked, check, partial(_readable, sock)), deadline)
        return Qmp(sock.dup(), deadline.share(QMP_NEGOTIATION))

    def close(self, keep_files: bool = False) -> None:
        return None  # nothing of its own: the sockets stay with L1's link


def _checked(check: Check, condition: Callable[[], bool]) -> bool:
    check()
    return condition()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _drain(sock: socket.socket) -> None:
    """Discard whatever is buffered on `sock` without waiting."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 16):
            pass
    except (BlockingIOError, InterruptedError):
        pass
    finally:
        sock.setblocking(True)
