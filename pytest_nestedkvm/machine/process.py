"""A guest's QEMU: L1's as a child of pytest on L0 that dies with the pytest process
(HostProcess), a deeper one inside its parent guest (ProcessInGuest); Guest needs of
either only what `Process` names.

Design. Linux delivers the parent-death signal when the *thread* that forked the
child ends, not the process, so every child is spawned from one long-lived daemon
"spawner" thread: it ends only when the process does (exit or SIGKILL), never with
the test thread that asked for a guest. The death signal is set without any Python
in the child (forking while paramiko's threads run makes preexec_fn unsafe): the
child execs util-linux `setpriv --pdeathsig KILL -- argv...`, which calls prctl()
and execs the target in the same process, so the pid, the parent (the spawner
thread) and the death signal (kept across exec of a non-setuid binary) carry over.
start_new_session is done by subprocess's C code (setsid), not Python.

start() returns once setpriv has exec'd the target, so from then on the tie holds;
if pytest is killed during start() itself (a few ms), QEMU may be orphaned, as
with the old preexec_fn.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..base.deadline import QEMU_STOP_GRACE, SETPRIV_EXEC, Deadline, retry
from .channel import CommandResult

log = logging.getLogger(__name__)

SETPRIV = "setpriv"
# QEMU's whole environment, at every level: nothing of pytest's (tokens, keys) reaches it or a guest.
QEMU_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class Process(Protocol):
    """What Guest needs of its QEMU, wherever that runs."""

    @property
    def parent_lost(self) -> bool:
        """The guest this QEMU ran in went down or was booted again: this QEMU is gone with it."""

    def start(self, argv: list[str], env: Mapping[str, str] | None, deadline: Deadline) -> None:
        """Start `argv` with exactly `env`, within what `deadline` leaves (the guest's boot budget)."""

    def exit_status(self) -> int | None:
        """QEMU's exit status once it ended; None while it runs (or when nobody can tell)."""

    def stop(self) -> None:
        """End QEMU, gracefully first; harmless before start() and after it ended."""

    def output(self, lines: int) -> str:
        """The last `lines` lines QEMU wrote ("" when there are none, or none can be read)."""


class ParentGuest(Protocol):
    """What a QEMU inside a guest needs of that guest (a Guest; named here so that this module
    does not import guest.py, which imports this one)."""

    boots: int  # how many times the guest was started: a QEMU started in an earlier boot is gone

    @property
    def alive(self) -> bool:
        """The guest runs and its shell answers."""

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run `command` in the guest's shell; any exit status."""

    def succeed(self, command: str, timeout: float | None = None) -> str:
        """Run `command`, require exit status 0, return its stdout."""


@dataclass
class _Request:
    """One Popen to run on the spawner thread, and the slot its result comes back in."""

    argv: list[str]
    env: dict[str, str] | None
    log_path: Path
    done: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    error: BaseException | None = None


class _Spawner:
    """The one thread that forks every child, so their parent thread lives as long as the process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="nestedkvm-spawner", daemon=True)
        self._thread.start()

    def spawn(self, argv: list[str], env: dict[str, str] | None, log_path: Path) -> subprocess.Popen[bytes]:
        request = _Request(argv, env, log_path)
        self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.process is not None
        return request.process

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            try:
                with request.log_path.open("wb") as out:
                    request.process = subprocess.Popen(
                        request.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        env=request.env, start_new_session=True,
                    )
            except BaseException as e:  # handed to the caller; this thread must keep serving
                request.error = e
            finally:
                request.done.set()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _get_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        return _spawner


def _forget_spawner() -> None:
    # A forked child has no spawner thread (only the forking thread survives fork).
    global _spawner, _spawner_lock
    _spawner, _spawner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _with_death_signal(argv: list[str], env: Mapping[str, str] | None) -> tuple[list[str], bool]:
    """`argv` wrapped so the child gets SIGKILL when pytest dies, and whether it is (not without setpriv)."""
    # Resolve the program here as Popen would (PATH of `env`), so a missing one still
    # raises FileNotFoundError in start() instead of becoming setpriv's exit status.
    program = shutil.which(argv[0], path=os.pathsep.join(os.get_exec_path(env)))
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "No such executable", argv[0])
    setpriv = shutil.which(SETPRIV)
    if setpriv is None:
        log.warning("%s not found (util-linux): %s will not die with this process", SETPRIV, argv[0])
        return [program, *argv[1:]], False
    return [setpriv, "--pdeathsig", "KILL", "--", program, *argv[1:]], True


def _await_exec(pid: int, wrapped: list[str], deadline: Deadline) -> None:
    """Wait until child `pid` no longer runs `wrapped` (setpriv has set the death signal and exec'd)."""
    # Popen returns once setpriv is exec'd, but until setpriv's prctl a pytest
    # death would orphan the child; callers may rely on the tie once start() returns.
    expected = "\0".join(wrapped).encode() + b"\0"

    def execed() -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return True  # reaped already
        # Empty while an exec is under way (even setpriv's: Popen returns as the exec
        # begins) and for a zombie, so empty alone proves nothing.
        return bool(cmdline and cmdline != expected) or _exited(pid)

    try:
        retry(f"{wrapped[0]} exec'ing {wrapped[-1]}", execed, deadline, interval=0.001)
    except TimeoutError as exc:
        log.warning("%s", exc)


def _exited(pid: int) -> bool:
    """Whether child `pid` has ended, without reaping it (its pid, hence its group, stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped (by a concurrent poll())
        return True


class HostProcess:
    """L1's QEMU: a child process of pytest on L0, in its own session, output in `log_path`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def parent_lost(self) -> bool:
        """Always False: the parent is this machine (L0); guest.py asks it of any QEMU."""
        return False

    def start(self, argv: list[str], env: Mapping[str, str] | None, deadline: Deadline) -> None:
        """Start `argv` with exactly `env` (None: this process's environment), within `deadline`."""
        wrapped, tied = _with_death_signal(argv, env)
        self.process = _get_spawner().spawn(wrapped, None if env is None else dict(env), self.log_path)
        if tied:
            _await_exec(self.process.pid, wrapped, deadline.share(SETPRIV_EXEC))

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace: float = QEMU_STOP_GRACE) -> None:
        """SIGTERM (QEMU shuts down at once), SIGKILL after `grace` s; then whatever is left of its group.

        Harmless before start() and after the process ended.
        """
        proc = self.process
        if proc is None or proc.returncode is not None:
            return  # never started, or reaped already: its pid may belong to someone else now
        pid = proc.pid
        # os.kill, not proc.send_signal: that polls and may reap, freeing the pid (and group id).
        _signal(lambda: os.kill(pid, signal.SIGTERM))
        with contextlib.suppress(TimeoutError):
            retry("QEMU exiting on SIGTERM", lambda: _exited(pid), Deadline.after(grace), interval=0.02)
        # The leader is alive or a zombie here, so the group id is still ours: no reuse risk.
        # The group is the session's (setsid), so this also ends helpers QEMU (or a wrapper) started.
        _signal(lambda: os.killpg(pid, signal.SIGKILL))
        proc.wait()

    def output(self, lines: int) -> str:
        """The last `lines` lines of the log ("" when there is none yet)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _signal(send: Callable[[], None]) -> None:
    """Run a kill call, ignoring that its target is gone."""
    try:
        send()
    except ProcessLookupError:
        pass


class ProcessInGuest:
    """The QEMU of L2 and deeper: a process inside the parent guest, driven through its shell.

    A wrapper in the parent records QEMU's pid and, when it ends, its exit status, so
    liveness is one cheap command on the parent. When the parent goes down or boots
    again, this QEMU is gone with it: `parent_lost`.
    """

    parent_grace = QEMU_STOP_GRACE  # seconds QEMU gets to exit on SIGTERM before SIGKILL

    def __init__(self, parent: ParentGuest, workdir: str, prepare: Callable[[Deadline], None] | None = None) -> None:
        self.parent = parent
        self.workdir = workdir
        self.started_in: int | None = None  # the parent's boot this QEMU was started in
        # Once per boot of the parent, before its first QEMU: what a parent without the built-in init
        # needs done (a disk image: hosting.prepare).
        self.prepare = prepare
        self.prepared_in: int | None = None

    def start(self, argv: list[str], env: Mapping[str, str] | None, deadline: Deadline) -> None:
        """Start `argv` in the parent; the command counts against this guest's `deadline` (its boot
        budget), not the parent's command timeout."""
        if self.prepare is not None and self.prepared_in != self.parent.boots:
            self.prepare(deadline)
            self.prepared_in = self.parent.boots
        w = self.workdir
        prefix = "env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " if env else ""
        self.parent.succeed(
            f"rm -rf {w} && mkdir -p {w} && cd {w} && "
            f"( {prefix}{shlex.join(argv)} </dev/null >qemu.log 2>&1 & echo $! > pid; wait $!; echo $? > exit ) "
            ">/dev/null 2>&1 </dev/null &",
            timeout=deadline.remaining(),
        )
        self.started_in = self.parent.boots

    @property
    def parent_lost(self) -> bool:
        """The parent went down or was booted again since this QEMU started: it is gone too."""
        return self.started_in is not None and (not self.parent.alive or self.parent.boots != self.started_in)

    def exit_status(self) -> int | None:
        if self.started_in is None or self.parent_lost:
            return None
        status = self.parent.run(f"cat {self.workdir}/exit 2>/dev/null").stdout.strip()
        return int(status) if status.lstrip("-").isdigit() else None

    def stop(self) -> None:
        if self.started_in is None or self.parent_lost or self.exit_status() is not None:
            return
        w, tenths = self.workdir, int(self.parent_grace * 10)
        # After SIGKILL too, wait for its exit to be recorded: until then its QEMU still holds the
        # parent's virtio ports, and a fresh guest at this level could not open them ("busy").
        wait = f"i=0; while [ ! -e {w}/exit ] && [ $i -lt {tenths} ]; do sleep 0.1; i=$((i + 1)); done"
        self.parent.run(
            f"pid=$(cat {w}/pid 2>/dev/null) || exit 0; kill $pid 2>/dev/null; {wait}; "
            f"[ -e {w}/exit ] || {{ kill -9 $pid 2>/dev/null; {wait}; }}",
            timeout=self.parent_grace * 3,
        )

    def output(self, lines: int) -> str:
        if self.started_in is None or self.parent_lost:
            return ""
        return self.parent.run(f"tail -n {lines} {self.workdir}/qemu.log 2>/dev/null").stdout.rstrip()


class DomuProcess(ProcessInGuest):
    """A Xen domU: `xl create -F` in dom0 (its argv, see xen.domu_argv), which returns once the
    domain is gone. Killing xl would leave the domain running, holding dom0's ports through its
    device model: stopping destroys the domain, and a start destroys one an earlier stop missed."""

    def __init__(self, parent: ParentGuest, workdir: str, domain: str) -> None:
        super().__init__(parent, workdir)
        self.domain = domain

    def _destroy(self, timeout: float) -> None:
        self.parent.run(f"xl destroy {shlex.quote(self.domain)} 2>/dev/null", timeout=timeout)

    def start(self, argv: list[str], env: Mapping[str, str] | None, deadline: Deadline) -> None:
        self._destroy(deadline.remaining())
        super().start(argv, None, deadline)  # dom0's environment: xl and its helpers are on the init's PATH

    def stop(self) -> None:
        if self.started_in is not None and not self.parent_lost and self.exit_status() is None:
            self._destroy(self.parent_grace * 3)  # xl create -F returns, its exit is recorded
        super().stop()

    def output(self, lines: int) -> str:
        """xl's last lines, then its device model's (QEMU's own complaints)."""
        xl = super().output(lines)
        if self.started_in is None or self.parent_lost:
            return xl
        model = self.parent.run(f"tail -n {lines} /var/log/xen/qemu-dm-{shlex.quote(self.domain)}.log 2>/dev/null")
        return "\n".join(filter(None, (xl, model.stdout.rstrip())))
