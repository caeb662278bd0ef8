"""Guest: a QEMU process, the link its bytes travel on, a command channel, QMP and a console.

`new_guest` picks the parts for a spec (on the host or inside a parent); Guest only
composes them: start, answer commands, report what happened, stop. What happened is told
by forensics.py from the evidence gathered here (evidence_of and the functions beside it),
which also do what acts on a guest before or after forensics decides.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

from ..base.deadline import CLOSE_GRACE, EXIT_EVENTS, HEARTBEAT, POKE, TIMER_CHECK, Deadline, retry
from ..base.errors import (
    BootError,
    ChannelError,
    CommandTimeout,
    GuestCrashed,
    GuestSilent,
    GuestWedged,
    LevelUnavailable,
    LoginFailed,
    NestedKvmError,
    SshError,
)
from ..boot.layout import CHANNEL_NEEDS, CONSOLE, PORT_DIR
from ..boot.qemu import SSH_GUEST_PORT, GuestSpec, build_argv, shell_line
from ..boot.xen import domain_name
from . import forensics, hosting, ssh
from .channel import DEFAULT_OUTPUT_LIMIT, ChannelSetup, CommandResult, channel_class
from .commands import GuestApi
from .console import Console
from .forensics import ConsoleMark, Evidence, Trouble
from .link import DEFAULT_CONSOLE_LIMIT, HostLink, Link, ParentLink
from .process import QEMU_ENV, DomuProcess, HostProcess, Process, ProcessInGuest
from .qmp import Qmp
from .ssh import SessionKey

TIMER_PROBE = "sleep 0.1"
# What 6.1's KVM prints when it made a vCPU without a TSC multiplier (see _no_tsc_rate).
NO_TSC_RATE = "user requested TSC rate below hardware speed"


class Guest(GuestApi):
    """A guest at some level with the API tests use (commands and files: GuestApi; see README)."""

    def __init__(
        self, spec: GuestSpec, link: Link, process: Process, argv: list[str], *,
        boot_timeout: float, command_timeout: float, parent: Guest | None = None, ssh_key: SessionKey | None = None,
        emulated: bool = False, output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        self.spec, self.level, self.name, self.parent = spec, spec.level, spec.name, parent
        self.link, self.process, self.qemu_argv = link, process, argv
        self.boot_timeout, self.command_timeout = boot_timeout, command_timeout
        self.ssh_key, self.hypervisor = ssh_key, spec.hypervisor  # "xen": a Xen L1, this guest its dom0
        self.console = Console(link.console_path)
        # Its virtualization is emulated (TCG, or KVM on TCG's SVM): a stall on its console is then
        # the emulator wedging it, and ends the wait at once instead of at the command's timeout;
        # so does a control shell that stops answering while a command runs (a guest frozen whole).
        self.emulated = emulated
        self.channel = channel_class(spec.channel)(
            ChannelSetup(self.name, link, self._check_alive, spec.login, self._open_ssh,
                         heartbeat=self.silence_limit if emulated else None, poke=POKE,
                         output_limit=output_limit))
        self.log = logging.getLogger(f"pytest_nestedkvm.guest.{self.name}")
        self.boot_seconds: float | None = None
        self.console_start = self.console_ready = 0  # console bytes before this boot / before it was ready
        self.boots = 0  # how many times this guest was started: deeper guests notice a reboot
        self.stopped_on_purpose = False
        self.wedged: GuestWedged | None = None
        self._stall_scan = 0  # console bytes already searched for stall lines
        self._asking = False  # the control shell is being asked whether the guest runs on
        self._qmp: Qmp | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Guest:
        """Start QEMU and return once the guest answered its first command."""
        deadline = Deadline.after(self.boot_timeout)
        self.console_start = self.console.size()  # a deeper guest's log continues across restarts
        self.boots += 1
        self.stopped_on_purpose = False
        self.wedged, self._stall_scan = None, self.console_start
        self.log.info("starting: %s", shell_line(self.qemu_argv))
        try:
            self.link.prepare()
            self.process.start(self.qemu_argv, QEMU_ENV, deadline)
            self.link.after_start(deadline, self._check_alive)
            self.channel.open(deadline)
            self._monitor(deadline)  # from here on, crash events are kept
            check_timer(self, deadline)
        except (NestedKvmError, TimeoutError) as exc:  # LevelUnavailable: the parent cannot run it at all (a skip)
            error = exc if isinstance(exc, LevelUnavailable) else boot_error(self, exc, deadline)
            self.close(keep_files=True)
            raise error from None
        except BaseException:
            self.close(keep_files=True)
            raise
        self.boot_seconds = deadline.budget - deadline.remaining()
        self.console_ready = self.console.size()  # boot-time console lines are judged by the boot itself
        self.log.info("ready in %.2f s", self.boot_seconds)
        return self

    def exited(self) -> bool:
        """Its QEMU is gone (exited, or went down with the parent)."""
        return self.process.parent_lost or self.process.exit_status() is not None

    def _check_alive(self) -> None:
        """Raise GuestCrashed when QEMU is gone, GuestWedged when it or a guest above it wedged (channels' wait)."""
        if self.exited():
            raise exit_error(self)
        for guest in reversed(self.chain()):  # the outermost first: a wedged L1 stalls its L2 too
            guest.watch_stalls()

    @property
    def silence_limit(self) -> float:
        """Seconds its control shell may take to answer `true` before an emulated guest counts as wedged."""
        return HEARTBEAT * self.level

    def chain(self) -> list[Guest]:
        """This guest and the guests it runs in, innermost first."""
        return [self] if self.parent is None else [self, *self.parent.chain()]

    def watch_stalls(self) -> None:
        """On emulated virtualization, raise GuestWedged once its console reported a stall that
        it did not run on from."""
        if self.wedged is None and self.emulated:
            line, end = self.console.scan_stall(self._stall_scan)
            survived = None if line is None else _runs_on_after(self, line)
            if line is None or survived is not None:  # None: asked again at the next check
                self._stall_scan = end
            if survived is False:
                self.mark_wedged(line or "")
        if self.wedged is not None:
            raise GuestWedged(str(self.wedged), level=self.level, stall=self.wedged.stall, line=self.wedged.line)

    def mark_wedged(self, line: str, stall: str | None = None) -> GuestWedged:
        """Take this guest as wedged by the stall `line` its console printed (or by `stall`, what
        was seen instead): it is not alive from now on, so the next test gets a fresh one."""
        self.wedged = forensics.wedge_error(evidence_of(self), line, stall)
        return self.wedged

    @property
    def channel_trouble(self) -> str | None:
        """Why this guest's command channel stopped working, if it did."""
        return self.channel.broken

    @property
    def alive(self) -> bool:
        if self.channel.broken or self.wedged is not None:
            return False
        try:
            return not self.exited()
        except NestedKvmError:
            return False

    def qmp(self) -> Qmp:
        """The QMP monitor of this guest's QEMU (for a deeper guest: through L1's virtio port)."""
        try:
            return self._monitor(Deadline.after(self.command_timeout))
        except TimeoutError as exc:
            raise ChannelError(f"{self.name}: {exc}") from None

    def _monitor(self, deadline: Deadline) -> Qmp:
        # One connection per QEMU: its QMP socket serves one client at a time.
        if self._qmp is None:
            self._qmp = self.link.qmp(deadline, self._check_alive)
        return self._qmp

    def qmp_events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """QMP events since the last call ([] before the monitor was connected); kept after QEMU exits."""
        return [] if self._qmp is None else self._qmp.events(wait)

    def close(self, keep_files: bool = False) -> None:
        """Stop QEMU (gracefully if it listens, else by force); tolerates a half-started guest."""
        self.stopped_on_purpose = self.alive  # a live guest stopped by request is not a crash
        self.channel.close()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        try:
            self.process.stop()
        except NestedKvmError:
            pass  # the parent is gone, and this QEMU with it
        self.link.close(keep_files)

    def restart(self) -> Guest:
        self.close()
        return self.start()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()  # `with new_guest(...).start() as guest:` stops it however the block ends

    def crash(self) -> None:
        """Make the guest kernel panic for real (sysrq-c) and wait until QEMU is gone."""
        deadline = Deadline.after(self.boot_timeout)
        try:
            self.channel.panic(deadline)
        except (CommandTimeout, GuestCrashed, OSError):
            pass  # the guest died mid-reply, which is what was asked for
        except ChannelError:
            if self.channel.shell is None:
                raise GuestCrashed(f"{self.name} is not running", level=self.level) from None
        retry(f"{self.name} QEMU exiting after the panic", self.exited, deadline, interval=0.1)

    # -- what the command API and SSH need of a guest ------------------------------------

    def _open_ssh(self, deadline: Deadline) -> paramiko.SSHClient:
        if self.ssh_key is None:
            raise SshError(f"{self.name}: SSH needs the session key, and this guest was started without one")
        host_key = self.channel.host_key(self.ssh_key.public_line, deadline)
        port = self._monitor(deadline).forwarded_port(SSH_GUEST_PORT)
        if port is None:
            raise SshError(f"{self.name}: its QEMU forwards no port to the guest's port {SSH_GUEST_PORT} "
                           "(a -nic edit in extra QEMU arguments?)")
        via = None if self.parent is None else self.parent.ssh
        return ssh.connect(self.name, port, self.ssh_key, host_key=host_key, via=via,
                           deadline=deadline, check=self._check_alive)

    @property
    def console_log(self) -> Path:
        return self.link.console_path

    def _run(self, command: str, deadline: Deadline) -> CommandResult:
        try:
            return self.channel.run(command, deadline)
        except CommandTimeout as exc:
            exc.args = (f"{exc}\nlast console lines of {self.name}:\n{self.console.tail(10)}",)
            raise
        except GuestWedged as exc:
            # Stop the wedged QEMU now: it keeps host cores busy and will not answer again.
            next(guest for guest in self.chain() if guest.level == exc.level).close(keep_files=True)
            raise
        except GuestSilent as exc:
            raise _wedge_of_the_silent(self, exc) from None

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<Guest {self.name} {self.spec.accel} -cpu {self.spec.cpu} {state}>"


def new_guest(
    spec: GuestSpec, run_root: Path, *, parent: Guest | None, boot_timeout: float, command_timeout: float,
    edit_argv: Callable[[list[str]], None] | None = None, ssh_key: SessionKey | None = None,
    console_limit: int = DEFAULT_CONSOLE_LIMIT, output_limit: int = DEFAULT_OUTPUT_LIMIT, emulated: bool = False,
) -> Guest:
    """The guest for `spec`: on the host (L1) or inside `parent`, with its QEMU argv as the user's
    pytest_nestedkvm_qemu_argv hooks leave it."""
    link: Link
    process: Process
    if parent is None:
        link = HostLink(run_root, spec.deepest, console_limit=console_limit,
                        l1_console=CHANNEL_NEEDS[spec.channel].console_role == CONSOLE)
        process = HostProcess(run_root / "l1" / "qemu.log")
    else:
        link = ParentLink(parent.link, spec.level)
        # A parent without the built-in init (a user's disk image) is made ready for this QEMU first.
        hosted = None if CHANNEL_NEEDS[parent.spec.channel].agent_ports else partial(hosting.prepare, parent, spec)
        workdir = f"{PORT_DIR}/{spec.name}"
        process = (DomuProcess(parent, workdir, domain_name(spec.name)) if spec.domu
                   else ProcessInGuest(parent, workdir, prepare=hosted))
    argv = build_argv(spec, link.ends)
    if edit_argv is not None:
        edit_argv(argv)
    return Guest(spec, link, process, argv, boot_timeout=boot_timeout, command_timeout=command_timeout,
                 parent=parent, ssh_key=ssh_key, emulated=emulated, output_limit=output_limit)


# -- evidence for forensics -------------------------------------------------------------------
# forensics.py judges and acts on nothing: what acts on a guest (settling its console, its stall
# watch, marking it wedged) is done here, before the evidence is gathered or after the judgement.
# Functions over the guest's public attributes, not methods, so that tests can hand in fakes.


def _on_emulated_svm(guest: Guest) -> bool:
    """A KVM guest whose SVM TCG emulates (L2 and deeper on such a host): a timer it loses stays lost."""
    return guest.emulated and guest.spec.accel != "tcg"


def check_timer(guest: Guest, deadline: Deadline) -> None:
    """Raise GuestWedged unless `guest` wakes from a short sleep. A KVM guest on TCG's emulated
    SVM can lose its timer interrupt while it boots and still answer commands (they come with
    interrupts of their own): in two CI runs such an L2 then stalled for minutes and L3 never
    booted in it. Found here, that costs seconds and the test reruns on fresh guests."""
    if not _on_emulated_svm(guest):
        return  # TCG's own lost timer comes back with the next interrupt (_runs_on_after)
    seconds = min(TIMER_CHECK, deadline.remaining())
    try:
        guest.channel.run(TIMER_PROBE, deadline.share(seconds))
    except CommandTimeout:
        raise guest.mark_wedged(f"`{TIMER_PROBE}` did not return within {seconds:.0f} s of its boot"
                                f"{_no_tsc_rate(guest)}", stall="lost timer") from None


def _no_tsc_rate(guest: Guest) -> str:
    """The known cause of a lost timer, where the parent's console shows it: 6.1's KVM prints
    NO_TSC_RATE when it made a vCPU without a TSC multiplier, whose TSC-deadline timer then never
    fires (the built-in guest avoids it: initramfs.py, tsc_settled)."""
    parent = guest.parent
    if parent is None or NO_TSC_RATE not in parent.console_log.read_text(errors="replace"):
        return ""
    return (f"; L{parent.level}'s KVM gave it no TSC rate (`{NO_TSC_RATE}` on L{parent.level}'s console): "
            f"L{parent.level} loaded kvm before its TSC calibration settled")


def _runs_on_after(guest: Guest, line: str) -> bool | None:
    """Whether the guest answers its control shell after printing the stall `line`; None when
    that cannot be asked now (the control shell is busy: its own answer will tell).
    Under TCG a stall line often means the emulator held back the guest's timer interrupt for
    a while: the guest runs on as soon as another interrupt comes (the question is one). A KVM
    guest on TCG's emulated SVM does not: its timer stayed lost for minutes while it answered
    every command (README, The emulated path), so a stall line is its wedge at once."""
    control = guest.channel.control
    if control is None or _on_emulated_svm(guest):
        return False  # nothing to ask on (while booting), or no second chance: a wedge
    if guest._asking or control.busy:
        return None
    guest._asking = True
    try:
        alive = guest.channel.answers(guest.silence_limit)
    finally:
        guest._asking = False
    if alive:
        guest.log.warning("printed a stall and still answers, so it goes on: %s", line)
    return alive


def _wedge_of_the_silent(guest: Guest, silent: GuestSilent) -> GuestWedged:
    """The wedge behind a control shell that stopped answering while `guest` ran a command: the
    outermost guest that does not answer froze (a frozen L1 silences L2); it is stopped now."""
    frozen = next((g for g in reversed(guest.chain()[1:]) if g.channel.answers(g.silence_limit) is False), guest)
    stall, _ = frozen.console.scan_stall(frozen._stall_scan)  # what it printed before it went silent
    if stall is not None:
        wedged = frozen.mark_wedged(stall)
    else:
        wedged = frozen.mark_wedged(str(silent) if frozen is guest else f"{frozen.name} does not answer either",
                                    stall="no answer")
    frozen.close(keep_files=True)
    return wedged


def evidence_of(guest: Guest) -> Evidence:
    """What forensics may read of `guest` without asking its QEMU or its shell anything."""
    return Evidence(guest.level, guest.name, guest.console, console_start=guest.console_start,
                    console_ready=guest.console_ready, emulated=guest.emulated, wedged=guest.wedged,
                    channel_trouble=guest.channel_trouble, boots=guest.boots, boot_timeout=guest.boot_timeout,
                    process="xl create" if guest.spec.domu else "QEMU")


def mark(guests: Mapping[int, Guest], number: int, tag_kernel_log: bool) -> dict[int, ConsoleMark]:
    """Where each running guest stands now: a test's trouble is what comes after."""
    return {
        level: ConsoleMark(guest.console.size(), _tag_kernel_log(guest, number) if tag_kernel_log else None)
        for level, guest in guests.items() if guest.alive
    }


def _tag_kernel_log(guest: Guest, number: int) -> str | None:
    """Write a line into the guest's kernel log: what a test added comes after it.

    (A tag, not a timestamp: printk's clock and /proc/uptime drift apart under TCG.)
    """
    tag = f"nestedkvm: test {number} starts"
    try:
        guest.succeed(f"echo '{tag}' > /dev/kmsg")
    except (NestedKvmError, AssertionError):
        return None
    return tag


def trouble_since(guests: Mapping[int, Guest], marks: Mapping[int, ConsoleMark]) -> Trouble | None:
    """The first guest (outermost) that crashed or printed a kernel problem since `marks`.

    Guests are looked at one by one and the first trouble ends the search: a deeper guest is not
    settled or asked anything once an outer one is to blame."""
    for level, at in sorted(marks.items()):
        guest = guests[level]
        if guest.stopped_on_purpose:
            continue  # the test (or the plugin, for nested_fresh) stopped it
        trouble, wedged = forensics.trouble_in(_trouble_evidence(guest), at, [d for d in sorted(marks) if d > level])
        if wedged is not None:
            guest.wedged = wedged  # as mark_wedged: not alive from now on, so the next test gets a fresh one
        if trouble is not None:
            return trouble
    return None


def _trouble_evidence(guest: Guest) -> Evidence:
    """`guest`'s evidence for forensics.trouble_in."""
    alive = guest.alive
    if not alive:
        guest.link.settle_console(guest.level)  # its last words are on their way to the file
    elif guest.emulated:  # a stall line it runs on from is no trouble (Guest.watch_stalls)
        with contextlib.suppress(GuestWedged):
            guest.watch_stalls()
    # How its QEMU ended is asked only of a guest that is down and not taken as wedged: a live one's
    # runs, and a wedged one is judged by its wedge (the plugin stopped its QEMU).
    status = None if alive or guest.wedged is not None else guest.process.exit_status()
    # QEMU's events tell what ended it; they may come a moment after its exit (up to 0.5 s).
    events = tuple(guest.qmp_events(wait=EXIT_EVENTS)) if status is not None else ()
    return replace(evidence_of(guest), alive=alive, exit_status=status, qmp_events=events)


def exit_error(guest: Guest) -> GuestCrashed:
    """The error for a guest whose QEMU is gone: status, console problem, QEMU's last words."""
    return forensics.exit_error(_exit_evidence(guest))


def _exit_evidence(guest: Guest) -> Evidence:
    """How `guest`'s QEMU ended, its console settled first; where it went down with its parent,
    the parent's evidence instead."""
    if guest.process.parent_lost:
        parent = guest.parent
        assert parent is not None
        if parent.process.exit_status() is not None or parent.process.parent_lost:
            told = _exit_evidence(parent)  # gone too: how it ended
        else:
            told = evidence_of(parent)  # runs on: restarted, or its shell broke
        return replace(evidence_of(guest), parent_lost=True, parent=told)
    status = guest.process.exit_status()
    guest.link.settle_console(guest.level)  # its last words are on their way to the file
    return replace(evidence_of(guest), exit_status=status, qemu_output=guest.process.output(forensics.QEMU_LINES))


def boot_error(guest: Guest, exc: NestedKvmError | TimeoutError, deadline: Deadline) -> BootError:
    """Why a boot ended without a ready guest, as a BootError whose `why` callers decide on."""
    tail = guest.console.tail()  # as the boot ended, before any wait below
    if isinstance(exc, ChannelError) and not isinstance(exc, SshError | LoginFailed):
        # A closed channel usually means QEMU is exiting: give it a moment to be reaped.
        with contextlib.suppress(TimeoutError):
            retry("QEMU exit", guest.exited, deadline.share(CLOSE_GRACE), interval=0.1)
    if not isinstance(exc, GuestCrashed) and guest.exited():
        exc = exit_error(guest)  # whatever the wait saw, a QEMU that is gone says why
    output = guest.process.output(forensics.QEMU_LINES)
    return forensics.boot_error(replace(evidence_of(guest), console_tail=tail, qemu_output=output), exc)
