"""Unit tests for the channel kinds behind `Channel`: the class per kind, its traits, and AgentChannel
over a fake link whose shells' streams are socketpairs to real local shells."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import PANIC_REPLY, Deadline
from pytest_nestedkvm.base.errors import ChannelError, CommandTimeout, GuestSilent
from pytest_nestedkvm.boot.layout import CHANNEL_NEEDS, REPLY_ROLE, ChannelKind
from pytest_nestedkvm.machine.channel import (
    CHANNELS,
    PANIC,
    AgentChannel,
    Channel,
    ChannelSetup,
    CommandResult,
    SerialChannel,
    SshChannel,
    channel_class,
)


def fine() -> None:
    return None


class ShellLink:
    """The part of a Link that AgentChannel uses: each shell is a local `sh` that reads its commands
    from one socketpair and writes its replies to another, as the built-in guest's shells do."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.asked: list[tuple[str, object]] = []
        self.shells: list[tuple[subprocess.Popen[bytes], socket.socket, socket.socket]] = []
        self.replies: dict[str, socket.socket] = {}

    def stream(self, role: str, deadline: Deadline, check: object) -> socket.socket:
        self.asked.append((role, check))
        if role in self.replies:
            return self.replies.pop(role)
        ours, theirs = socket.socketpair()
        reply_ours, reply_theirs = socket.socketpair()
        process = subprocess.Popen(
            ["/bin/sh"], stdin=theirs.fileno(), stdout=reply_theirs.fileno(), stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(self.tmp_path), "LC_ALL": "C"},
        )
        theirs.close()
        reply_theirs.close()
        self.shells.append((process, ours, reply_ours))
        self.replies[REPLY_ROLE[role]] = reply_ours  # type: ignore[index]
        return ours

    def stop(self) -> None:
        for process, commands, replies in self.shells:
            commands.close()
            replies.close()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[ShellLink]:
    shell_link = ShellLink(tmp_path)
    yield shell_link
    shell_link.stop()


@pytest.fixture
def agent(link: ShellLink) -> AgentChannel:
    channel = AgentChannel(ChannelSetup("l1", link, fine))  # type: ignore[arg-type]
    channel.open(Deadline.after(10))
    return channel


@pytest.mark.parametrize(("kind", "cls"), [("agent", AgentChannel), ("ssh", SshChannel), ("serial", SerialChannel)])
def test_channel_class_maps_each_kind(kind: str, cls: type[Channel]) -> None:
    assert channel_class(kind) is cls  # type: ignore[arg-type]
    assert issubclass(cls, Channel)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(KeyError):
        channel_class("telnet")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "agent_ports", "console_role", "boot_factor"),
    [("agent", True, "console", 1), ("ssh", False, "console", 4), ("serial", False, "serial", 4)],
)
def test_what_each_kind_needs_of_qemu(kind: ChannelKind, agent_ports: bool, console_role: str,
                                      boot_factor: int) -> None:
    needs = CHANNEL_NEEDS[kind]
    assert (needs.agent_ports, needs.console_role, needs.boot_factor) == (agent_ports, console_role, boot_factor)
    assert set(CHANNEL_NEEDS) == set(CHANNELS)  # every kind has its needs and its class


def test_broken_is_not_open_before_open_and_run_refuses(link: ShellLink) -> None:
    channel = AgentChannel(ChannelSetup("l1", link, fine))  # type: ignore[arg-type]
    assert channel.broken == "not open"
    with pytest.raises(ChannelError, match="l1 is not running"):
        channel.run("true", Deadline.after(5))
    with pytest.raises(ChannelError, match="l1 is not running"):
        channel.panic(Deadline.after(5))
    assert link.asked == []


def test_agent_open_connects_cmd_then_ctl_with_the_guests_check(agent: AgentChannel, link: ShellLink) -> None:
    assert link.asked == [("cmd", fine), ("cmd-out", fine), ("ctl", fine), ("ctl-out", fine)]
    assert agent.shell is not None and agent.control is not None
    assert agent.shell.shell_pid == link.shells[0][0].pid
    assert agent.control.shell_pid == link.shells[1][0].pid
    assert agent.control.watchdog is fine
    assert agent.shell.watchdog == agent._watch  # the guest's check, and the heartbeat when set
    assert agent.broken is None


def heartbeat_agent(link: ShellLink, every: float, poke: float | None = None) -> AgentChannel:
    channel = AgentChannel(ChannelSetup("l1", link, fine, heartbeat=every, poke=poke))  # type: ignore[arg-type]
    channel.open(Deadline.after(10))
    return channel


def test_a_long_command_on_a_guest_that_answers_passes_the_heartbeat(link: ShellLink) -> None:
    agent = heartbeat_agent(link, 0.3)
    # the control shell answered meanwhile
    assert agent.run("sleep 1.5; echo done", Deadline.after(10)).stdout == "done\n"


def test_a_guest_whose_control_shell_stops_answering_is_silent_long_before_the_timeout(link: ShellLink) -> None:
    agent = heartbeat_agent(link, 0.5)
    control_pid = link.shells[1][0].pid
    os.kill(control_pid, signal.SIGSTOP)  # as a guest frozen whole: neither shell gets to run
    try:
        with pytest.raises(GuestSilent, match=r"l1: while a command ran, its control shell did not answer `true` "
                                              r"within 0.5 s: the whole guest stopped"):
            agent.run("sleep 30", Deadline.after(60))  # would succeed after 30 s: only the heartbeat raises
        assert not agent.answers(0.5)
    finally:
        os.kill(control_pid, signal.SIGCONT)


def test_the_control_shell_is_asked_every_poke_and_may_take_the_heartbeat_to_answer(link: ShellLink) -> None:
    agent = heartbeat_agent(link, 5.0, poke=0.2)
    assert agent.run("sleep 1.5; echo done", Deadline.after(10)).stdout == "done\n"
    assert 4 <= agent.asked <= 8  # about every 0.2 s, not every 5 s
    control_pid = link.shells[1][0].pid
    os.kill(control_pid, signal.SIGSTOP)
    threading.Timer(1.0, os.kill, (control_pid, signal.SIGCONT)).start()  # slow to answer, within 5 s
    assert agent.run("sleep 2; echo still", Deadline.after(10)).stdout == "still\n"


def test_without_a_heartbeat_a_silent_control_shell_is_not_asked(link: ShellLink) -> None:
    agent = heartbeat_agent(link, None)  # type: ignore[arg-type]
    os.kill(link.shells[1][0].pid, signal.SIGSTOP)
    try:
        assert agent.run("sleep 1; echo done", Deadline.after(10)).stdout == "done\n"
    finally:
        os.kill(link.shells[1][0].pid, signal.SIGCONT)


def test_agent_runs_commands(agent: AgentChannel) -> None:
    result = agent.run("echo out; echo err >&2; exit 3", Deadline.after(5))
    assert isinstance(result, CommandResult)
    assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 3)
    assert agent.run_ok("echo fine", Deadline.after(5)) == "fine\n"
    with pytest.raises(AssertionError, match="expected exit status 0"):
        agent.run_ok("false", Deadline.after(5))


def test_a_timed_out_command_is_killed_through_the_control_shell(
    agent: AgentChannel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert agent.shell is not None and agent.control is not None
    control_commands: list[str] = []
    run = agent.control.run

    def recording_run(command: str, deadline: Deadline) -> CommandResult:
        control_commands.append(command)
        return run(command, deadline)

    monkeypatch.setattr(agent.control, "run", recording_run)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        agent.run("sleep 30", Deadline.after(0.5))
    assert time.monotonic() - started < 8
    assert control_commands == [f"__nk_kill {agent.shell.shell_pid}"]
    assert agent.broken is None
    assert agent.run("echo still here", Deadline.after(5)).stdout == "still here\n"


def test_a_stuck_control_shell_breaks_the_channel_so_the_guest_is_replaced(agent: AgentChannel) -> None:
    """Seen on a hung L1: the kill itself timed out. Both shells are then unusable, and `broken`
    says so, which makes the pool boot a fresh guest for the next test."""
    assert agent.shell is not None and agent.control is not None
    agent.control.shell_pid = None  # as after its own timeout: it cannot be interrupted
    with pytest.raises(CommandTimeout):
        agent.control.run("sleep 30", Deadline.after(0.3))
    with pytest.raises(CommandTimeout, match="could not be stopped"):
        agent.run("sleep 30", Deadline.after(0.3))
    assert agent.broken is not None and "killing it failed" in agent.broken
    with pytest.raises(ChannelError, match="unusable"):
        agent.run("echo after", Deadline.after(5))


def test_panic_goes_through_the_control_shell(agent: AgentChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    # never forwarded: run as root on a real host, sysrq-c would crash it
    sent: list[tuple[str, str, Deadline]] = []
    assert agent.shell is not None and agent.control is not None
    for name, shell in (("shell", agent.shell), ("control", agent.control)):
        monkeypatch.setattr(shell, "run", lambda command, deadline, name=name: sent.append((name, command, deadline)))
    agent.panic(Deadline.after(60))
    assert [(name, command) for name, command, _ in sent] == [("control", PANIC)]
    assert 0 < sent[0][2].remaining() <= PANIC_REPLY  # a share of the caller's deadline, not all of it
    assert PANIC == "echo c > /proc/sysrq-trigger"


def test_panic_without_a_control_shell_uses_the_main_one(agent: AgentChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    assert agent.shell is not None
    monkeypatch.setattr(agent.shell, "run", lambda command, deadline: sent.append(command))
    agent.control = None  # as a serial channel has it
    agent.panic(Deadline.after(60))
    assert sent == [PANIC]


def test_close_resets_the_channel(agent: AgentChannel) -> None:
    agent.close()
    assert (agent.shell, agent.control, agent.ssh_client) == (None, None, None)
    assert agent.broken == "not open"
    with pytest.raises(ChannelError, match="not running"):
        agent.run("true", Deadline.after(5))
