"""Unit tests for Console: problem detection in a serial log, tails, a missing log; ConsoleRecorder
filling the log from a console socket (bounded); serial login."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.machine.console import RAW_SHELL, Console, ConsoleRecorder, serial_login, stall_kind

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
    console = console_with(tmp_path, BOOT + "[ 3.0] BUG: kernel NULL pointer dereference, address: 0\n")
    assert console.first_problem(len(BOOT.encode())) == "[ 3.0] BUG: kernel NULL pointer dereference, address: 0"
    assert console.first_problem(len(BOOT.encode()) + 30) is None


def test_a_stall_line_is_no_problem_line_but_a_bug_after_it_is(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[ 3.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\n"
                           "[ 4.0] BUG: unable to handle page fault for address: 8\n")
    assert console.first_stall() == "[ 3.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"
    assert console.first_problem() == "[ 4.0] BUG: unable to handle page fault for address: 8"


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


# -- ConsoleRecorder: the console socket copied into the log, up to a limit ----------------------

MIB = 1 << 20
TRUNCATED = b"\n[nestedkvm: console output beyond 1 MiB dropped (--nested-console-limit)]\n"


@pytest.fixture
def console_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(QEMU's end, the plugin's end) of a console socket."""
    qemu, plugin = socket.socketpair()
    yield qemu, plugin
    qemu.close()
    plugin.close()


def recorded(recorder: ConsoleRecorder, qemu: socket.socket) -> bytes:
    """Everything the recorder wrote once QEMU's end closed."""
    qemu.shutdown(socket.SHUT_WR)
    recorder.thread.join(5)
    assert not recorder.thread.is_alive()
    return recorder.path.read_bytes()


def test_recorder_copies_the_console_bytes_into_the_log(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket],
) -> None:
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    qemu.sendall(BOOT.encode())
    qemu.sendall(b"\xff\x00 raw bytes pass unchanged\r\n")
    assert recorded(recorder, qemu) == BOOT.encode() + b"\xff\x00 raw bytes pass unchanged\r\n"


def test_recorder_appends_to_an_existing_log(tmp_path: Path, console_pair: tuple[socket.socket, socket.socket]) -> None:
    qemu, plugin = console_pair
    (tmp_path / "console.log").write_bytes(b"earlier boot\n")
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    qemu.sendall(b"this boot\n")
    assert recorded(recorder, qemu) == b"earlier boot\nthis boot\n"


def test_recorder_keeps_the_limit_then_one_line_and_drops_the_rest(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket],
) -> None:
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    kept = bytes(range(256)) * (MIB // 256 - 1) + b"x" * 200  # 56 bytes short of the limit
    qemu.sendall(kept)
    qemu.sendall(b"A" * 100)  # 56 of these fit
    for _ in range(3):
        qemu.sendall(b"Kernel panic - not syncing: past the limit\n" * 1000)
    data = recorded(recorder, qemu)
    assert data == kept + b"A" * 56 + TRUNCATED
    assert data.count(b"console output beyond") == 1
    assert Console(recorder.path).first_panic() is None  # what was dropped is gone for good


def test_recorder_stops_exactly_at_the_limit_within_one_chunk(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket],
) -> None:
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    qemu.sendall(b"y" * (3 * MIB))
    assert recorded(recorder, qemu) == b"y" * MIB + TRUNCATED


def test_a_console_that_keeps_printing_past_the_limit_is_still_read(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket],
) -> None:
    # Dropped bytes are still read: QEMU (and so the guest) never blocks on a full console socket.
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    flood = threading.Thread(target=qemu.sendall, args=(b"z" * (32 * MIB),), daemon=True)
    flood.start()
    flood.join(20)
    assert not flood.is_alive(), "the console writer blocked: the recorder stopped reading"
    assert recorded(recorder, qemu) == b"z" * MIB + TRUNCATED
    assert recorder.path.stat().st_size == MIB + len(TRUNCATED)


def test_settle_waits_until_what_was_sent_is_in_the_log(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket],
) -> None:
    qemu, plugin = console_pair
    log = tmp_path / "console.log"
    recorder = ConsoleRecorder(plugin, log, MIB)

    def print_slowly() -> None:
        for index in range(5):
            qemu.sendall(f"line {index}\n".encode())
            time.sleep(0.05)  # each gap shorter than `quiet`: settle keeps waiting

    writer = threading.Thread(target=print_slowly)
    writer.start()
    time.sleep(0.01)
    recorder.settle(quiet=0.5, at_most=5)
    writer.join()
    assert log.read_bytes() == b"".join(f"line {index}\n".encode() for index in range(5))
    assert recorder.thread.is_alive()  # quiet, not ended


@pytest.mark.parametrize("closer", ["QEMU", "the link"])
def test_recorder_ends_with_its_stream_and_settle_then_returns_at_once(
    tmp_path: Path, console_pair: tuple[socket.socket, socket.socket], closer: str,
) -> None:
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    qemu.sendall(b"last words\n")
    if closer == "QEMU":
        qemu.close()
    else:
        plugin.shutdown(socket.SHUT_RDWR)  # as HostLink.close does
    recorder.thread.join(5)
    assert not recorder.thread.is_alive()
    started = time.monotonic()
    recorder.settle(quiet=10, at_most=10)
    assert time.monotonic() - started < 1
    if closer == "QEMU":
        assert recorder.path.read_bytes() == b"last words\n"


def test_settle_gives_up_after_at_most(tmp_path: Path, console_pair: tuple[socket.socket, socket.socket]) -> None:
    qemu, plugin = console_pair
    recorder = ConsoleRecorder(plugin, tmp_path / "console.log", MIB)
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            qemu.sendall(b".")
            time.sleep(0.01)

    writer = threading.Thread(target=chatter)
    writer.start()
    try:
        started = time.monotonic()
        recorder.settle(quiet=1, at_most=0.3)  # never quiet for 1 s: returns anyway, without raising
        assert 0.25 < time.monotonic() - started < 2
    finally:
        stop.set()
        writer.join()


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
    serial_login(ours, "tester", "pw", Deadline.after(10), check=lambda: None)
    getty.join(5)
    assert lines == [RAW_SHELL]


def test_serial_login_with_a_wrong_password_says_so() -> None:
    ours, theirs = socket.socketpair()
    getty = threading.Thread(target=fake_getty, args=(theirs, "right", []))
    getty.start()
    with pytest.raises(PermissionError, match="refused the login as 'tester': check --nested-login"):
        serial_login(ours, "tester", "wrong", Deadline.after(10), check=lambda: None)
    getty.join(5)


def test_serial_login_gives_up_after_its_timeout() -> None:
    ours, _silent = socket.socketpair()
    with pytest.raises(TimeoutError, match=r"within 1\.5 s"):
        serial_login(ours, "tester", "pw", Deadline.after(1.5), check=lambda: None)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("[   24.101] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "RCU stall"),
        ("[   24.2] rcu: INFO: rcu_sched self-detected stall on CPU", "RCU stall"),
        ("[   45.1] rcu: rcu_preempt kthread starved for 21002 jiffies! g5525 f0x0 RCU_GP_WAIT_FQS(5) ->cpu=1",
         "RCU stall"),
        ("[   48.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:120]", "soft lockup"),
        ("[   12.0] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", "hard lockup"),
        ("[  130.0] INFO: task kworker/0:1:42 blocked for more than 120 seconds.", "hung task"),
        ("[  40.0] BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 31s!", "workqueue lockup"),
    ],
)
def test_each_kind_of_stall_is_found_and_named(tmp_path: Path, line: str, kind: str) -> None:
    console = console_with(tmp_path, BOOT + line + "\r\n[   49.0] more after\r\n")
    assert console.first_stall() == line
    assert stall_kind(line) == kind


def test_ordinary_rcu_and_watchdog_lines_are_no_stall(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[ 0.1] rcu: Hierarchical RCU implementation.\n"
                           "[ 0.2] rcu: \tRCU restricting CPUs from NR_CPUS=64 to nr_cpu_ids=1.\n"
                           "[ 0.3] watchdog: Disabling watchdog on nohz_full cores by default\n"
                           "[ 9.0] echo 'INFO: task' > /dev/null\n")
    assert console.first_stall() is None


def test_scan_stall_resumes_after_the_last_whole_line(tmp_path: Path) -> None:
    console = console_with(tmp_path, BOOT + "[ 24.0] rcu: INFO: rcu_pre")  # the line is still being written
    line, resume = console.scan_stall(0)
    assert line is None and resume == len(BOOT.encode())
    with console.path.open("ab") as f:
        f.write(b"empt detected stalls on CPUs/tasks:\r\n")
    line, after = console.scan_stall(resume)
    assert line == "[ 24.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
    assert console.read(after).startswith("\n") and console.scan_stall(after) == (None, console.size())


def test_xens_own_end_is_a_panic_not_a_reset(tmp_path: Path) -> None:
    """A Xen L1 whose dom0 crashed under Xen: Xen reboots, QEMU exits with no kernel panic line."""
    log = tmp_path / "console.log"
    log.write_bytes(b"(XEN) d0v0 Unhandled: vec 14, #PF[0001]\n(XEN) Domain 0 (vcpu#0) crashed on cpu#0:\n"
                    b"(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.\n")
    assert Console(log).first_panic() == "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds."
    assert Console(log).first_problem() == "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds."
    log.write_bytes(b"(XEN) ****************************************\n(XEN) Panic on CPU 0:\n(XEN) FATAL TRAP\n")
    assert Console(log).first_panic() == "(XEN) Panic on CPU 0: FATAL TRAP"
    assert Console(log).first_problem() == "(XEN) Panic on CPU 0: FATAL TRAP"
    log.write_bytes(b"(XEN) Panic on CPU 0:\r\n(XEN) ****************************************\r\n")
    assert Console(log).first_panic() == "(XEN) Panic on CPU 0:"  # no reason line: the header alone
