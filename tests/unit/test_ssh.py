"""Unit tests for ssh.py: the session key, the sshd script, host key pinning, connect errors."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import paramiko
import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.base.errors import HostError
from pytest_nestedkvm.machine import ssh


def test_session_key_is_private_and_loadable(tmp_path: Path) -> None:
    key = ssh.make_session_key(tmp_path / "ssh")
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.path.parent.stat().st_mode) == 0o700
    assert paramiko.Ed25519Key.from_private_key_file(str(key.path)).get_base64() == key.pkey.get_base64()
    assert key.public_line.startswith("ssh-ed25519 AAAA")
    assert (key.path.parent / "id_ed25519.pub").read_text().strip() == key.public_line


def test_two_sessions_get_two_keys(tmp_path: Path) -> None:
    first, second = ssh.make_session_key(tmp_path / "a"), ssh.make_session_key(tmp_path / "b")
    assert first.public_line != second.public_line


def test_sshd_script_authorizes_only_the_key_and_never_passwords() -> None:
    if not ssh.SSHD.is_file():
        pytest.skip("openssh-server is not installed")
    script = ssh.sshd_script("ssh-ed25519 AAAAC3Nza x'y")
    assert "'ssh-ed25519 AAAAC3Nza x'\"'\"'y'" in script  # quoted for the guest's shell
    assert "PasswordAuthentication no" in script and "KbdInteractiveAuthentication no" in script
    assert "PermitRootLogin prohibit-password" in script


def test_sshd_script_without_sshd_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ssh, "SSHD", tmp_path / "sshd")
    with pytest.raises(HostError, match="apt-get install openssh-server"):
        ssh.sshd_script("ssh-ed25519 AAAA")


def test_pinned_host_key_rejects_another_key(tmp_path: Path) -> None:
    offered = ssh.make_session_key(tmp_path / "a").pkey
    other = ssh.make_session_key(tmp_path / "b").pkey
    client = paramiko.SSHClient()
    ssh._PinnedHostKey(f"{offered.get_name()} {offered.get_base64()} root@l1").missing_host_key(
        client, "127.0.0.1", offered)
    with pytest.raises(ssh.SshError, match="not the one the guest reported"):
        ssh._PinnedHostKey(f"{other.get_name()} {other.get_base64()}").missing_host_key(client, "127.0.0.1", offered)


def test_connect_to_a_closed_port_gives_up_with_the_last_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    expected = rf"l9: SSH on port {port} did not answer within 0.5 s \(last: .*Unable to connect"
    with pytest.raises(ssh.SshError, match=expected):
        ssh.connect("l9", port, ssh.make_session_key(tmp_path / "k"), deadline=Deadline.after(0.5))


@pytest.mark.parametrize(("said", "rejected"), [("Authentication timeout.", False), ("Authentication failed.", True)])
def test_an_authentication_timeout_is_a_slow_guest_not_a_rejected_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, said: str, rejected: bool,
) -> None:
    """paramiko raises the same exception class for both; a stalled guest's sshd is only slow (CI, 2026-12-05)."""
    def connect(self: paramiko.SSHClient, *args: object, **kwargs: object) -> None:
        raise paramiko.AuthenticationException(said)

    monkeypatch.setattr(paramiko.SSHClient, "connect", connect)
    with pytest.raises(ssh.SshError) as caught:
        ssh.connect("l2", 22, ssh.make_session_key(tmp_path / "k"), deadline=Deadline.after(0.5))
    assert caught.value.rejected_key is rejected
    assert ("rejected the session key" in str(caught.value)) is rejected
    assert ("did not finish authenticating" in str(caught.value)) is not rejected
