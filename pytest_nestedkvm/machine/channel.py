"""The command channel: exact command results over any byte stream to a POSIX shell.

The far end is a plain `sh` reading its input from the stream (a virtio-serial
port, an SSH channel). Each command goes out as one call of a small shell
function, with the command text single-quoted so no input can desynchronise the
shell's parser. The reply is framed by markers that carry a per-command random
nonce:

    \\n@@NK<nonce>:S\\n <stdout bytes> \\n@@NK<nonce>:E\\n <stderr bytes> \\n@@NK<nonce>:X <status>\\n

Bytes before the start marker (late output of an earlier command's background
job, messages of the shell itself) are dropped. A command runs in a subshell (its
`exit`, `cd` and `set` stay there) with stdin from /dev/null, no positional
parameters and no variable holding the nonce, so it cannot forge a marker. stdout
goes to the shell's own stdout (the stream; in the built-in guest a reply port the
shell opened write-only, apart from the port it reads commands from); stderr is spooled to one of 64 files used in turn
(truncated on reuse, as cheap as one file: a job left behind writes into its own
command's file, which comes round again only 64 commands later) and sent after
the first marker. `true` costs one fork, no exec. (Spooling stdout as well would also keep a job's stdout out of a
command that runs while the job prints, but its `cat` doubled the latency of
small commands under TCG: start background jobs with their output redirected.)
"""

from __future__ import annotations

import logging
import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import paramiko

from ..base.deadline import KILL_GRACE, PANIC_REPLY, Deadline
from ..base.errors import (
    ChannelError,
    CommandFailed,
    CommandTimeout,
    GuestSilent,
    LoginFailed,
    printable,
)
from ..boot.layout import CMD, CTL, REPLY_ROLE, SERIAL, ChannelKind
from . import ssh
from .console import serial_login
from .ssh import sshd_script

if TYPE_CHECKING:
    import socket

    from .link import Link

MARK = b"\n@@NK"
DEFAULT_OUTPUT_LIMIT = 64 << 20  # bytes of a command's stdout, and of its stderr, kept (--nested-output-limit)
TRUNCATED = b"\n[nestedkvm: %d more bytes were read and dropped: past --nested-output-limit]\n"
POLL = 0.25  # how often a blocked read checks whether the guest is still alive

# Defined once per connection. __nk runs command $2 with reply nonce $1; the
# subshell drops both from its positional parameters before the command runs. Its
# stderr is spooled to a file: a command that hid the spool directory (a tmpfs over
# /tmp) gets it made again; where that fails, the status line breaks the channel
# rather than report a status for a command that never ran.
# __nk_kill lists every descendant of a pid by walking /proc (repeated passes
# until the set stops growing) and SIGKILLs them.
PREAMBLE = r"""
__nk_d=${TMPDIR:-/tmp}/.nestedkvm.$$
rm -rf "$__nk_d"; mkdir -p -m 700 "$__nk_d"
__nk_i=0
__nk() {
  __nk_i=$((__nk_i % 64 + 1))
  printf '\n@@NK%s:S\n' "$1"
  if ! { [ -d "$__nk_d" ] || mkdir -p -m 700 "$__nk_d"; } 2>/dev/null; then
    printf '\n@@NK%s:E\n\n@@NK%s:X no spool directory %s\n' "$1" "$1" "$__nk_d"; return
  fi
  ( __nk_c=$2; set --; eval "$__nk_c" ) </dev/null 2>"$__nk_d/e$__nk_i"
  __nk_s=$?
  if [ -s "$__nk_d/e$__nk_i" ]; then
    printf '\n@@NK%s:E\n' "$1"; cat "$__nk_d/e$__nk_i"; printf '\n@@NK%s:X %d\n' "$1" "$__nk_s"
  else  # one write for both markers: nested, each write to the port is a trip through every level
    printf '\n@@NK%s:E\n\n@@NK%s:X %d\n' "$1" "$1" "$__nk_s"
  fi
}
__nk_kill() {
  __nk_set=" $1 "; __nk_grew=1
  while [ $__nk_grew = 1 ]; do
    __nk_grew=0
    for __nk_f in /proc/[0-9]*/stat; do
      read -r __nk_l < "$__nk_f" 2>/dev/null || continue
      __nk_p=${__nk_l%% *}
      set -- ${__nk_l##*) }
      case "$__nk_set" in *" $__nk_p "*) continue ;; esac
      case "$__nk_set" in *" $2 "*) __nk_set="$__nk_set$__nk_p "; __nk_grew=1 ;; esac
    done
  done
  set -- $__nk_set
  shift
  [ $# -gt 0 ] && kill -KILL "$@" 2>/dev/null
  echo $#
}
"""


class ByteStream(Protocol):
    """What the channel needs of a connection; sockets and paramiko channels have it."""

    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, size: int, /) -> bytes: ...
    def settimeout(self, timeout: float | None, /) -> None: ...


@dataclass(frozen=True)
class CommandResult:
    """What one command did. stdout/stderr decode losslessly (surrogateescape)."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def stdout_bytes(self) -> bytes:
        return self.stdout.encode("utf-8", "surrogateescape")

    @property
    def stderr_bytes(self) -> bytes:
        return self.stderr.encode("utf-8", "surrogateescape")

    def failure(self, guest: str, expectation: str) -> CommandFailed:
        """The assertion error for this result when it is not what `expectation` says."""
        def clip(text: str) -> str:
            text = printable(text.rstrip("\n"))
            return text if len(text) <= 2000 else "..." + text[-2000:]

        return CommandFailed(
            f"{guest}: {self.command!r} exited {self.exit_status}, {expectation}\n"
            f"stdout:\n{clip(self.stdout)}\nstderr:\n{clip(self.stderr)}",
            command=self.command, exit_status=self.exit_status, stdout=self.stdout, stderr=self.stderr,
        )


def _markers(nonce: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """What starts the reply to command `nonce`, and ends its stdout, its stderr and its status line."""
    return MARK + nonce + b":S\n", MARK + nonce + b":E\n", MARK + nonce + b":X ", b"\n"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _number(data: bytes) -> int | None:
    """The decimal number `data` holds exactly, else None."""
    return int(data) if re.fullmatch(rb"[0-9]{1,9}", data) else None


class ShellChannel:
    """Runs commands on a shell at the far end of `stream`, one at a time.

    `watchdog` is called while waiting and raises when the guest died, so a dead
    guest is reported as such instead of as a timeout. `interrupt(pid)` kills the
    descendants of the shell `pid` out of band (through another channel); without
    it a timed-out command leaves the channel unusable.
    """

    def __init__(
        self,
        stream: ByteStream,
        name: str,
        *,
        watchdog: Callable[[], None] | None = None,
        interrupt: Callable[[int], None] | None = None,
        limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        self.stream = stream
        self.name = name
        self.watchdog = watchdog
        self.interrupt = interrupt
        self.limit = limit  # bytes kept of each part of a reply (stdout, stderr); the rest is counted
        self._kept = bytearray()  # the part being read, as far as it is kept
        self._dropped = 0  # bytes of it read past `limit`
        self.shell_pid: int | None = None
        self.broken: str | None = None
        self.busy = False  # a command is in flight: a second one must not be sent meanwhile
        self._buffer = bytearray()
        self.log = logging.getLogger(f"pytest_nestedkvm.channel.{name}")

    def connect(self, deadline: Deadline) -> int:
        """Define the helper functions at the far end and learn the shell's pid."""
        self.stream.sendall(PREAMBLE.encode())
        result = self.run("echo $$", deadline)
        pid = _number(result.stdout_bytes.strip())
        if not pid:
            raise ChannelError(f"{self.name}: the shell answered {result.stdout!r} when asked for its pid")
        self.shell_pid = pid
        return pid

    def run(self, command: str, deadline: Deadline) -> CommandResult:
        """Run `command` and return its result once its reply arrived; CommandTimeout at `deadline`."""
        if self.broken:
            raise ChannelError(f"{self.name}: channel unusable: {self.broken}")
        if "\0" in command:
            raise ValueError("a command cannot contain NUL bytes")
        nonce = secrets.token_hex(8).encode()
        start = time.monotonic()
        self.stream.sendall(b"__nk " + nonce + b" " + shlex.quote(command).encode() + b"\n")
        markers = _markers(nonce)
        parts: list[bytes] = []  # what came before the start marker, stdout, stderr, status: as each completes
        self.busy = True
        try:
            self._read_reply(markers, parts, deadline)
        except TimeoutError:
            raise self._timed_out(command, deadline.budget, markers, parts) from None
        finally:
            self.busy = False
        _, stdout, stderr, raw_status = parts
        status = _number(raw_status)
        if status is None:
            self.broken = f"the status line of {command!r} was {_text(raw_status)!r}, not a number"
            raise ChannelError(f"{self.name}: {self.broken}")
        return CommandResult(command, status, _text(stdout), _text(stderr), time.monotonic() - start)

    def _read_reply(self, markers: tuple[bytes, ...], parts: list[bytes], deadline: Deadline) -> None:
        """Read the parts of the reply that `parts` still lacks, appending each as it completes."""
        for marker in markers[len(parts):]:
            parts.append(self._read_until(marker, deadline))

    def _timed_out(
        self, command: str, timeout: float, markers: tuple[bytes, ...], parts: list[bytes],
    ) -> CommandTimeout:
        """Stop the timed-out command and describe it with what it printed, where that arrived."""
        stopped = self._recover(command, markers, parts)
        what = "was killed" if stopped else "could not be stopped, so this channel is now unusable"
        # stdout, then stderr, as far as they arrived; the part in progress is in the buffer
        received = [*parts[1:], bytes(self._kept) + bytes(self._buffer)] if parts else []
        stdout = received[0] if received else b""
        stderr = received[1] if len(received) > 1 else b""
        printed = printable((stdout + stderr).decode("utf-8", "replace")).rstrip().splitlines()[-5:]
        if printed:
            tail = "\nits last output:\n" + "\n".join(printed)
        else:
            tail = "\nit printed nothing" if parts else "\nits output did not arrive (it is sent when a command ends)"
        return CommandTimeout(
            f"{self.name}: command timed out after {timeout:g} s and {what}: {command!r}{tail}",
            command=command, timeout=timeout, stdout=stdout, stderr=stderr,
        )

    def _recover(self, command: str, markers: tuple[bytes, ...], parts: list[bytes]) -> bool:
        """Kill the timed-out command and read the rest of its reply so the next command starts clean."""
        if self.interrupt is None or self.shell_pid is None:
            self.broken = f"{command!r} timed out and this channel cannot interrupt it"
            return False
        try:
            self.interrupt(self.shell_pid)
        except (ChannelError, CommandTimeout) as exc:  # the control shell is stuck too
            self.broken = f"{command!r} timed out and killing it failed: {exc}"
            return False
        try:
            self._read_reply(markers, parts, Deadline.after(KILL_GRACE))  # the command's own budget is spent
        except TimeoutError:
            self.broken = f"{command!r} timed out and did not stop when killed"
            return False
        return True

    def _read_until(self, marker: bytes, deadline: Deadline) -> bytes:
        """Consume and return the bytes before `marker` (the marker is consumed too), the first
        `limit` of them and a line that says how many more were dropped."""
        self._kept, self._dropped = bytearray(), 0
        searched = 0
        while True:
            index = self._buffer.find(marker, searched)
            if index >= 0:
                self._keep(index)
                del self._buffer[: len(marker)]
                if self._dropped:
                    self._kept += TRUNCATED % self._dropped
                return bytes(self._kept)
            searched = max(0, len(self._buffer) - len(marker) + 1)
            if searched > self.limit:  # bytes that cannot begin the marker: keep or count them
                self._keep(searched)
                searched = 0
            remaining = deadline.remaining()
            if remaining <= 0:
                raise TimeoutError
            self.stream.settimeout(min(remaining, POLL))
            try:
                chunk = self.stream.recv(1 << 16)
            except TimeoutError:
                chunk = None
            except OSError as exc:
                self.broken = f"connection failed: {exc}"
                raise ChannelError(f"{self.name}: {self.broken}") from exc
            if chunk == b"":
                self.broken = "the guest closed the connection"
                if self.watchdog:
                    self.watchdog()
                raise ChannelError(f"{self.name}: {self.broken}")
            if chunk:
                self._buffer += chunk
            elif self.watchdog:
                self.watchdog()

    def _keep(self, count: int) -> None:
        """Move the first `count` bytes of the buffer to the part being read, as far as it has room."""
        room = max(0, self.limit - len(self._kept))
        self._kept += self._buffer[:min(count, room)]
        self._dropped += max(0, count - room)
        del self._buffer[:count]


# -- channel kinds: how a guest's shells are reached -----------------------------------------

# A disk image's own kernel: make a panic end QEMU (-no-reboot), as panic=-1 does for the
# built-in guest, and let panic() use sysrq (both need root; quietly skipped otherwise).
IMAGE_SETUP = "{ echo -1 > /proc/sys/kernel/panic; echo 1 > /proc/sys/kernel/sysrq; } 2>/dev/null"
PANIC = "echo c > /proc/sysrq-trigger"
# The serial channel shares the console with the guest's own messages (kernel, cloud-init, systemd):
# let the boot finish and keep kernel messages off the console, so replies are not interleaved.
QUIET_CONSOLE = ("command -v systemctl >/dev/null && systemctl is-system-running --wait >/dev/null 2>&1; "
                 "dmesg -n 1 2>/dev/null; true")


@dataclass(frozen=True)
class ChannelSetup:
    """What a channel needs from its guest to open."""

    name: str  # the guest's, e.g. "l2"
    link: Link
    check: Callable[[], None]  # raises GuestCrashed when the guest's QEMU is gone
    login: tuple[str, str] | None = None  # the serial channel's user and password
    open_ssh: Callable[[Deadline], paramiko.SSHClient] | None = None  # the SSH channel's client
    # Seconds: while a command runs, the control shell must answer `true` within this long, else
    # the guest is silent (GuestSilent). None: no such check (a guest that freezes whole is then
    # seen at the command's timeout).
    heartbeat: float | None = None
    # Seconds between those questions (default: `heartbeat`). Each is also an interrupt for the
    # guest: under TCG one that lost its timer interrupt sleeps until some interrupt comes.
    poke: float | None = None
    output_limit: int = DEFAULT_OUTPUT_LIMIT  # bytes of each of a command's stdout and stderr kept


class Channel:
    """Commands to one guest: a main shell, and for the kinds that have one, a control shell
    that interrupts a command that timed out and triggers panics while the main one is busy."""

    def __init__(self, setup: ChannelSetup) -> None:
        self.setup = setup
        self.shell: ShellChannel | None = None
        self.control: ShellChannel | None = None
        self.ssh_client: paramiko.SSHClient | None = None
        self._answered = 0.0  # when the guest last showed it runs: a command started or `true` came back
        self.asked = 0  # how often the control shell answered `true` while a command ran

    def open(self, deadline: Deadline) -> None:
        raise NotImplementedError

    @property
    def broken(self) -> str | None:
        """Why the channel stopped working, if it did: the main shell's reason, or the control
        shell's (without it a command that times out cannot be stopped); "not open" before open()."""
        if self.shell is None:
            return "not open"
        return self.shell.broken or (self.control.broken if self.control is not None else None)

    def run(self, command: str, deadline: Deadline) -> CommandResult:
        if self.shell is None:
            raise ChannelError(f"{self.setup.name} is not running")
        self._answered = time.monotonic()
        return self.shell.run(command, deadline)

    def panic(self, deadline: Deadline) -> None:
        """Make the guest kernel panic for real (sysrq-c); the reply may never come."""
        if self.shell is None:
            raise ChannelError(f"{self.setup.name} is not running")
        (self.control or self.shell).run(PANIC, deadline.share(PANIC_REPLY))

    def host_key(self, public_line: str, deadline: Deadline) -> str | None:
        """Start the guest's sshd when this kind has to, and return its host key if known."""
        return None  # a disk image runs its own sshd

    def close(self) -> None:
        self.shell = self.control = None
        if self.ssh_client is not None:
            self.ssh_client.close()
            self.ssh_client = None

    def _connect(self, role: str, stream: ByteStream, deadline: Deadline, interruptible: bool,
                 watchdog: Callable[[], None] | None = None) -> ShellChannel:
        channel = ShellChannel(stream, f"{self.setup.name}.{role}", watchdog=watchdog or self.setup.check,
                               interrupt=self._interrupt if interruptible else None, limit=self.setup.output_limit)
        channel.connect(deadline)
        return channel

    def _open_pair(self, streams: tuple[ByteStream, ByteStream], deadline: Deadline) -> None:
        self.shell = self._connect(CMD, streams[0], deadline, interruptible=True, watchdog=self._watch)
        self.control = self._connect(CTL, streams[1], deadline, interruptible=False)

    def answers(self, timeout: float) -> bool | None:
        """Whether the guest answers `true` on its control shell (or main shell) within `timeout`;
        None where that cannot be asked now (not open, or that shell is waiting for a command)."""
        shell = self.control or self.shell
        if shell is None or shell.busy:
            return None
        try:
            return shell.run("true", Deadline.after(timeout)).exit_status == 0
        except (CommandTimeout, ChannelError):
            return False

    def _watch(self) -> None:
        """The main shell's watchdog: the guest's QEMU is there, and with a heartbeat, the guest
        answers on the control shell while a long command runs (only the main shell waits here,
        so the control shell is idle)."""
        self.setup.check()
        limit = self.setup.heartbeat
        if limit is None or self.control is None:
            return
        if time.monotonic() - self._answered < min(self.setup.poke or limit, limit):
            return
        try:
            self.control.run("true", Deadline.after(limit))  # HEARTBEAT: fixed, not a share of the command's
        except CommandTimeout:
            raise GuestSilent(f"{self.setup.name}: while a command ran, its control shell did not answer `true` "
                              f"within {limit:g} s: the whole guest stopped") from None
        self.asked += 1
        self._answered = time.monotonic()

    def _interrupt(self, shell_pid: int) -> None:
        if self.control is not None:
            self.control.run(f"__nk_kill {shell_pid}", Deadline.after(KILL_GRACE))  # the command's budget is spent


class SplitStream:
    """A shell's commands go out on one stream and its replies come back on another."""

    def __init__(self, commands: socket.socket, replies: socket.socket) -> None:
        self.commands, self.replies = commands, replies

    def sendall(self, data: bytes, /) -> None:
        self.commands.sendall(data)

    def recv(self, size: int, /) -> bytes:
        return self.replies.recv(size)

    def settimeout(self, timeout: float | None, /) -> None:
        self.commands.settimeout(timeout)
        self.replies.settimeout(timeout)


class AgentChannel(Channel):
    """The built-in guest: its init runs a root shell on each of two pairs of virtio-serial ports
    (commands in, replies out: layout.REPLY_ROLE)."""

    def open(self, deadline: Deadline) -> None:
        link, check = self.setup.link, self.setup.check
        cmd, ctl = (SplitStream(link.stream(role, deadline, check), link.stream(REPLY_ROLE[role], deadline, check))
                    for role in (CMD, CTL))
        self._open_pair((cmd, ctl), deadline)

    def host_key(self, public_line: str, deadline: Deadline) -> str | None:
        return self.run_ok(sshd_script(public_line), deadline).strip().splitlines()[-1]

    def run_ok(self, command: str, deadline: Deadline) -> str:
        result = self.run(command, deadline)
        if result.exit_status != 0:
            raise result.failure(self.setup.name, "expected exit status 0")
        return result.stdout


class SshChannel(Channel):
    """A disk image with cloud-init: two shells over one SSH connection with the session key."""

    def open(self, deadline: Deadline) -> None:
        assert self.setup.open_ssh is not None
        self.ssh_client = self.setup.open_ssh(deadline)
        self._open_pair((ssh.shell(self.ssh_client, deadline), ssh.shell(self.ssh_client, deadline)), deadline)
        self.shell.run(IMAGE_SETUP, deadline)  # type: ignore[union-attr]


class SerialChannel(Channel):
    """A disk image without cloud-init: a login on the serial console (--nested-login).

    One console, one shell: nothing can interrupt a command that hangs.
    """

    def open(self, deadline: Deadline) -> None:
        assert self.setup.login is not None
        user, password = self.setup.login
        sock = self.setup.link.stream(SERIAL, deadline, self.setup.check)
        try:
            serial_login(sock, user, password, deadline, self.setup.check)
        except (TimeoutError, PermissionError, ConnectionError) as exc:
            raise LoginFailed(f"{self.setup.name}: serial console login as {user!r} failed: {exc}") from None
        self.shell = self._connect(CMD, sock, deadline, interruptible=False)
        self.shell.run(IMAGE_SETUP, deadline)
        self.shell.run(QUIET_CONSOLE, deadline)


CHANNELS: dict[ChannelKind, type[Channel]] = {"agent": AgentChannel, "ssh": SshChannel, "serial": SerialChannel}


def channel_class(kind: ChannelKind) -> type[Channel]:
    """The one place a channel kind picks its class."""
    return CHANNELS[kind]
