"""Unit tests for HostProcess with small stand-ins for QEMU (sleep, sh): lifetime, stop, env, output."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.machine import process as process_module
from pytest_nestedkvm.machine.process import HostProcess

needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv not installed")
PACKAGE_ROOT = Path(process_module.__file__).resolve().parents[1]  # where `import pytest_nestedkvm` finds it


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (state, ppid, pgrp, session, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _session(sid: int) -> list[int]:
    """Live processes in session `sid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[3] == str(sid) and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _is_sleep(pid: int) -> bool:
    """Whether `pid` runs `sleep 1000` itself (setpriv, if any, has exec'd it)."""
    argv = _cmdline(pid)
    return len(argv) == 2 and Path(argv[0]).name == "sleep" and argv[1] == "1000"


def _eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def host_process(tmp_path: Path) -> Iterator[HostProcess]:
    proc = HostProcess(tmp_path / "qemu.log")
    yield proc
    proc.stop(grace=0.5)


def _started_in_a_thread(proc: HostProcess) -> None:
    thread = threading.Thread(target=proc.start, args=(["sleep", "1000"], None, Deadline.after(10)))
    thread.start()
    thread.join()


@needs_setpriv
def test_child_outlives_the_thread_that_started_it(host_process: HostProcess) -> None:
    _started_in_a_thread(host_process)
    pid = host_process.pid
    assert pid is not None
    assert _eventually(lambda: _is_sleep(pid))
    time.sleep(0.5)  # a death signal tied to the ended thread would have landed by now
    assert _alive(pid) and host_process.exit_status() is None
    assert _stat(pid)[1] == str(os.getpid())  # type: ignore[index]  # our child, in its own session
    assert _stat(pid)[3] == str(pid)  # type: ignore[index]


@needs_setpriv
def test_death_signal_is_set(host_process: HostProcess) -> None:
    host_process.start(["setpriv", "--dump"], None, Deadline.after(10))
    assert _eventually(lambda: host_process.exit_status() is not None)
    assert "Parent death signal: KILL" in host_process.output(50)


CHILD_OF_DOOMED_PYTHON = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from pytest_nestedkvm.base.deadline import Deadline
    from pytest_nestedkvm.machine.process import HostProcess
    proc = HostProcess(Path(sys.argv[1]))
    starter = threading.Thread(target=proc.start, args=(["sleep", "1000"], None, Deadline.after(10)))
    starter.start()
    starter.join()
    print(proc.pid, flush=True)
    threading.Event().wait()
""")


@needs_setpriv
def test_child_dies_when_the_python_process_is_killed(tmp_path: Path) -> None:
    python = subprocess.Popen(
        [sys.executable, "-c", CHILD_OF_DOOMED_PYTHON, str(tmp_path / "qemu.log")],
        stdout=subprocess.PIPE, text=True, cwd=PACKAGE_ROOT,
    )
    child = 0
    try:
        assert python.stdout is not None
        child = int(python.stdout.readline())
        assert _alive(child)
        python.kill()
        python.wait()
        assert _eventually(lambda: not _alive(child), timeout=3.0)
    finally:
        python.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_stop_kills_what_ignores_sigterm_and_its_whole_group(host_process: HostProcess) -> None:
    # ':' keeps sh from exec'ing sleep
    host_process.start(["sh", "-c", 'trap "" TERM; sleep 1000; :'], None, Deadline.after(10))
    pid = host_process.pid
    assert pid is not None
    assert _eventually(lambda: len(_session(pid)) == 2)  # sh and its sleep
    started = time.monotonic()
    host_process.stop(grace=0.5)
    assert time.monotonic() - started < 3
    assert host_process.exit_status() == -signal.SIGKILL
    assert _eventually(lambda: _session(pid) == [], timeout=1.0)  # SIGKILLed; the sleep is not ours to wait for


def test_stop_on_sigterm_does_not_wait_for_the_grace(host_process: HostProcess) -> None:
    host_process.start(["sleep", "1000"], None, Deadline.after(10))
    started = time.monotonic()
    host_process.stop(grace=30)
    assert time.monotonic() - started < 5
    assert host_process.exit_status() == -signal.SIGTERM


def test_stop_before_start_and_after_exit_is_harmless(host_process: HostProcess) -> None:
    host_process.stop()
    assert host_process.pid is None and host_process.exit_status() is None
    host_process.start(["sh", "-c", "exit 3"], None, Deadline.after(10))
    assert _eventually(lambda: host_process.exit_status() is not None)
    host_process.stop()
    host_process.stop()
    assert host_process.exit_status() == 3


def test_stop_reaps_a_child_that_exited_unnoticed(host_process: HostProcess) -> None:
    host_process.start(["sh", "-c", "exit 4"], None, Deadline.after(10))
    pid = host_process.pid
    assert pid is not None
    assert _eventually(lambda: _stat(pid) is None or _stat(pid)[0] == "Z")  # type: ignore[index]
    host_process.stop()
    assert host_process.exit_status() == 4


def test_env_is_exactly_the_childs_environment(host_process: HostProcess) -> None:
    env = {"PATH": "/usr/bin:/bin", "NESTEDKVM_MARK": "x y=z", "EMPTY": ""}
    host_process.start(["sleep", "1000"], env, Deadline.after(10))
    pid = host_process.pid
    assert pid is not None
    assert _eventually(lambda: _is_sleep(pid))
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")[:-1]
    assert dict(item.split("=", 1) for item in raw) == env and len(raw) == len(env)


def test_env_defaults_to_ours(host_process: HostProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NESTEDKVM_MARK", "inherited")
    host_process.start(["sh", "-c", 'echo "mark=$NESTEDKVM_MARK"'], None, Deadline.after(10))
    assert _eventually(lambda: host_process.exit_status() is not None)
    assert host_process.output(1) == "mark=inherited"


def test_output_is_the_last_lines_of_stdout_and_stderr(host_process: HostProcess) -> None:
    assert host_process.output(5) == ""
    host_process.start(["sh", "-c", "echo one; echo two >&2; echo three"], None, Deadline.after(10))
    assert _eventually(lambda: host_process.exit_status() is not None)
    assert host_process.output(2) == "two\nthree"
    assert host_process.log_path.read_text() == "one\ntwo\nthree\n"


def test_missing_program_raises_at_start(host_process: HostProcess) -> None:
    with pytest.raises(FileNotFoundError):
        host_process.start(["no-such-qemu-binary"], None, Deadline.after(10))
    assert host_process.pid is None


def test_without_setpriv_it_runs_without_death_signal(
    host_process: HostProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(process_module, "SETPRIV", "no-such-setpriv")
    with caplog.at_level(logging.WARNING, logger=process_module.__name__):
        host_process.start(["sleep", "1000"], None, Deadline.after(10))
    assert "no-such-setpriv not found" in caplog.text
    pid = host_process.pid
    assert pid is not None
    # Popen returns between fork and exec: the child shows Python's argv until it execs sleep.
    assert _eventually(lambda: _is_sleep(pid))
