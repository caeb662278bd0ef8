"""Unit tests for link.py: HostLink's run dirs and sockets on L0, ParentLink borrowing them (real AF_UNIX)."""

from __future__ import annotations

import os
import select
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.base.errors import GuestCrashed
from pytest_nestedkvm.boot.layout import SOCKET_ROLES as CARRIED_ROLES
from pytest_nestedkvm.boot.qemu import ParentEnds
from pytest_nestedkvm.machine.link import HostLink, ParentLink

Serve = Callable[[Path], socket.socket]
STAGING = ".new"


def fine() -> None:
    return None


@pytest.fixture
def run_root() -> Iterator[Path]:
    """Short: a unix socket path must fit in 108 bytes, and pytest's tmp_path can be long."""
    root = Path(tempfile.mkdtemp(prefix="nk-link-"))
    yield root / "run"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def link(run_root: Path) -> Iterator[HostLink]:
    host_link = HostLink(run_root, deepest=2)
    host_link.prepare()
    yield host_link
    host_link.close()


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Listening unix sockets, as QEMU's server=on chardevs are."""
    servers: list[socket.socket] = []

    def listen(path: Path) -> socket.socket:
        # Listening before it appears at `path` (the link connects as soon as the path exists, and a
        # socket bound but not yet listening refuses): bound under a staging name, then moved.
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path) + STAGING)
        server.listen(1)
        os.rename(str(path) + STAGING, path)
        servers.append(server)
        return server

    yield listen
    for server in servers:
        server.close()


def served_at(name: str) -> Path:
    """Where a server of `serve` is, from the name it was bound under."""
    return Path(name.removesuffix(STAGING))


def accepted(server: socket.socket) -> socket.socket:
    assert select.select([server], [], [], 5)[0], "nothing connected"
    return server.accept()[0]


def test_prepare_makes_private_run_dirs_and_drops_old_ones(run_root: Path) -> None:
    stale = run_root / "l1" / "cmd.sock"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    host_link = HostLink(run_root, deepest=2)
    host_link.prepare()
    for level in (1, 2):
        run_dir = run_root / f"l{level}"
        assert host_link.paths(level).run_dir == run_dir
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert not stale.exists()
    assert host_link.console_path == run_root / "l1" / "console.log"
    assert host_link.console_of(2) == run_root / "l2" / "console.log"


def test_stream_waits_for_a_socket_that_appears_later(link: HostLink, serve: Serve) -> None:
    path = link.paths(1).end("cmd")
    timer = threading.Timer(0.3, serve, [path])
    timer.start()
    try:
        sock = link.stream("cmd", Deadline.after(5), fine)
    finally:
        timer.join()
    assert served_at(sock.getpeername()) == path
    assert link.stream("cmd", Deadline.after(5), fine) is sock  # connected once


def test_stream_stops_waiting_when_check_raises(link: HostLink) -> None:
    def dead() -> None:
        raise GuestCrashed("l1 QEMU exited with status 1", level=1, exit_status=1)

    with pytest.raises(GuestCrashed, match="status 1"):
        link.stream("cmd", Deadline.after(30), dead)


def test_stream_times_out_naming_the_socket(link: HostLink) -> None:
    with pytest.raises(TimeoutError, match=r"QEMU socket .*/l1/ctl\.sock did not happen within 0\.1 s"):
        link.stream("ctl", Deadline.after(0.1), fine)
    with pytest.raises(TimeoutError, match=r"L1 QMP socket .*/l1/qmp\.sock did not happen within 0\.1 s"):
        link.qmp(Deadline.after(0.1), fine)


class FakeQemu:
    """L1's QEMU as far as the link sees it: it serves its console first and waits for a reader
    (wait=on), and only then the streams of deeper levels (their consoles and carried roles)."""

    def __init__(self, link: HostLink, serve: Serve) -> None:
        self.link, self.serve = link, serve
        self.far: dict[tuple[int, str], socket.socket] = {}
        self.servers: dict[tuple[int, str], socket.socket] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.link.l1_console:
            server = self.serve(self.link.paths(1).end("console"))
            self.far[(1, "console")] = accepted(server)
        for level in range(2, self.link.deepest + 1):
            for role in ("console", *CARRIED_ROLES):
                self.servers[(level, role)] = self.serve(self.link.paths(level).end(role))

    def connected(self) -> dict[tuple[int, str], socket.socket]:
        """The far ends of everything after_start connected."""
        self.thread.join(5)
        for key, server in self.servers.items():
            self.far[key] = accepted(server)
        return self.far


def start(link: HostLink, serve: Serve) -> dict[tuple[int, str], socket.socket]:
    """Start "L1's QEMU", let the link connect what it serves, and return the far ends."""
    qemu = FakeQemu(link, serve)
    link.after_start(Deadline.after(5), fine)
    return qemu.connected()


def wait_for(path: Path, data: bytes) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes() == data:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} holds {path.read_bytes() if path.exists() else None!r}, not {data!r}")


def test_after_start_connects_the_carried_streams_of_deeper_levels(link: HostLink, serve: Serve) -> None:
    far = start(link, serve)
    for role in CARRIED_ROLES:
        far[(2, role)].sendall(role.encode())
        sock = link.carried(2, role)
        assert served_at(sock.getpeername()) == link.paths(2).end(role)
        assert sock.recv(16) == role.encode()
        far[(2, role)].close()


def test_after_start_connects_l1s_console_first(link: HostLink, serve: Serve) -> None:
    # L1's QEMU serves nothing else before its console has a reader: waiting for any other
    # socket first would time out.
    far = start(link, serve)
    assert set(far) == {(1, "console"), (2, "console"), *((2, role) for role in CARRIED_ROLES)}
    assert served_at(far[(1, "console")].getsockname()) == link.paths(1).end("console")


def test_after_start_records_each_console_into_its_log(run_root: Path, serve: Serve) -> None:
    host_link = HostLink(run_root, deepest=3)
    host_link.prepare()
    try:
        far = start(host_link, serve)
        for level in (1, 2, 3):
            far[(level, "console")].sendall(f"L{level} boots\r\n".encode())
        for level in (1, 2, 3):
            wait_for(host_link.console_of(level), f"L{level} boots\r\n".encode())
            assert host_link.console_of(level) == run_root / f"l{level}" / "console.log"
    finally:
        host_link.close()


def test_console_logs_are_bounded_by_the_links_limit(run_root: Path, serve: Serve) -> None:
    host_link = HostLink(run_root, deepest=1, console_limit=1 << 20)
    host_link.prepare()
    try:
        far = start(host_link, serve)
        far[(1, "console")].sendall(b"x" * (3 << 20))
        wait_for(host_link.console_path,
                 b"x" * (1 << 20) + b"\n[nestedkvm: console output beyond 1 MiB dropped (--nested-console-limit)]\n")
    finally:
        host_link.close()


def test_without_l1_console_only_deeper_consoles_are_recorded(run_root: Path, serve: Serve) -> None:
    # A serial-login L1: its console is the socket it logs in on, logged by QEMU itself.
    host_link = HostLink(run_root, deepest=2, l1_console=False)
    host_link.prepare()
    try:
        far = start(host_link, serve)
        assert (1, "console") not in far
        assert not host_link.paths(1).end("console").exists()
        far[(2, "console")].sendall(b"L2 boots\n")
        wait_for(host_link.console_of(2), b"L2 boots\n")
        assert not host_link.console_path.exists()
        host_link.settle_console(1)  # nothing of its own to settle
    finally:
        host_link.close()


def test_after_start_connects_only_l1s_console_without_deeper_levels(run_root: Path, serve: Serve) -> None:
    host_link = HostLink(run_root, deepest=1)
    host_link.prepare()
    try:
        assert set(start(host_link, serve)) == {(1, "console")}
        with pytest.raises(KeyError):
            host_link.carried(2, "cmd")
    finally:
        host_link.close()


def test_after_start_connects_nothing_without_deeper_levels_or_l1_console(run_root: Path) -> None:
    host_link = HostLink(run_root, deepest=1, l1_console=False)
    host_link.prepare()
    host_link.after_start(Deadline.after(0.1), fine)  # would time out if it waited for a socket
    with pytest.raises(KeyError):
        host_link.carried(2, "cmd")
    host_link.close()


def test_settle_console_waits_for_a_quiet_console(link: HostLink, serve: Serve) -> None:
    far = start(link, serve)
    far[(2, "console")].sendall(b"last words\n")
    wait_for(link.console_of(2), b"last words\n")
    started = time.monotonic()
    link.settle_console(2)
    link.settle_console(4)  # no such level: nothing to wait for
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("keep_files", [False, True])
def test_close_closes_sockets_and_removes_run_dirs_unless_kept(
    link: HostLink, serve: Serve, keep_files: bool,
) -> None:
    far = start(link, serve)
    sockets = [link.carried(2, role) for role in ("console", *CARRIED_ROLES)]
    recorders = [link._recorders[level] for level in (1, 2)]
    far[(1, "console")].sendall(b"L1 boots\n")
    wait_for(link.console_path, b"L1 boots\n")
    link.close(keep_files=keep_files)
    assert all(sock.fileno() == -1 for sock in sockets)
    assert all(sock.recv(1) == b"" for sock in far.values())  # the far ends see the close
    assert not any(recorder.thread.is_alive() for recorder in recorders)  # woken and joined
    with pytest.raises(KeyError):
        link.carried(2, "cmd")
    for level in (1, 2):
        assert link.paths(level).run_dir.exists() is keep_files
    assert link.console_path.exists() is keep_files  # the log stays with the kept files


def test_parent_link_borrows_the_host_links_sockets(link: HostLink, serve: Serve) -> None:
    start(link, serve)
    child = ParentLink(link, 2)
    for role in CARRIED_ROLES:
        assert child.stream(role, Deadline.after(1), fine) is link.carried(2, role)
        assert child.carried(2, role) is link.carried(2, role)
    assert child.console_path == link.paths(2).console
    assert child.console_of(2) == link.console_of(2)
    assert isinstance(child.ends, ParentEnds)
    child.close()
    assert link.carried(2, "cmd").fileno() != -1  # the sockets stay with L1's link


def test_parent_link_settles_the_console_through_its_parent() -> None:
    class Parent:
        def __init__(self) -> None:
            self.settled: list[int] = []

        def settle_console(self, level: int) -> None:
            self.settled.append(level)

    parent = Parent()
    ParentLink(parent, 3).settle_console(3)  # type: ignore[arg-type]
    assert parent.settled == [3]


def test_parent_link_prepare_drains_stale_bytes(link: HostLink, serve: Serve) -> None:
    far = start(link, serve)
    for role in CARRIED_ROLES:
        far[(2, role)].sendall(b"left by the previous L2 " * 100)
        assert select.select([link.carried(2, role)], [], [], 5)[0]
    ParentLink(link, 2).prepare()
    for role in CARRIED_ROLES:
        sock = link.carried(2, role)
        assert not select.select([sock], [], [], 0)[0], f"{role} still has stale bytes"
        assert sock.getblocking()
        far[(2, role)].sendall(b"fresh")
        assert sock.recv(64) == b"fresh"
