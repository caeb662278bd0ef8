"""The command API tests use on a guest (README: The Guest API): commands, and files over SSH.

Guest (guest.py) provides what these need: one command within a deadline (`_run`, which
also tells an emulator's wedge from the command's own trouble) and a connected SSH client
(`_open_ssh`, through the parent for a deeper guest).
"""

from __future__ import annotations

import os
from pathlib import Path

import paramiko

from ..base.deadline import Deadline, retry
from ..base.errors import CommandTimeout
from . import ssh
from .channel import Channel, CommandResult


class GuestApi:
    """run/succeed/fail/wait_until_succeeds, ssh/put/get, on top of what Guest provides."""

    name: str
    command_timeout: float
    channel: Channel

    def _run(self, command: str, deadline: Deadline) -> CommandResult:
        raise NotImplementedError

    def _open_ssh(self, deadline: Deadline) -> paramiko.SSHClient:
        raise NotImplementedError

    # -- SSH and files ---------------------------------------------------------------------

    @property
    def ssh(self) -> paramiko.SSHClient:
        """A connected paramiko client, as root with the session key; sshd starts on first use.

        L1 is reached on a port of L0's 127.0.0.1, deeper levels through their parent's
        connection (a direct-tcpip channel to the parent's loopback).
        """
        client = self.channel.ssh_client
        transport = None if client is None else client.get_transport()
        if client is None or transport is None or not transport.is_active():
            self.channel.ssh_client = client = self._open_ssh(Deadline.after(self.command_timeout))
        return client

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a file from L0 into the guest over SFTP; bytes and permission bits stay exact."""
        ssh.put(self.ssh, Path(local), remote, Deadline.after(self.command_timeout))

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy a file out of the guest to L0 over SFTP: the bytes exact, the permission bits too
        except setuid, setgid, sticky and world-writable, which are dropped."""
        ssh.get(self.ssh, remote, Path(local), Deadline.after(self.command_timeout))

    # -- commands --------------------------------------------------------------------------

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        return self._run(command, Deadline.after(self.command_timeout if timeout is None else timeout))

    def succeed(self, command: str, timeout: float | None = None) -> str:
        """Run `command`, require exit status 0, return its stdout."""
        result = self.run(command, timeout)
        if result.exit_status != 0:
            raise result.failure(self.name, "expected exit status 0")
        return result.stdout

    def fail(self, command: str, timeout: float | None = None) -> str:
        """Run `command`, require a non-zero exit status, return its stderr."""
        result = self.run(command, timeout)
        if result.exit_status == 0:
            raise result.failure(self.name, "expected a non-zero exit status")
        return result.stderr

    def wait_until_succeeds(self, command: str, timeout: float) -> str:
        """Run `command` until it exits 0 and return its stdout; CommandFailed at `timeout`.

        Each try gets what is left of one deadline, so the wait ends at `timeout`, not a whole
        `timeout` after the last try began. A try cut off there counts as one more failure once an
        earlier try finished; when none did, the command hangs: CommandTimeout.
        """
        deadline = Deadline.after(timeout)
        last: list[CommandResult] = []
        cut: list[CommandTimeout] = []

        def attempt() -> bool:
            if last and deadline.expired():
                return False  # retry's last look, after its sleep: no time left for another try
            try:
                last[:] = [self._run(command, deadline)]
            except CommandTimeout as exc:
                if not last:
                    raise
                cut[:] = [exc]
                return False
            return last[0].exit_status == 0

        try:
            retry(f"{command!r} succeeding on {self.name}", attempt, deadline, interval=0.2)
        except TimeoutError:
            also = "; the try after it was cut off at the timeout" if cut else ""
            raise last[0].failure(self.name, f"still failing after {timeout:g} s{also}") from (cut[0] if cut else None)
        return last[0].stdout
