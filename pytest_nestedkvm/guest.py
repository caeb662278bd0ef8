"""Guest: one QEMU process and its channels, from start to close.

The QEMU process is tied to this Python process (PR_SET_PDEATHSIG), runs in its
own session, and keeps everything in a private run directory that close()
removes; close() tolerates a half-started guest.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .channel import CommandResult, ShellChannel
from .console import Console
from .errors import BootError, ChannelError, CommandFailed, GuestCrashed, NestedKvmError
from .qemu import GuestSpec, RunPaths, build_argv, shell_line

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL QEMU when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def wait_for(
    what: str, check: Callable[[], object], timeout: float, *, interval: float = 0.05,
    last_seen: Callable[[], str] | None = None,
) -> object:
    """Call `check` until it returns something truthy; the one bounded retry loop.

    On timeout the error says what was awaited and, when given, what was last seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = f"; last seen:\n{last_seen()}" if last_seen else ""
            raise TimeoutError(f"{what} did not happen within {timeout:g} s{seen}")
        time.sleep(interval)


class Guest:
    """A running guest at some level with the API tests use: run/succeed/fail/..."""

    def __init__(
        self, spec: GuestSpec, run_dir: Path, *, boot_timeout: float, command_timeout: float
    ) -> None:
        self.spec = spec
        self.level = spec.level
        self.name = spec.name
        self.paths = RunPaths(run_dir)
        self.boot_timeout = boot_timeout
        self.command_timeout = command_timeout
        self.console = Console(self.paths.console)
        self.qemu_argv = build_argv(spec, self.paths)
        self.log = logging.getLogger(f"pytest_nestedkvm.guest.{self.name}")
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None
        self._shell: ShellChannel | None = None
        self._control: ShellChannel | None = None
        self._sockets: list[socket.socket] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Guest:
        """Start QEMU and return once the guest answered its first command."""
        started = time.monotonic()
        run_dir = self.paths.run_dir
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(mode=0o700, parents=True)
        self.log.info("starting: %s", shell_line(self.qemu_argv))
        with (run_dir / "qemu.log").open("wb") as qemu_log:
            self.process = subprocess.Popen(
                self.qemu_argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent, start_new_session=True,
            )
        try:
            self._shell = self._open_channel(self.paths.command, "shell", started)
            self._control = self._open_channel(self.paths.control, "control", started)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        self.log.info("ready in %.2f s", self.boot_seconds)
        return self

    def _open_channel(self, path: Path, role: str, started: float) -> ShellChannel:
        remaining = self.boot_timeout - (time.monotonic() - started)
        try:
            wait_for(f"{self.name} QEMU socket {path.name}", lambda: self._alive_and(path.exists), remaining)
        except TimeoutError as exc:
            raise BootError(f"{self.name}: {exc}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        self._sockets.append(sock)
        interrupt = self._interrupt if role == "shell" else None
        channel = ShellChannel(sock, f"{self.name}.{role}", watchdog=self._check_alive, interrupt=interrupt)
        try:
            channel.connect(self.boot_timeout - (time.monotonic() - started))
        except NestedKvmError as exc:
            if isinstance(exc, GuestCrashed):
                raise BootError(f"{self.name} died while booting: {exc}") from None
            raise BootError(
                f"{self.name} did not boot within {self.boot_timeout:g} s: its {role} channel never answered "
                f"(raise --nested-boot-timeout if the host is just slow); last console lines:\n{self.console.tail()}"
            ) from None
        return channel

    def _check_alive(self) -> None:
        """Raise GuestCrashed when QEMU is gone; the channel calls this while it waits."""
        if self.process is None or self.process.poll() is None:
            return
        problem = self.console.first_problem()
        what = f"kernel problem: {problem}" if problem else "no kernel panic on the console"
        qemu_said = _last_lines(self.paths.run_dir / "qemu.log", 5)
        raise GuestCrashed(
            f"{self.name} QEMU exited with status {self.process.returncode} ({what})"
            + (f"\nQEMU said:\n{qemu_said}" if qemu_said else "")
            + f"\nlast console lines:\n{self.console.tail()}"
        )

    def _alive_and(self, check: Callable[[], bool]) -> bool:
        self._check_alive()
        return check()

    def _interrupt(self, shell_pid: int) -> None:
        if self._control is None:
            return
        self._control.run(f"__nk_kill {shell_pid}", timeout=30)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and bool(self._shell and not self._shell.broken)

    def close(self, keep_files: bool = False) -> None:
        """Stop QEMU (gracefully if it listens, else by force) and remove the run directory."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._shell = self._control = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # QEMU shuts down at once on SIGTERM
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_files:
            shutil.rmtree(self.paths.run_dir, ignore_errors=True)

    def restart(self) -> Guest:
        self.close()
        return self.start()

    def crash(self) -> None:
        """Make the guest kernel panic for real (sysrq-c) and wait until QEMU is gone."""
        if self._control is None or self.process is None:
            raise GuestCrashed(f"{self.name} is not running")
        try:
            self._control.run("echo c > /proc/sysrq-trigger", timeout=5)
        except (NestedKvmError, OSError):
            pass  # the guest died mid-reply, which is what was asked for
        self.process.wait(timeout=self.boot_timeout)

    # -- commands --------------------------------------------------------------------------

    @property
    def console_log(self) -> Path:
        return self.paths.console

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        if self._shell is None:
            raise ChannelError(f"{self.name} is not running")
        return self._shell.run(command, self.command_timeout if timeout is None else timeout)

    def succeed(self, command: str, timeout: float | None = None) -> str:
        """Run `command`, require exit status 0, return its stdout."""
        result = self.run(command, timeout)
        if result.exit_status != 0:
            raise _command_failed(self.name, result, "expected exit status 0")
        return result.stdout

    def fail(self, command: str, timeout: float | None = None) -> str:
        """Run `command`, require a non-zero exit status, return its stderr."""
        result = self.run(command, timeout)
        if result.exit_status == 0:
            raise _command_failed(self.name, result, "expected a non-zero exit status")
        return result.stderr

    def wait_until_succeeds(self, command: str, timeout: float) -> str:
        last: list[CommandResult] = []

        def attempt() -> bool:
            last[:] = [self.run(command, timeout)]
            return last[0].exit_status == 0

        try:
            wait_for(f"{command!r} succeeding on {self.name}", attempt, timeout, interval=0.2)
        except TimeoutError:
            raise _command_failed(self.name, last[0], f"still failing after {timeout:g} s") from None
        return last[0].stdout

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<Guest {self.name} {self.spec.accel} -cpu {self.spec.cpu} {state}>"


def _command_failed(name: str, result: CommandResult, expectation: str) -> CommandFailed:
    def clip(text: str) -> str:
        text = text.rstrip("\n")
        return text if len(text) <= 2000 else "..." + text[-2000:]

    return CommandFailed(
        f"{name}: {result.command!r} exited {result.exit_status}, {expectation}\n"
        f"stdout:\n{clip(result.stdout)}\nstderr:\n{clip(result.stderr)}",
        command=result.command, exit_status=result.exit_status, stdout=result.stdout, stderr=result.stderr,
    )


def _last_lines(path: Path, count: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-count:])
    except FileNotFoundError:
        return ""


def qemu_pids() -> list[int]:
    """PIDs of QEMU processes started by this process (for leak checks in tests)."""
    me = os.getpid()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.append(int(stat.parent.name))
    return found
