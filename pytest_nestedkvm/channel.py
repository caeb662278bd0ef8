"""The command channel: exact command results over any byte stream to a POSIX shell.

The far end is a plain `sh` reading its input from the stream (a virtio-serial
port, an SSH channel). Each command goes out as one call of a small shell
function, with the command text single-quoted so no input can desynchronise the
shell's parser. The reply is framed by markers that carry a per-command random
nonce:

    <stdout bytes> \\n@@NK<nonce>:E\\n <stderr bytes> \\n@@NK<nonce>:X <status>\\n

A command runs in a subshell (its `exit`, `cd` and `set` stay there) with stdin
from /dev/null; `true` costs one fork, no exec. stdout goes straight to the
stream; stderr is spooled to a file and sent after the first marker, so a command
with empty stderr costs nothing more.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import ChannelError, CommandTimeout

MARK = b"\n@@NK"
# Grace for a killed command's markers to arrive before the channel counts as broken.
KILL_GRACE = 10.0
POLL = 0.25  # how often a blocked read checks whether the guest is still alive

# Defined once per connection. __nk_kill lists every descendant of a pid by
# walking /proc (repeated passes until the set stops growing) and SIGKILLs them.
PREAMBLE = r"""
__nk_err=${TMPDIR:-/tmp}/.nestedkvm-stderr.$$
__nk() {
  ( eval "$2" ) </dev/null 2>"$__nk_err"
  __nk_s=$?
  printf '\n@@NK%s:E\n' "$1"
  [ -s "$__nk_err" ] && cat "$__nk_err"
  printf '\n@@NK%s:X %d\n' "$1" "$__nk_s"
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


def _markers(nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """What ends stdout, stderr and the status line of the reply to command `nonce`."""
    return MARK + nonce + b":E\n", MARK + nonce + b":X ", b"\n"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


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
    ) -> None:
        self.stream = stream
        self.name = name
        self.watchdog = watchdog
        self.interrupt = interrupt
        self.shell_pid: int | None = None
        self.broken: str | None = None
        self._buffer = bytearray()
        self.log = logging.getLogger(f"pytest_nestedkvm.channel.{name}")

    def connect(self, timeout: float) -> int:
        """Define the helper functions at the far end and learn the shell's pid."""
        self.stream.sendall(PREAMBLE.encode())
        result = self.run("echo $$", timeout)
        self.shell_pid = int(result.stdout.split()[-1])  # the last word: bytes of a dead predecessor may lead
        return self.shell_pid

    def run(self, command: str, timeout: float) -> CommandResult:
        if self.broken:
            raise ChannelError(f"{self.name}: channel unusable: {self.broken}")
        if "\0" in command:
            raise ValueError("a command cannot contain NUL bytes")
        nonce = secrets.token_hex(8).encode()
        start = time.monotonic()
        self.stream.sendall(b"__nk " + nonce + b" " + shlex.quote(command).encode() + b"\n")
        markers = _markers(nonce)
        deadline = start + timeout
        parts: list[bytes] = []  # stdout, stderr, status as each completes
        try:
            for marker in markers:
                parts.append(self._read_until(marker, deadline))
        except TimeoutError:
            received = [*parts, bytes(self._buffer)]  # what arrived: stdout first, stderr after it ended
            stopped = self._recover(command, markers[len(parts):])
            what = "was killed" if stopped else "could not be stopped, so this channel is now unusable"
            printed = b"".join(received).decode("utf-8", "replace").rstrip().splitlines()[-5:]
            raise CommandTimeout(
                f"{self.name}: command timed out after {timeout:g} s and {what}: {command!r}"
                + ("\nits last output:\n" + "\n".join(printed) if printed else "\nit printed nothing"),
                command=command, timeout=timeout, stdout=received[0],
                stderr=received[1] if len(received) > 1 else b"",
            ) from None
        stdout, stderr, status = parts
        return CommandResult(command, int(status), _text(stdout), _text(stderr), time.monotonic() - start)

    def _recover(self, command: str, pending: tuple[bytes, ...]) -> bool:
        """Kill the timed-out command and drain its reply so the next command starts clean."""
        if self.interrupt is None or self.shell_pid is None:
            self.broken = f"{command!r} timed out and this channel cannot interrupt it"
            return False
        self.interrupt(self.shell_pid)
        deadline = time.monotonic() + KILL_GRACE
        try:
            for marker in pending:
                self._read_until(marker, deadline)
        except TimeoutError:
            self.broken = f"{command!r} timed out and did not stop when killed"
            return False
        return True

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        """Consume and return the bytes before `marker` (the marker is consumed too)."""
        searched = 0
        while True:
            index = self._buffer.find(marker, searched)
            if index >= 0:
                data = bytes(self._buffer[:index])
                del self._buffer[: index + len(marker)]
                return data
            searched = max(0, len(self._buffer) - len(marker) + 1)
            remaining = deadline - time.monotonic()
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
