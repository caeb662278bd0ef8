"""Unit tests for Console: problem detection in a serial log, tails, a missing log; serial login."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from pytest_nestedkvm.console import RAW_SHELL, Console, serial_login

BOOT = (
    "[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\r\n"
    "[    0.412000] virtio_net virtio1 eth0: renamed\r\n"
    "[    1.600000] nestedkvm: stage2 up\r\n"
)


def console_with(tmp_path: Path, text: str | bytes) -> Console:
    path = tmp_path / "console.log"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return Console(path)


@pytest.mark.parametrize(
    "line",
    [
        "[   12.345678] Kernel panic - not syncing: sysrq triggered crash",
        "[    3.100000] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "[    3.200000] Oops: 0000 [#1] PREEMPT SMP NOPTI",
        "[    4.000000] WARNING: CPU: 1 PID: 245 at arch/x86/kvm/vmx/nested.c:4502 nested_vmx_vmexit+0x6f/0x7a0",
        "[    5.000000] general protection fault, probably for non-canonical address 0xdead000000000100",
    ],
)
def test_first_problem_finds_each_kind(tmp_path: Path, line: str) -> None:
    console = console_with(tmp_path, BOOT + line + "\r\n[   13.000000] more after\r\n")
    assert console.first_problem() == line


def test_no_problem_in_a_clean_boot(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[    2.0] BUGS are fine when not followed by colon-space\n"
                           "[    2.1] warning: cpu lower case\n")
    assert console.first_problem() is None


def test_first_problem_is_the_earliest(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[ 3.0] WARNING: CPU: 0 PID: 1 at a.c:1\n"
                           "[ 4.0] Kernel panic - not syncing: Fatal exception\n")
    assert console.first_problem() == "[ 3.0] WARNING: CPU: 0 PID: 1 at a.c:1"


def test_first_problem_after_a_start_offset(tmp_path: Path) -> None:
    old = BOOT + "[ 3.0] Oops: 0002 [#1] SMP\n"
    new = "[ 9.0] rebooted\n[ 9.5] Kernel panic - not syncing: Attempted to kill init!\n"
    console = console_with(tmp_path, old + new)
    offset = len(old.encode())
    assert console.first_problem() == "[ 3.0] Oops: 0002 [#1] SMP"
    assert console.first_problem(offset) == "[ 9.5] Kernel panic - not syncing: Attempted to kill init!"
    assert console.first_problem(console.size()) is None


def test_first_problem_after_offset_ignores_earlier_only(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[ 3.0] BUG: soft lockup - CPU#0 stuck for 22s!\n")
    assert console.first_problem(len(BOOT.encode())) == "[ 3.0] BUG: soft lockup - CPU#0 stuck for 22s!"
    assert console.first_problem(len(BOOT.encode()) + 30) is None


def test_first_problem_tolerates_undecodable_bytes(tmp_path: Path) -> None:
    console = console_with(tmp_path, b"\xff\xfe garbage\n[ 1.0] BUG: unable to handle page fault \xff\n")
    problem = console.first_problem()
    assert problem is not None and problem.startswith("[ 1.0] BUG: unable to handle page fault")


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    console = console_with(tmp_path, "".join(f"line {i}\r\n" for i in range(100)))
    assert console.tail(3) == "line 97\nline 98\nline 99"
    assert console.tail(1) == "line 99"
    assert console.tail() == "\n".join(f"line {i}" for i in range(85, 100))


def test_tail_of_a_short_log(tmp_path: Path) -> None:
    console = console_with(tmp_path, "only\nthree\nlines")
    assert console.tail(10) == "only\nthree\nlines"


def test_tail_of_a_large_log(tmp_path: Path) -> None:
    console = console_with(tmp_path, "x" * 200_000 + "\n" + "".join(f"l{i}\n" for i in range(5)))
    assert console.tail(2) == "l3\nl4"


def test_read_range(tmp_path: Path) -> None:
    console = console_with(tmp_path, "abc\r\ndef\r\n")
    assert console.size() == 10
    assert console.read() == "abc\ndef\n"
    assert console.read(5) == "def\n"
    assert console.read(0, 3) == "abc"


def test_missing_file(tmp_path: Path) -> None:
    console = Console(tmp_path / "never-written.log")
    assert console.size() == 0
    assert console.read() == ""
    assert console.tail() == ""
    assert console.first_problem() is None


# -- serial login (a fake getty on the other end of a socket pair) ---------------------------


def fake_getty(sock: socket.socket, password: str, lines: list[bytes]) -> None:
    """A getty and a shell prompt, as a guest's serial console shows them."""
    def read_line() -> bytes:
        data = b""
        while not data.endswith(b"\r"):
            data += sock.recv(1)
        return data[:-1]

    sock.sendall(b"[  OK  ] Started getty\r\n\r\nDebian GNU/Linux 12 debian ttyS0\r\n\r\ndebian login: ")
    while (user := read_line()) == b"":
        pass
    sock.sendall(user + b"\r\nPassword: ")
    if read_line() != password.encode():
        sock.sendall(b"\r\nLogin incorrect\r\ndebian login: ")
        return
    sock.sendall(b"\r\nLinux debian 6.1.0\r\n" + user + b"@debian:~$ ")
    lines.append(sock.recv(100))


def test_serial_login_leaves_a_raw_shell() -> None:
    ours, theirs = socket.socketpair()
    lines: list[bytes] = []
    getty = threading.Thread(target=fake_getty, args=(theirs, "pw", lines))
    getty.start()
    serial_login(ours, "tester", "pw", timeout=10, check=lambda: None)
    getty.join(5)
    assert lines == [RAW_SHELL]


def test_serial_login_with_a_wrong_password_says_so() -> None:
    ours, theirs = socket.socketpair()
    getty = threading.Thread(target=fake_getty, args=(theirs, "right", []))
    getty.start()
    with pytest.raises(PermissionError, match="refused the login as 'tester': check --nested-login"):
        serial_login(ours, "tester", "wrong", timeout=10, check=lambda: None)
    getty.join(5)


def test_serial_login_gives_up_after_its_timeout() -> None:
    ours, _silent = socket.socketpair()
    with pytest.raises(TimeoutError, match=r"within 1\.5 s"):
        serial_login(ours, "tester", "pw", timeout=1.5, check=lambda: None)
