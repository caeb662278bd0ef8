"""Unit tests for Guest's waits on a fake clock: a real Guest whose channel is a stand-in whose
commands take fake seconds, and a nested QEMU's start on a stand-in parent (no QEMU, no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_nestedkvm.base import deadline as deadline_module
from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.base.errors import CommandFailed, CommandTimeout, GuestWedged
from pytest_nestedkvm.boot.qemu import GuestSpec
from pytest_nestedkvm.machine.channel import CommandResult
from pytest_nestedkvm.machine.guest import Guest, check_timer
from pytest_nestedkvm.machine.process import QEMU_ENV, ProcessInGuest

EPSILON = 0.01  # the fake clock is exact; this only absorbs float rounding


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(deadline_module, "monotonic", fake.monotonic)
    monkeypatch.setattr(deadline_module, "sleep", fake.sleep)
    return fake


class SlowChannel:
    """Each command takes `seconds` on the fake clock and exits `statuses` in turn (the last one
    from then on); one that would end past its deadline times out at the deadline, as the real
    channel's does."""

    broken = None

    def __init__(self, clock: FakeClock, seconds: float, *statuses: int) -> None:
        self.clock, self.seconds, self.statuses = clock, seconds, list(statuses)
        self.tries: list[float] = []  # when each try began

    def run(self, command: str, deadline: Deadline) -> CommandResult:
        self.tries.append(self.clock.now)
        if deadline.remaining() < self.seconds:
            self.clock.now = max(self.clock.now, deadline.at)
            raise CommandTimeout(f"timed out after {deadline.budget:g} s", command=command,
                                 timeout=deadline.budget, stdout=b"", stderr=b"")
        self.clock.now += self.seconds
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return CommandResult(command, status, f"try {len(self.tries)}\n", "", self.seconds)


@dataclass
class FakeLink:
    console_path: Path


def guest_with(tmp_path: Path, channel: SlowChannel, level: int = 1) -> Guest:
    spec = GuestSpec(level=level, qemu="qemu-system-x86_64", accel="kvm", cpu="host", memory_mib=256, smp=1)
    guest = Guest(spec, FakeLink(tmp_path / "console.log"), None, [],  # type: ignore[arg-type]
                  boot_timeout=60, command_timeout=600)
    guest.channel = channel  # type: ignore[assignment]
    return guest


@pytest.mark.parametrize("seconds", [3.0, 8.0])
def test_wait_until_succeeds_ends_at_its_timeout(tmp_path: Path, clock: FakeClock, seconds: float) -> None:
    """Before issue 20 each try got the whole timeout: 8 s tries in a 10 s wait took 16.2 s."""
    channel = SlowChannel(clock, seconds, 1)
    guest = guest_with(tmp_path, channel)
    started = clock.now
    with pytest.raises(CommandFailed) as caught:
        guest.wait_until_succeeds("test -e /ready", 10)
    assert clock.now - started <= 10 + EPSILON
    assert len(channel.tries) >= 2
    assert "exited 1, still failing after 10 s; the try after it was cut off" in str(caught.value)
    assert isinstance(caught.value.__cause__, CommandTimeout)


def test_wait_until_succeeds_returns_the_stdout_of_the_first_success(tmp_path: Path, clock: FakeClock) -> None:
    channel = SlowChannel(clock, 2.0, 1, 1, 0)
    assert guest_with(tmp_path, channel).wait_until_succeeds("test -e /ready", 10) == "try 3\n"
    assert len(channel.tries) == 3


def test_wait_until_succeeds_starts_no_try_once_the_time_is_up(tmp_path: Path, clock: FakeClock) -> None:
    """A failing command that fits: the last look comes at the timeout, and runs nothing."""
    channel = SlowChannel(clock, 1.0, 1)
    guest = guest_with(tmp_path, channel)
    started = clock.now
    with pytest.raises(CommandFailed, match=r"still failing after 2\.3 s\nstdout"):
        guest.wait_until_succeeds("false", 2.3)  # tries at 0 and 1.2; the look at 2.3 runs nothing
    assert channel.tries == pytest.approx([started, started + 1.2])
    assert clock.now - started <= 2.3 + EPSILON


def test_a_command_that_never_finishes_a_try_times_out(tmp_path: Path, clock: FakeClock) -> None:
    channel = SlowChannel(clock, 30.0, 0)
    started = clock.now
    with pytest.raises(CommandTimeout, match="timed out after 5 s"):
        guest_with(tmp_path, channel).wait_until_succeeds("sleep 30", 5)
    assert clock.now - started <= 5 + EPSILON


class RecordingParent:
    """The parent Guest as ProcessInGuest.start uses it: the commands it was asked to run, with their timeouts."""

    command_timeout = 120.0
    boots = 1

    def __init__(self) -> None:
        self.asked: list[tuple[str, float | None]] = []

    def succeed(self, command: str, timeout: float | None = None) -> str:
        self.asked.append((command, timeout))
        return ""


def test_a_nested_qemu_start_counts_against_the_childs_boot_budget(clock: FakeClock) -> None:
    """Before issue 20 the start command ran with the parent's command timeout (None here)."""
    parent = RecordingParent()
    boot = Deadline.after(900)
    clock.now += 700  # most of L2's boot budget is gone (say, L1 booted first)
    ProcessInGuest(parent, "/run/nk/l2").start(["qemu-system-x86_64", "-S"], QEMU_ENV, boot)  # type: ignore[arg-type]
    [(command, timeout)] = parent.asked
    assert "qemu-system-x86_64 -S" in command
    assert timeout == pytest.approx(200)


def test_a_parent_without_the_built_in_init_is_prepared_once_per_boot(clock: FakeClock) -> None:
    parent = RecordingParent()
    prepared: list[float] = []
    process = ProcessInGuest(parent, "/run/nk/l2", prepare=lambda deadline: prepared.append(deadline.remaining()))
    boot = Deadline.after(300)
    process.start(["qemu-system-x86_64"], QEMU_ENV, boot)  # type: ignore[arg-type]
    process.start(["qemu-system-x86_64"], QEMU_ENV, boot)  # L2 again in the same boot of L1: nothing to redo
    parent.boots = 2
    process.start(["qemu-system-x86_64"], QEMU_ENV, boot)
    assert prepared == [pytest.approx(300)] * 2


class AnsweringChannel:
    """A channel whose control shell is idle and answers every question."""

    broken = None
    control = type("Control", (), {"busy": False})()

    def __init__(self) -> None:
        self.asked = 0

    def answers(self, limit: float) -> bool:
        self.asked += 1
        return True


@pytest.mark.parametrize(("accel", "wedged"), [("tcg", False), ("kvm", True)])
def test_a_stall_line_is_forgiven_only_on_tcg(tmp_path: Path, accel: str, wedged: bool) -> None:
    """TCG's lost timer interrupt comes back with the next interrupt, so a TCG guest that still
    answers goes on; a KVM guest on emulated SVM kept its timer lost while answering (CI, 2026-12-05)."""
    spec = GuestSpec(level=2, qemu="qemu-system-x86_64", accel=accel, cpu="host", memory_mib=256, smp=1)
    console = tmp_path / "console.log"
    console.write_text("[   52.865547] watchdog: BUG: soft lockup - CPU#0 stuck for 49s! [swapper/0:0]\n")
    guest = Guest(spec, FakeLink(console), None, [], boot_timeout=60, command_timeout=600,  # type: ignore[arg-type]
                  emulated=True)
    guest.channel = channel = AnsweringChannel()  # type: ignore[assignment]
    if wedged:
        with pytest.raises(GuestWedged, match="soft lockup"):
            guest.watch_stalls()
        assert channel.asked == 0 and not guest.alive
    else:
        guest.watch_stalls()
        assert channel.asked == 1 and guest.wedged is None


@pytest.mark.parametrize(("seconds", "wedged"), [(0.2, False), (3600.0, True)])
def test_a_kvm_guest_on_emulated_svm_that_cannot_sleep_is_wedged(
    tmp_path: Path, clock: FakeClock, seconds: float, wedged: bool,
) -> None:
    """Its commands come with interrupts of their own, so only a sleep shows a lost timer."""
    channel = SlowChannel(clock, seconds, 0)
    guest = guest_with(tmp_path, channel)  # a KVM guest...
    guest.emulated = True  # ...on emulated SVM
    (tmp_path / "console.log").write_bytes(b"")
    deadline = Deadline.after(60)
    if wedged:
        with pytest.raises(GuestWedged, match=r"L1 wedged: lost timer .*`sleep 0.1` did not return within 15 s"):
            check_timer(guest, deadline)
        assert not guest.alive and clock.now == pytest.approx(1015.0)
    else:
        check_timer(guest, deadline)
        assert guest.wedged is None and channel.tries == [1000.0]


def test_a_lost_timer_names_the_parents_kvm_when_its_console_shows_why(tmp_path: Path, clock: FakeClock) -> None:
    parent = guest_with(tmp_path / "l1", SlowChannel(clock, 0.1, 0))
    (tmp_path / "l1").mkdir()
    (tmp_path / "l1" / "console.log").write_text("[    3.06] user requested TSC rate below hardware speed\n")
    guest = guest_with(tmp_path, SlowChannel(clock, 3600.0, 0), level=2)
    guest.emulated, guest.parent = True, parent
    with pytest.raises(GuestWedged, match=r"^L2 wedged: lost timer .*within 15 s of its boot; L1's KVM gave it no "
                                          r"TSC rate \(`user requested TSC rate below hardware speed` on L1's"):
        check_timer(guest, Deadline.after(60))
