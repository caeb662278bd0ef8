"""SSH (paramiko) into the built-in guests: the session key, SFTP copies, L2 through L1, loopback only."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import paramiko
import pytest

from pytest_nestedkvm import Guest
from pytest_nestedkvm.machine.process import HostProcess

MIB = 1 << 20


def listening_tcp(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def qemu_pid(guest: Guest) -> int:
    assert isinstance(guest.process, HostProcess) and guest.process.pid is not None
    return guest.process.pid


def test_l1_ssh_is_root_with_the_session_key(l1: Guest) -> None:
    _, out, _ = l1.ssh.exec_command("id -u; cat /proc/sys/kernel/random/boot_id", timeout=120)
    uid, boot_id = out.read().decode().split()
    assert uid == "0"
    assert boot_id == l1.succeed("cat /proc/sys/kernel/random/boot_id").strip()  # the same guest
    key = l1.ssh_key
    assert key is not None
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.path.parent.stat().st_mode) == 0o700


def test_password_authentication_is_never_offered(l1: Guest) -> None:
    transport = l1.ssh.get_transport()
    assert transport is not None
    host, port = transport.getpeername()[:2]
    with paramiko.Transport((host, port)) as probe:
        probe.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as refused:
            probe.auth_password("root", "root")
    assert refused.value.allowed_types == ["publickey"]


# 50 MiB is the bar, at L1; through L1 to L2 a smaller file proves the same path for less emulated work.
@pytest.mark.parametrize(("level", "mib"), [(1, 50), (2, 8)])
def test_put_and_get_exact(nested_guest, level: int, mib: int, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    guest = nested_guest(level)
    source = tmp_path / "payload"
    source.write_bytes(os.urandom(mib * MIB))
    source.chmod(0o751)
    guest.put(source, "/tmp/payload")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert guest.succeed("stat -c %a /tmp/payload; sha256sum /tmp/payload").split()[:2] == ["751", digest]
    back = tmp_path / "back"
    guest.get("/tmp/payload", back)
    guest.succeed("rm /tmp/payload")
    assert back.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o751


def test_get_drops_set_id_sticky_and_world_writable_bits(l1: Guest, tmp_path: Path) -> None:
    l1.succeed("echo x > /tmp/loose; chmod 7777 /tmp/loose")
    l1.get("/tmp/loose", tmp_path / "loose")
    assert stat.S_IMODE((tmp_path / "loose").stat().st_mode) == 0o775


@pytest.mark.nested(level=2)
def test_l2_is_reached_through_l1_and_never_on_l0(l1: Guest, l2: Guest) -> None:
    _, out, _ = l2.ssh.exec_command("cat /proc/sys/kernel/random/boot_id", timeout=240)
    assert out.read().decode().strip() == l2.succeed("cat /proc/sys/kernel/random/boot_id").strip()
    transport = l2.ssh.get_transport()
    assert transport is not None
    assert isinstance(transport.sock, paramiko.Channel)  # a direct-tcpip channel of L1's connection
    assert transport.sock.get_transport() is l1.ssh.get_transport()
    l2_port = l2.qmp().forwarded_port(22)
    assert l2_port is not None
    listening_in_l1 = l1.succeed("cat /proc/net/tcp")
    assert f"0100007F:{l2_port:04X} 00000000:0000 0A" in listening_in_l1  # L1's 127.0.0.1 only


def test_nothing_listens_beyond_loopback_because_of_the_plugin(l1: Guest) -> None:
    l1.ssh  # noqa: B018 (SSH up: its forwarded port is listening)
    listening = listening_tcp(qemu_pid(l1))
    assert listening, "L1's QEMU should listen for SSH on L0's loopback"
    assert all(address == "127.0.0.1" for address, _ in listening), listening
