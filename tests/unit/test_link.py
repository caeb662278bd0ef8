"""Unit tests for link.py: HostLink's run dirs and sockets on L0, ParentLink borrowing them (real AF_UNIX)."""

from __future__ import annotations

import select
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.deadline import Deadline
from pytest_nestedkvm.errors import GuestCrashed
from pytest_nestedkvm.link import CARRIED_ROLES, HostLink, ParentLink
from pytest_nestedkvm.qemu import ParentEnds

Serve = Callable[[Path], socket.socket]


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
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)
        return server

    yield listen
    for server in servers:
        server.close()


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
    assert sock.getpeername() == str(path)
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


def connect_carried(link: HostLink, serve: Serve) -> dict[str, socket.socket]:
    """Start "L1's QEMU" serving L2's streams, connect them, and return the server ends."""
    servers = {role: serve(link.paths(2).end(role)) for role in CARRIED_ROLES}
    link.after_start(Deadline.after(5), fine)
    return {role: accepted(server) for role, server in servers.items()}


def test_after_start_connects_the_carried_streams_of_deeper_levels(link: HostLink, serve: Serve) -> None:
    far = connect_carried(link, serve)
    for role in CARRIED_ROLES:
        far[role].sendall(role.encode())
        sock = link.carried(2, role)
        assert sock.getpeername() == str(link.paths(2).end(role))
        assert sock.recv(16) == role.encode()
        far[role].close()


def test_after_start_connects_nothing_without_deeper_levels(run_root: Path) -> None:
    host_link = HostLink(run_root, deepest=1)
    host_link.prepare()
    host_link.after_start(Deadline.after(0.1), fine)  # would time out if it waited for a socket
    with pytest.raises(KeyError):
        host_link.carried(2, "cmd")
    host_link.close()


@pytest.mark.parametrize("keep_files", [False, True])
def test_close_closes_sockets_and_removes_run_dirs_unless_kept(
    link: HostLink, serve: Serve, keep_files: bool,
) -> None:
    far = connect_carried(link, serve)
    sockets = [link.carried(2, role) for role in CARRIED_ROLES]
    link.close(keep_files=keep_files)
    assert all(sock.fileno() == -1 for sock in sockets)
    assert all(sock.recv(1) == b"" for sock in far.values())  # the far ends see the close
    with pytest.raises(KeyError):
        link.carried(2, "cmd")
    for level in (1, 2):
        assert link.paths(level).run_dir.exists() is keep_files


def test_parent_link_borrows_the_host_links_sockets(link: HostLink, serve: Serve) -> None:
    connect_carried(link, serve)
    child = ParentLink(link, 2)
    for role in CARRIED_ROLES:
        assert child.stream(role, Deadline.after(1), fine) is link.carried(2, role)
        assert child.carried(2, role) is link.carried(2, role)
    assert child.console_path == link.paths(2).console
    assert child.console_of(2) == link.console_of(2)
    assert isinstance(child.ends, ParentEnds)
    child.close()
    assert link.carried(2, "cmd").fileno() != -1  # the sockets stay with L1's link


def test_parent_link_prepare_drains_stale_bytes(link: HostLink, serve: Serve) -> None:
    far = connect_carried(link, serve)
    for role in CARRIED_ROLES:
        far[role].sendall(b"left by the previous L2 " * 100)
        assert select.select([link.carried(2, role)], [], [], 5)[0]
    ParentLink(link, 2).prepare()
    for role in CARRIED_ROLES:
        sock = link.carried(2, role)
        assert not select.select([sock], [], [], 0)[0], f"{role} still has stale bytes"
        assert sock.getblocking()
        far[role].sendall(b"fresh")
        assert sock.recv(64) == b"fresh"
