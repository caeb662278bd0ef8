"""Unit tests for ShellChannel: against real local shells over a socketpair, and a scripted stream."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.base.errors import ChannelError, CommandTimeout, GuestCrashed
from pytest_nestedkvm.machine.channel import DEFAULT_OUTPUT_LIMIT, MARK, ByteStream, CommandResult, ShellChannel

SHELLS = [pytest.param(["/bin/sh"], id="sh")]
if Path("/bin/busybox").exists():
    SHELLS.append(pytest.param(["/bin/busybox", "sh"], id="busybox-sh"))

Spawn = Callable[..., ShellChannel]


@pytest.fixture(params=SHELLS)
def spawn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spawn]:
    """A factory of connected channels, each to its own local shell (killed with its children after)."""
    shell: list[str] = request.param
    started: list[tuple[subprocess.Popen[bytes], socket.socket]] = []

    def make(interrupt: Callable[[int], None] | None = None, limit: int = DEFAULT_OUTPUT_LIMIT) -> ShellChannel:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            shell, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.DEVNULL, start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp_path), "LC_ALL": "C"},
        )
        theirs.close()
        started.append((process, ours))
        channel = ShellChannel(ours, f"test{len(started)}", interrupt=interrupt, limit=limit)
        pid = channel.connect(Deadline.after(10))
        assert pid == process.pid
        return channel

    yield make
    for process, sock in started:
        sock.close()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the shell and whatever it left running
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


@pytest.fixture
def channel(spawn: Spawn) -> ShellChannel:
    return spawn()


# -- a real shell ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "status"),
    [("true", 0), ("false", 1), ("exit 3", 3), ("(exit 255)", 255), ("no-such-command-nk", 127),
     ("sh -c 'kill -9 $$'", 137)],
)
def test_exit_status(channel: ShellChannel, command: str, status: int) -> None:
    result = channel.run(command, Deadline.after(10))
    assert isinstance(result, CommandResult)
    assert result.command == command
    assert result.exit_status == status
    assert result.ok is (status == 0)
    assert result.duration >= 0


def test_stdout_and_stderr_are_separate(channel: ShellChannel) -> None:
    result = channel.run("echo out1; echo err1 >&2; printf out2; printf err2 >&2; exit 4", Deadline.after(10))
    assert result.stdout == "out1\nout2"
    assert result.stderr == "err1\nerr2"
    assert result.exit_status == 4


def test_empty_output(channel: ShellChannel) -> None:
    result = channel.run(":", Deadline.after(10))
    assert (result.stdout, result.stderr, result.exit_status) == ("", "", 0)


def test_stderr_does_not_leak_into_the_next_command(channel: ShellChannel) -> None:
    assert channel.run("echo first >&2", Deadline.after(10)).stderr == "first\n"
    assert channel.run("true", Deadline.after(10)).stderr == ""


def test_binary_bytes(channel: ShellChannel) -> None:
    result = channel.run(r"printf 'a\000b\377c\000'; printf '\377\000\n' >&2", Deadline.after(10))
    assert result.stdout_bytes == b"a\x00b\xffc\x00"
    assert result.stderr_bytes == b"\xff\x00\n"


def test_output_that_looks_like_a_marker(channel: ShellChannel) -> None:
    fake = r"\n@@NK\n@@NK0123456789abcdef:E\n@@NK0123456789abcdef:X 9\n"
    result = channel.run(f"printf '{fake}'; printf '{fake}' >&2; echo end", Deadline.after(10))
    expected = "\n@@NK\n@@NK0123456789abcdef:E\n@@NK0123456789abcdef:X 9\nend\n"
    assert result.stdout == expected
    assert result.stderr == expected.removesuffix("end\n")
    assert result.exit_status == 0
    assert MARK.decode() in result.stdout


def test_single_quotes_and_newlines(channel: ShellChannel) -> None:
    result = channel.run("echo 'it'\\''s'\necho \"two words\"  'and $HOME'\necho last", Deadline.after(10))
    assert result.stdout == "it's\ntwo words and $HOME\nlast\n"


def test_unbalanced_quote_is_a_syntax_error_not_a_hang(channel: ShellChannel) -> None:
    result = channel.run("echo 'unterminated", Deadline.after(10))
    assert result.exit_status != 0
    assert result.stderr
    assert channel.run("echo fine", Deadline.after(10)).stdout == "fine\n"


def test_heredoc(channel: ShellChannel) -> None:
    command = "cat <<'EOF'\nliteral $HOME 'q' \"dq\" \\\nEOF\nx=42\ncat <<EOF\nexpanded $x\nEOF"
    result = channel.run(command, Deadline.after(10))
    assert result.stdout == "literal $HOME 'q' \"dq\" \\\nexpanded 42\n"
    assert result.exit_status == 0


def test_large_output(channel: ShellChannel) -> None:
    text = channel.run("yes abcdefghi | head -n 100000", Deadline.after(20))
    assert len(text.stdout) == 1_000_000
    assert text.stdout == "abcdefghi\n" * 100_000
    binary = channel.run("dd if=/dev/zero bs=65536 count=16 2>/dev/null; echo done >&2", Deadline.after(20))
    assert binary.stdout_bytes == b"\0" * (1 << 20)
    assert binary.stderr == "done\n"


@pytest.mark.parametrize("lines", [99_999, 100_000, 100_001, 3_000_000])
def test_output_past_the_limit_is_read_counted_and_dropped(spawn: Spawn, lines: int) -> None:
    channel = spawn(limit=1_000_000)  # 100 000 lines of 10 bytes
    result = channel.run(f"yes abcdefghi | head -n {lines}; yes e | head -n {lines} >&2; exit 7", Deadline.after(60))
    kept = min(lines, 100_000)
    dropped = (lines - kept) * 10
    note = f"\n[nestedkvm: {dropped} more bytes were read and dropped: past --nested-output-limit]\n"
    assert result.stdout == "abcdefghi\n" * kept + (note if dropped else "")
    assert result.stderr == ("e\n" * lines)[:1_000_000] + (note.replace(str(dropped), str(lines * 2 - 1_000_000))
                                                           if lines * 2 > 1_000_000 else "")
    assert result.exit_status == 7
    assert channel.run("echo in step", Deadline.after(5)).stdout == "in step\n"


def test_large_stderr(channel: ShellChannel) -> None:
    result = channel.run("yes e | head -n 300000 >&2; echo o", Deadline.after(20))
    assert result.stderr == "e\n" * 300_000
    assert result.stdout == "o\n"


def test_stdin_reading_commands_do_not_hang(channel: ShellChannel) -> None:
    started = time.monotonic()
    assert channel.run("cat", Deadline.after(5)).stdout == ""
    result = channel.run("read line; echo \"status=$? line=[$line]\"", Deadline.after(5))
    assert result.stdout == "status=1 line=[]\n"
    assert channel.run("wc -c", Deadline.after(5)).stdout.strip() == "0"
    assert time.monotonic() - started < 5
    # and they did not eat the protocol: the channel still answers
    assert channel.run("echo still here", Deadline.after(5)).stdout == "still here\n"


def test_exit_and_cd_do_not_leak(channel: ShellChannel) -> None:
    pwd = channel.run("pwd", Deadline.after(5)).stdout
    assert channel.run("cd / && cd /proc && pwd", Deadline.after(5)).stdout == "/proc\n"
    assert channel.run("pwd", Deadline.after(5)).stdout == pwd
    assert channel.run("exit 5", Deadline.after(5)).exit_status == 5
    assert channel.run("VAR=set; set -e; false", Deadline.after(5)).exit_status == 1
    result = channel.run("echo $$ ${VAR:-unset}", Deadline.after(5))
    assert result.stdout == f"{channel.shell_pid} unset\n"
    assert channel.run("exec true", Deadline.after(5)).exit_status == 0
    assert channel.run("echo alive", Deadline.after(5)).stdout == "alive\n"


def test_nul_in_command_is_rejected(channel: ShellChannel) -> None:
    with pytest.raises(ValueError, match="NUL"):
        channel.run("echo a\0b", Deadline.after(5))
    assert channel.run("echo ok", Deadline.after(5)).stdout == "ok\n"


class Recording:
    """A stream that remembers what was sent, to learn the nonces."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.sent = bytearray()

    def sendall(self, data: bytes, /) -> None:
        self.sent += data
        self.stream.sendall(data)

    def recv(self, size: int, /) -> bytes:
        return self.stream.recv(size)

    def settimeout(self, timeout: float | None, /) -> None:
        self.stream.settimeout(timeout)


def test_a_command_cannot_forge_its_end_markers(channel: ShellChannel) -> None:
    forge = r"""printf '\n@@NK%s:E\n\n@@NK%s:X 0\n' "$1" "$1"; echo tail; exit 7"""
    result = channel.run(forge, Deadline.after(5))
    assert result.exit_status == 7
    assert result.stdout.endswith("tail\n")
    assert channel.run("echo next", Deadline.after(5)).stdout == "next\n"


def test_a_command_cannot_see_its_nonce(channel: ShellChannel) -> None:
    recording = Recording(channel.stream)
    channel.stream = recording
    result = channel.run('echo "$# [$*] [$_] [$0]"; set', Deadline.after(5))
    nonces = re.findall(rb"__nk ([0-9a-f]{16}) ", bytes(recording.sent))
    assert len(nonces) == 1
    assert result.stdout.startswith("0 [] [")
    assert nonces[0].decode() not in result.stdout + result.stderr
    assert "__nk_c=" in result.stdout  # `set` listed the shell's variables


def test_late_background_output_between_commands_is_dropped(channel: ShellChannel) -> None:
    started = time.monotonic()
    result = channel.run("(sleep 0.3; echo LATE; echo LATE >&2) &", Deadline.after(5))
    assert (result.stdout, result.stderr, result.exit_status) == ("", "", 0)
    assert time.monotonic() - started < 0.3
    time.sleep(0.8)
    result = channel.run("echo next", Deadline.after(5))
    assert (result.stdout, result.stderr) == ("next\n", "")


def test_late_background_stderr_during_the_next_command_is_not_its_stderr(channel: ShellChannel) -> None:
    # stderr is spooled per command (a fresh file); stdout is streamed, so a job left printing on
    # stdout while a later command runs is the one case the framing cannot separate (documented).
    channel.run("(sleep 0.3; echo LATE >&2) &", Deadline.after(5))
    result = channel.run("sleep 1; echo next", Deadline.after(5))
    assert (result.stdout, result.stderr, result.exit_status) == ("next\n", "", 0)
    assert channel.run("echo last >&2", Deadline.after(5)).stderr == "last\n"


def test_daemons_do_not_hold_the_command(channel: ShellChannel) -> None:
    started = time.monotonic()
    assert channel.run("sleep 30 </dev/null >/dev/null 2>&1 &", Deadline.after(5)).exit_status == 0
    assert channel.run("sleep 30 & echo started", Deadline.after(5)).stdout == "started\n"  # even with stdio left open
    assert time.monotonic() - started < 2


def test_spool_files_are_reused_safely(channel: ShellChannel) -> None:
    # more commands than the shell sweeps its spool files after, with and without output
    for i in range(150):
        result = channel.run(f"echo {i}; echo e{i} >&2" if i % 3 else "true", Deadline.after(5))
        assert (result.stdout, result.stderr) == ((f"{i}\n", f"e{i}\n") if i % 3 else ("", ""))
    listing = channel.run('ls -A "${TMPDIR:-/tmp}"/.nestedkvm.$$ | wc -l', Deadline.after(5)).stdout
    assert 0 < int(listing) <= 2 * 64


def test_a_spool_directory_a_command_removed_is_made_again(channel: ShellChannel) -> None:
    # As when a test mounts a tmpfs over the guest's /tmp: the next commands still run for real.
    assert channel.run('rm -rf "${TMPDIR:-/tmp}"/.nestedkvm.*', Deadline.after(5)).ok
    result = channel.run("echo ran; echo err >&2; exit 3", Deadline.after(5))
    assert (result.stdout, result.stderr, result.exit_status) == ("ran\n", "err\n", 3)


def test_a_spool_directory_that_cannot_be_made_breaks_the_channel(channel: ShellChannel, tmp_path: Path) -> None:
    assert channel.run('d=$(echo "${TMPDIR:-/tmp}"/.nestedkvm.*); rm -rf "$d"; touch "$d"', Deadline.after(5)).ok
    with pytest.raises(ChannelError, match="no spool directory"):
        channel.run(f"touch {tmp_path}/ran", Deadline.after(5))  # never a status for a command that did not run
    assert channel.broken is not None and not (tmp_path / "ran").exists()


def test_timeout_with_interrupt_kills_and_keeps_the_channel(spawn: Spawn) -> None:
    control = spawn()
    kills: list[str] = []

    def interrupt(pid: int) -> None:
        kills.append(control.run(f"__nk_kill {pid}", Deadline.after(10)).stdout.strip())

    channel = spawn(interrupt=interrupt)
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        channel.run("echo partial; sleep 30; echo never", Deadline.after(0.5))
    assert time.monotonic() - started < 8
    assert info.value.stdout == b"partial\n"  # sent by the shell once the command was killed
    assert "its last output:\npartial" in str(info.value)
    assert info.value.command == "echo partial; sleep 30; echo never"
    assert info.value.timeout == 0.5
    assert len(kills) == 1 and int(kills[0]) >= 1  # the subshell and its sleep were killed
    assert channel.broken is None
    result = channel.run("echo next", Deadline.after(5))
    assert (result.stdout, result.stderr, result.exit_status) == ("next\n", "", 0)
    # nothing of the killed command is still running under the shell
    assert channel.run("echo $$", Deadline.after(5)).stdout == f"{channel.shell_pid}\n"
    assert control.run(f"__nk_kill {channel.shell_pid}", Deadline.after(5)).stdout == "0\n"


def test_timeout_without_interrupt_breaks_the_channel(channel: ShellChannel) -> None:
    with pytest.raises(CommandTimeout) as info:
        channel.run("echo before; sleep 30", Deadline.after(0.3))
    assert info.value.stdout == b"before\n"  # streamed as it was printed
    assert "before" in str(info.value)
    assert channel.broken
    with pytest.raises(ChannelError, match="unusable"):
        channel.run("echo after", Deadline.after(5))


# -- a scripted stream -------------------------------------------------------------------------


class ScriptedStream:
    """Replays chunks: `reply(nonce)` gives the chunks answering one command.

    A chunk that is an exception instance is raised from recv(); when nothing is
    queued recv() times out like a socket would.
    """

    def __init__(self, reply: Callable[[bytes], list[bytes | BaseException]]) -> None:
        self.reply = reply
        self.queue: list[bytes | BaseException] = []
        self.sent: list[bytes] = []
        self.timeouts: list[float | None] = []

    def sendall(self, data: bytes, /) -> None:
        self.sent.append(data)
        for line in data.split(b"\n"):
            match = re.match(rb"__nk ([0-9a-f]+) ", line)
            if match:
                self.queue.extend(self.reply(match.group(1)))

    def recv(self, size: int, /) -> bytes:
        if not self.queue:
            time.sleep(min(self.timeouts[-1] or 0.01, 0.01))
            raise TimeoutError("timed out")
        chunk = self.queue.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        if len(chunk) > size:
            self.queue.insert(0, chunk[size:])
            chunk = chunk[:size]
        return chunk

    def settimeout(self, timeout: float | None, /) -> None:
        self.timeouts.append(timeout)


def started(nonce: bytes) -> bytes:
    return MARK + nonce + b":S\n"


def framed(nonce: bytes, stdout: bytes, stderr: bytes, status: int | bytes) -> bytes:
    raw = status if isinstance(status, bytes) else str(status).encode()
    return started(nonce) + stdout + MARK + nonce + b":E\n" + stderr + MARK + nonce + b":X " + raw + b"\n"


def split(data: bytes, size: int) -> list[bytes | BaseException]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_markers_split_across_chunks(size: int) -> None:
    stdout = b"line\n\n@@NK\n@@N" + b"\xff\x00"
    stderr = b"warn\n@@NKffff:E\n"
    stream = ScriptedStream(lambda nonce: split(framed(nonce, stdout, stderr, 42), size))
    channel = ShellChannel(stream, "scripted")
    result = channel.run("anything", Deadline.after(5))
    assert result.stdout_bytes == stdout
    assert result.stderr_bytes == stderr
    assert result.exit_status == 42
    assert stream.sent[-1].startswith(b"__nk ") and stream.sent[-1].endswith(b" anything\n")


def test_consecutive_commands_over_one_byte_chunks() -> None:
    counter = iter(range(100))
    stream = ScriptedStream(lambda nonce: split(framed(nonce, b"n%d\n" % next(counter), b"", 0), 1))
    channel = ShellChannel(stream, "scripted")
    assert [channel.run("x", Deadline.after(5)).stdout for _ in range(3)] == ["n0\n", "n1\n", "n2\n"]


def test_connect_learns_the_shell_pid() -> None:
    stream = ScriptedStream(lambda nonce: split(framed(nonce, b"4242\n", b"", 0), 1))
    channel = ShellChannel(stream, "scripted")
    assert channel.connect(Deadline.after(5)) == 4242
    assert channel.shell_pid == 4242
    assert b"__nk_kill()" in stream.sent[0]


def test_stale_marker_with_another_nonce_is_data() -> None:
    stale = framed(b"0000000000000000", b"old", b"", 1)
    stream = ScriptedStream(lambda nonce: [framed(nonce, stale + b"new", b"", 0)])
    result = ShellChannel(stream, "scripted").run("x", Deadline.after(5))
    assert result.stdout_bytes == stale + b"new"
    assert result.exit_status == 0


@pytest.mark.parametrize("size", [1, 3, 1 << 16])
def test_bytes_before_the_start_marker_are_dropped(size: int) -> None:
    stray = b"LATE\n" + framed(b"0000000000000000", b"old", b"", 1) + b"\n@@NK" + b"half a marker"
    stream = ScriptedStream(lambda nonce: split(stray + framed(nonce, b"new\n", b"err\n", 3), size))
    result = ShellChannel(stream, "scripted").run("x", Deadline.after(5))
    assert (result.stdout, result.stderr, result.exit_status) == ("new\n", "err\n", 3)


@pytest.mark.parametrize("status", [b"abc", b"", b" 1", b"1 2", b"-1", b"1_0", b"\xff"])
def test_malformed_status_line_is_a_channel_error(status: bytes) -> None:
    stream = ScriptedStream(lambda nonce: [framed(nonce, b"out", b"", status)])
    channel = ShellChannel(stream, "scripted")
    with pytest.raises(ChannelError, match="status"):
        channel.run("x", Deadline.after(5))
    assert channel.broken


@pytest.mark.parametrize("stdout", [b"", b"\n", b"pid\n", b"12 34\n", b"0\n", b"-5\n", b"99999999999999999999\n"])
def test_connect_rejects_a_malformed_pid(stdout: bytes) -> None:
    stream = ScriptedStream(lambda nonce: [framed(nonce, stdout, b"", 0)])
    channel = ShellChannel(stream, "scripted")
    with pytest.raises(ChannelError, match="pid"):
        channel.connect(Deadline.after(5))
    assert channel.shell_pid is None


def test_eof_raises_channel_error_and_calls_watchdog() -> None:
    calls: list[int] = []
    stream = ScriptedStream(lambda nonce: [b"partial out", b""])
    channel = ShellChannel(stream, "scripted", watchdog=lambda: calls.append(1))
    with pytest.raises(ChannelError, match="closed"):
        channel.run("x", Deadline.after(5))
    assert calls
    assert channel.broken
    sent = len(stream.sent)
    with pytest.raises(ChannelError, match="unusable"):
        channel.run("y", Deadline.after(5))
    assert len(stream.sent) == sent  # nothing more was sent on a broken channel


def test_eof_reports_what_the_watchdog_found() -> None:
    def watchdog() -> None:
        raise GuestCrashed("l1 QEMU exited with status 1", level=1)

    stream = ScriptedStream(lambda nonce: [b""])
    with pytest.raises(GuestCrashed, match="exited"):
        ShellChannel(stream, "scripted", watchdog=watchdog).run("x", Deadline.after(5))


def test_watchdog_is_polled_while_waiting() -> None:
    calls: list[float] = []
    replies: list[bytes | BaseException] = []
    stream = ScriptedStream(lambda nonce: replies)

    def watchdog() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            stream.queue.extend(split(framed(nonce_of(stream), b"late", b"", 0), 4))

    channel = ShellChannel(stream, "scripted", watchdog=watchdog)
    assert channel.run("x", Deadline.after(5)).stdout == "late"
    assert len(calls) == 3
    assert all(t is not None and 0 < t <= 5 for t in stream.timeouts)


def nonce_of(stream: ScriptedStream) -> bytes:
    match = re.match(rb"__nk ([0-9a-f]+) ", stream.sent[-1])
    assert match
    return match.group(1)


def test_connection_error_breaks_the_channel() -> None:
    stream = ScriptedStream(lambda nonce: [b"x", ConnectionResetError(104, "reset")])
    channel = ShellChannel(stream, "scripted")
    with pytest.raises(ChannelError, match="connection failed"):
        channel.run("x", Deadline.after(5))
    assert channel.broken


def test_scripted_timeout_keeps_partial_stdout() -> None:
    stream = ScriptedStream(lambda nonce: [b"stray" + started(nonce) + b"par", b"tial"])
    channel = ShellChannel(stream, "scripted")
    with pytest.raises(CommandTimeout) as info:
        channel.run("x", Deadline.after(0.1))
    assert info.value.stdout == b"partial"
    assert channel.broken


def test_timeout_while_stderr_arrives_reports_stdout_as_stdout() -> None:
    stream = ScriptedStream(lambda nonce: [started(nonce) + b"the stdout" + MARK + nonce + b":E\n", b"half"])
    channel = ShellChannel(stream, "scripted")
    with pytest.raises(CommandTimeout) as info:
        channel.run("x", Deadline.after(0.1))
    assert info.value.stdout == b"the stdout"
    assert info.value.stderr == b"half"


def test_a_failure_message_shows_the_guests_control_characters_escaped(channel: ShellChannel) -> None:
    result = channel.run(r"printf 'clear\033[2J\rhidden'; printf 'bell\a' >&2; exit 1", Deadline.after(5))
    assert result.stdout == "clear\x1b[2J\rhidden"  # the result itself stays exact
    message = str(result.failure("l1", "expected exit status 0"))
    assert "clear\\x1b[2J\\x0dhidden" in message and "bell\\x07" in message
    assert "\x1b" not in message and "\r" not in message and "\a" not in message
