"""Guest: one QEMU process and its channels, from start to close.

The QEMU process is tied to this Python process (PR_SET_PDEATHSIG), runs in its
own session, and keeps everything in a private run directory that close()
removes; close() tolerates a half-started guest.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import paramiko

from . import ssh
from .channel import ByteStream, CommandResult, ShellChannel
from .console import Console, serial_login
from .errors import BootError, ChannelError, CommandFailed, CommandTimeout, GuestCrashed, NestedKvmError
from .initramfs import PORT_DIR
from .qemu import SSH_GUEST_PORT, GuestSpec, HostEnds, ParentEnds, build_argv, shell_line
from .qmp import Qmp
from .ssh import SessionKey, SshError, sshd_script

PR_SET_PDEATHSIG = 1
# Streams of a deeper guest that L1's QEMU carries to L0 (the console goes to a file).
STREAM_ROLES = ("cmd", "ctl", "qmp")


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


class HostProcess:
    """L1's QEMU: a child process of pytest on L0."""

    def __init__(self, run_dir: Path) -> None:
        self.log_path = run_dir / "qemu.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str]) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent, start_new_session=True,
            )

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # QEMU shuts down at once on SIGTERM
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def output(self, lines: int) -> str:
        return _last_lines(self.log_path, lines)


class ProcessInGuest:
    """The QEMU of L2 and deeper: a process inside the parent guest, driven through its shell.

    A wrapper in the parent records QEMU's pid and, when it ends, its exit status,
    so liveness is one cheap command on the parent.
    """

    def __init__(self, parent: Guest, workdir: str) -> None:
        self.parent = parent
        self.workdir = workdir
        self.started_in: int | None = None  # the parent's boot this QEMU was started in

    def start(self, argv: list[str]) -> None:
        w = self.workdir
        self.parent.succeed(
            f"rm -rf {w} && mkdir -p {w} && cd {w} && "
            f"( {shell_line(argv)} </dev/null >qemu.log 2>&1 & echo $! > pid; wait $!; echo $? > exit ) "
            ">/dev/null 2>&1 </dev/null &"
        )
        self.started_in = self.parent.boots

    def exit_status(self) -> int | None:
        if self.started_in is None:
            return None
        if not self.parent.alive or self.parent.boots != self.started_in:
            return -1  # the parent went down, and this QEMU with it
        status = self.parent.run(f"cat {self.workdir}/exit 2>/dev/null").stdout.strip()
        return int(status) if status else None

    def stop(self) -> None:
        if self.started_in is None or self.exit_status() is not None:
            return
        w = self.workdir
        self.parent.run(
            f"pid=$(cat {w}/pid 2>/dev/null) || exit 0; kill $pid 2>/dev/null; i=0; "
            f"while [ ! -e {w}/exit ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done; kill -9 $pid 2>/dev/null",
            timeout=30,
        )

    def output(self, lines: int) -> str:
        if self.started_in != self.parent.boots or not self.parent.alive:
            return ""
        return self.parent.run(f"tail -n {lines} {self.workdir}/qemu.log 2>/dev/null").stdout.rstrip()


class Guest:
    """A running guest at some level with the API tests use: run/succeed/fail/...

    L1 runs on L0 and its QEMU owns, as unix sockets in L0's run root, the streams
    of every deeper level too (they pass through L1's virtio ports); L1 connects
    them all when it starts and deeper guests borrow theirs.
    """

    def __init__(
        self, spec: GuestSpec, run_root: Path, *, boot_timeout: float, command_timeout: float,
        parent: Guest | None = None, edit_argv: Callable[[list[str]], None] | None = None,
        ssh_key: SessionKey | None = None,
    ) -> None:
        self.spec = spec
        self.level = spec.level
        self.name = spec.name
        self.parent = parent
        self.run_root = run_root
        host_ends = HostEnds(run_root)
        self.paths = host_ends.paths(spec.level)
        self.boot_timeout = boot_timeout
        self.command_timeout = command_timeout
        self.console = Console(self.paths.console)
        if parent is None:
            self.qemu_argv = build_argv(spec, host_ends)
            self.process: HostProcess | ProcessInGuest = HostProcess(self.paths.run_dir)
        else:
            self.qemu_argv = build_argv(spec, ParentEnds())
            self.process = ProcessInGuest(parent, f"{PORT_DIR}/{self.name}")
        if edit_argv is not None:
            edit_argv(self.qemu_argv)  # the user's pytest_nestedkvm_qemu_argv hooks
        self.log = logging.getLogger(f"pytest_nestedkvm.guest.{self.name}")
        self.boot_seconds: float | None = None
        self.console_start = 0
        self.console_ready = 0
        self.boots = 0  # how many times this guest was started: deeper guests notice a reboot
        self.stopped_on_purpose = False
        self.streams: dict[tuple[int, str], socket.socket] = {}  # L1 only: every level's sockets
        self._shell: ShellChannel | None = None
        self._control: ShellChannel | None = None
        self._qmp: Qmp | None = None
        self.ssh_key = ssh_key
        self._ssh: paramiko.SSHClient | None = None

    @property
    def root(self) -> Guest:
        return self if self.parent is None else self.parent.root

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Guest:
        """Start QEMU and return once the guest answered its first command."""
        started = time.monotonic()
        deadline = started + self.boot_timeout
        self.console_start = self.console.size()  # a deeper guest's log continues across restarts
        self.boots += 1
        self.stopped_on_purpose = False
        self.log.info("starting: %s", shell_line(self.qemu_argv))
        try:
            if self.parent is None:
                self._prepare_run_dirs()
                self.process.start(self.qemu_argv)
                self._connect_streams(deadline)
            else:
                for role in STREAM_ROLES:
                    _drain(self.root.streams[(self.level, role)])  # bytes left by a previous instance
                self.process.start(self.qemu_argv)
            if self.spec.channel == "serial":
                # One console, one shell: no second channel to interrupt a command that hangs.
                self._shell = self._open_channel("cmd", self._serial_login(deadline), deadline)
            else:
                if self.spec.channel == "ssh":
                    self._ssh = self._connect_ssh(deadline - time.monotonic(), booting=True)
                    streams: tuple[ByteStream, ByteStream] = (ssh.shell(self._ssh), ssh.shell(self._ssh))
                else:
                    streams = (self.root.streams[(self.level, "cmd")], self.root.streams[(self.level, "ctl")])
                self._shell = self._open_channel("cmd", streams[0], deadline)
                self._control = self._open_channel("ctl", streams[1], deadline)
            if self.spec.channel != "agent":
                # A disk image's own kernel: make a panic end QEMU (-no-reboot), as panic=-1 does for
                # the built-in guest, and let crash() use sysrq (both need root; quietly skipped otherwise).
                self._shell.run("{ echo -1 > /proc/sys/kernel/panic; echo 1 > /proc/sys/kernel/sysrq; } 2>/dev/null",
                                30)
        except BaseException:
            self.close(keep_files=True)
            raise
        self.qmp().events()  # connect now: a crash's GUEST_PANICKED / SHUTDOWN events are kept from here on
        self.boot_seconds = time.monotonic() - started
        self.console_ready = self.console.size()  # boot-time console lines are judged by the boot itself
        self.log.info("ready in %.2f s", self.boot_seconds)
        return self

    def _prepare_run_dirs(self) -> None:
        if self.run_root.exists():
            for level in range(1, self.spec.deepest + 1):
                shutil.rmtree(self.run_root / f"l{level}", ignore_errors=True)
        for level in range(1, self.spec.deepest + 1):
            (self.run_root / f"l{level}").mkdir(mode=0o700, parents=True)

    def _connect_streams(self, deadline: float) -> None:
        """Connect every socket L1's QEMU serves: its own and those of deeper levels."""
        wanted = {(self.level, role) for role in ("cmd", "ctl")} if self.spec.channel == "agent" else set()
        wanted |= {(level, role) for level in range(2, self.spec.deepest + 1) for role in STREAM_ROLES}
        host_ends = HostEnds(self.run_root)
        for level, role in sorted(wanted):
            path = host_ends.paths(level).end(role)
            try:
                wait_for(f"{self.name} QEMU socket {path}", partial(self._alive_and, path.exists),
                         deadline - time.monotonic())
            except TimeoutError as exc:
                raise BootError(f"{self.name}: {exc}") from None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            self.streams[(level, role)] = sock

    def _serial_login(self, deadline: float) -> socket.socket:
        """Log in on the serial console (--nested-login) and return it as the command stream."""
        assert self.spec.login is not None
        wait_for(f"{self.name} serial console socket", partial(self._alive_and, self.paths.serial.exists),
                 deadline - time.monotonic())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.paths.serial))
        self.streams[(self.level, "serial")] = sock
        user, password = self.spec.login
        try:
            serial_login(sock, user, password, deadline - time.monotonic(), self._check_alive)
        except (TimeoutError, PermissionError, ConnectionError) as exc:
            raise BootError(f"{self.name}: serial console login as {user!r} failed: {exc}\n"
                            f"last console lines:\n{self.console.tail()}") from None
        return sock

    def _open_channel(self, role: str, sock: ByteStream, deadline: float) -> ShellChannel:
        interrupt = self._interrupt if role == "cmd" and self.spec.channel != "serial" else None
        channel = ShellChannel(sock, f"{self.name}.{role}", watchdog=self._check_alive, interrupt=interrupt)
        try:
            channel.connect(deadline - time.monotonic())
        except NestedKvmError as exc:
            # A closed channel usually means QEMU is exiting: give it a moment to be reaped.
            crash = self._crash_report(wait=5.0 if isinstance(exc, ChannelError) else 0.0)
            if crash is not None:
                raise BootError(f"{self.name} died while booting: {crash}") from None
            qemu_said = self.process.output(5)
            raise BootError(
                f"{self.name} did not boot within {self.boot_timeout:g} s: its {role} channel never answered "
                f"(raise --nested-boot-timeout if the host is just slow)"
                + (f"\nQEMU said:\n{qemu_said}" if qemu_said else "")
                + f"\nlast console lines:\n{self.console.tail()}"
            ) from None
        return channel

    def _check_alive(self) -> None:
        """Raise GuestCrashed when QEMU is gone; the channel calls this while it waits."""
        crash = self._crash_report()
        if crash is not None:
            raise GuestCrashed(crash)

    def _crash_report(self, wait: float = 0.0) -> str | None:
        """What happened to a QEMU that has exited (waiting up to `wait` s for it), or None."""
        try:
            wait_for("QEMU exit", lambda: self.process.exit_status() is not None, wait, interval=0.1)
        except TimeoutError:
            return None
        status = self.process.exit_status()
        if self.parent is not None and status == -1:  # see ProcessInGuest.exit_status
            why = (self.parent._crash_report() or self.parent.channel_trouble
                   or f"{self.parent.name} was restarted (boot {self.parent.boots})")
            return f"{self.name} went down with its parent: {why}"
        problem = self.console.first_problem(self.console_start)
        what = f"kernel problem: {problem}" if problem else "no kernel panic on the console"
        qemu_said = self.process.output(5)
        return (
            f"{self.name} QEMU exited with status {status} ({what})"
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
    def channel_trouble(self) -> str | None:
        """Why this guest's shell channel stopped working, if it did."""
        return None if self._shell is None else self._shell.broken

    @property
    def alive(self) -> bool:
        if self._shell is None or self._shell.broken:
            return False
        try:
            return self.process.exit_status() is None
        except NestedKvmError:
            return False

    def qmp(self) -> Qmp:
        """The QMP monitor of this guest's QEMU (for a deeper guest: through L1's virtio port)."""
        if self._qmp is None:
            address = self.paths.qmp if self.parent is None else self.root.streams[(self.level, "qmp")].dup()
            try:
                self._qmp = Qmp(address)
            except TimeoutError as exc:
                self._check_alive()  # a QEMU that died says so, with its own words
                raise ChannelError(f"{self.name}: {exc}") from None
        return self._qmp

    def qmp_events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """QMP events since the last call ([] before the monitor was connected); kept after QEMU exits."""
        return [] if self._qmp is None else self._qmp.events(wait)

    def close(self, keep_files: bool = False) -> None:
        """Stop QEMU (gracefully if it listens, else by force); tolerates a half-started guest."""
        self.stopped_on_purpose = self.alive  # a live guest stopped by request is not a crash
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._shell = self._control = None
        try:
            self.process.stop()
        except NestedKvmError:
            pass  # the parent is gone, and this QEMU with it
        for sock in self.streams.values():
            sock.close()
        self.streams.clear()
        if self.parent is None and not keep_files:
            for level in range(1, self.spec.deepest + 1):
                shutil.rmtree(self.run_root / f"l{level}", ignore_errors=True)

    def restart(self) -> Guest:
        self.close()
        return self.start()

    def crash(self) -> None:
        """Make the guest kernel panic for real (sysrq-c) and wait until QEMU is gone."""
        if self._shell is None:
            raise GuestCrashed(f"{self.name} is not running")
        try:
            (self._control or self._shell).run("echo c > /proc/sysrq-trigger", timeout=5)
        except (NestedKvmError, OSError):
            pass  # the guest died mid-reply, which is what was asked for
        wait_for(f"{self.name} QEMU exiting after the panic", lambda: self.process.exit_status() is not None,
                 self.boot_timeout, interval=0.1)

    # -- SSH -------------------------------------------------------------------------------

    @property
    def ssh(self) -> paramiko.SSHClient:
        """A connected paramiko client, as root with the session key; sshd starts on first use.

        L1 is reached on a port of L0's 127.0.0.1, deeper levels through their parent's
        connection (a direct-tcpip channel to the parent's loopback).
        """
        transport = None if self._ssh is None else self._ssh.get_transport()
        if self._ssh is None or transport is None or not transport.is_active():
            self._ssh = self._connect_ssh()
        return self._ssh

    def _connect_ssh(self, timeout: float = 60.0, booting: bool = False) -> paramiko.SSHClient:
        """Connect to the guest's sshd: the built-in guest's is started here, a disk image runs its own."""
        if self.ssh_key is None:
            raise SshError(f"{self.name}: SSH needs the session key, and this guest was started without one")
        deadline = time.monotonic() + timeout
        try:
            port, host_key = self._sshd_port(self.ssh_key, timeout)
        except TimeoutError as exc:
            raise BootError(f"{self.name}: {exc}\nlast console lines:\n{self.console.tail()}") from None
        via = None if self.parent is None else self.parent.ssh
        try:
            return ssh.connect(self.name, port, self.ssh_key, host_key=host_key, via=via,
                               timeout=deadline - time.monotonic(), check=self._check_alive)
        except SshError as exc:
            if not booting:
                raise
            raise BootError(
                f"{exc}\nIf the image has no cloud-init, pass --nested-login USER:PASSWORD to log in on its "
                f"serial console instead.\nlast console lines:\n{self.console.tail()}"
            ) from None

    def _sshd_port(self, key: SessionKey, timeout: float) -> tuple[int, str | None]:
        """The port (on the parent's loopback) forwarded to this guest's sshd, and its host key if known."""
        host_key = None
        if self.spec.channel == "agent":
            host_key = self.succeed(sshd_script(key.public_line), timeout=60).strip().splitlines()[-1]
        elif self.parent is None:
            wait_for(f"{self.name} QMP socket", partial(self._alive_and, self.paths.qmp.exists), timeout)
        else:  # QEMU inside the parent is up once its QMP greeting arrives (before that, connecting would block)
            greeting = self.root.streams[(self.level, "qmp")]
            wait_for(f"{self.name} QMP greeting", partial(self._alive_and, partial(_readable, greeting)), timeout)
        port = self.qmp().forwarded_port(SSH_GUEST_PORT)
        if port is None:
            raise SshError(f"{self.name}: its QEMU forwards no port to the guest's port {SSH_GUEST_PORT} "
                           "(a -nic edit in extra QEMU arguments?)")
        return port, host_key

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a file from L0 into the guest over SFTP; bytes and permission bits stay exact."""
        ssh.put(self.ssh, Path(local), remote, self.command_timeout)

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy a file out of the guest to L0 over SFTP; bytes and permission bits stay exact."""
        ssh.get(self.ssh, remote, Path(local), self.command_timeout)

    # -- commands --------------------------------------------------------------------------

    @property
    def console_log(self) -> Path:
        return self.paths.console

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        if self._shell is None:
            raise ChannelError(f"{self.name} is not running")
        try:
            return self._shell.run(command, self.command_timeout if timeout is None else timeout)
        except CommandTimeout as exc:
            exc.args = (f"{exc}\nlast console lines of {self.name}:\n{self.console.tail(10)}",)
            raise

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


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _drain(sock: socket.socket) -> None:
    """Discard whatever is buffered on `sock` without waiting."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 16):
            pass
    except (BlockingIOError, InterruptedError):
        pass
    finally:
        sock.setblocking(True)
