"""Unit tests for forensics.py on fake guests: a real Console on a file, a scripted process and QMP.

The judgements are forensics.py's; the evidence they judge is gathered from the fakes by guest.py
(mark, trouble_since, exit_error, evidence_of), as from a real Guest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_nestedkvm.base.errors import BootError, GuestWedged
from pytest_nestedkvm.machine.console import Console, problem_kind
from pytest_nestedkvm.machine.forensics import (
    ConsoleMark,
    Trouble,
    boot_trouble,
    wedge_error,
)
from pytest_nestedkvm.machine.guest import evidence_of, exit_error, mark, trouble_since
from pytest_nestedkvm.trouble import REPORT_ATTRIBUTE, RERUNS_ATTRIBUTE, TROUBLE_KEY, reruns_of, trouble_of

PANIC = "[    5.1] Kernel panic - not syncing: sysrq triggered crash"
WARN = "[    3.0] WARNING: CPU: 0 PID: 1 at arch/x86/kvm/vmx/nested.c:42 nested_vmx_run+0x1/0x2"


@dataclass
class FakeProcess:
    status: int | None = None
    parent_lost: bool = False
    said: str = ""

    def exit_status(self) -> int | None:
        return self.status

    def output(self, lines: int) -> str:
        return self.said


@dataclass
class FakeLink:
    """A guest's link as forensics uses it: settling the console writes what was still on its way."""

    console: Path
    pending: str = ""  # printed by the guest, not yet in the console file
    settled: list[int] = field(default_factory=list)

    def settle_console(self, level: int) -> None:
        self.settled.append(level)
        with self.console.open("a") as f:
            f.write(self.pending)
        self.pending = ""


@dataclass
class FakeGuest:
    """The attributes forensics reads of a Guest."""

    level: int
    console: Console
    process: FakeProcess = field(default_factory=FakeProcess)
    channel_trouble: str | None = None
    parent: FakeGuest | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped_on_purpose: bool = False
    console_start: int = 0
    console_ready: int = 0
    boots: int = 1
    boot_timeout: float = 60.0
    commands: list[str] = field(default_factory=list)
    refuse: bool = False
    emulated: bool = False
    wedged: Any = None
    runs_on: bool = False  # answers its control shell after a stall line
    spec: Any = field(default_factory=lambda: SimpleNamespace(domu=None))  # a Xen domU: domu is set
    link: FakeLink = field(init=False)

    def __post_init__(self) -> None:
        self.link = FakeLink(self.console.path)

    @property
    def name(self) -> str:
        return f"l{self.level}"

    @property
    def alive(self) -> bool:
        return (self.channel_trouble is None and self.wedged is None and not self.process.parent_lost
                and self.process.status is None)

    def mark_wedged(self, line: str, stall: str | None = None) -> GuestWedged:
        self.wedged = wedge_error(evidence_of(self), line, stall)  # type: ignore[arg-type]
        return self.wedged

    def watch_stalls(self) -> None:
        line = self.console.first_stall(self.console_ready)
        if line is not None and self.wedged is None and not self.runs_on:
            self.mark_wedged(line)
        if self.wedged is not None:
            raise self.wedged

    def qmp_events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        return self.events

    def succeed(self, command: str, timeout: float | None = None) -> str:
        if self.refuse:
            raise AssertionError("exited 1")
        self.commands.append(command)
        return ""

    def print(self, *lines: str) -> None:
        with self.console.path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))


@pytest.fixture
def make(tmp_path: Path) -> Any:
    def guest(level: int = 1, *lines: str, **attributes: Any) -> FakeGuest:
        path = tmp_path / f"l{level}.log"
        path.write_text("".join(line + "\n" for line in ["booting", *lines]))
        return FakeGuest(level, Console(path), **attributes)

    return guest


def marked(*guests: FakeGuest) -> tuple[dict[int, Any], dict[int, ConsoleMark]]:
    by_level: dict[int, Any] = {g.level: g for g in guests}
    return by_level, mark(by_level, 1, False)


@pytest.mark.parametrize(
    ("line", "kind"),
    [(PANIC, "kernel panic"), ("Oops: 0002 [#1] PREEMPT SMP", "kernel oops"),
     ("BUG: kernel NULL pointer dereference, address: 0", "kernel BUG"),
     ("general protection fault, probably for non-canonical address", "kernel oops"),
     (WARN, "kernel WARN"), ("something odd", "kernel problem"),
     ("(XEN) Panic on CPU 0:", "hypervisor panic"),
     ("(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.", "hypervisor panic")],
)
def test_problem_kind_of_each_console_line(line: str, kind: str) -> None:
    assert problem_kind(line) == kind


def test_mark_records_console_size_of_live_guests_only(make: Any) -> None:
    l1, l2 = make(1, "ready"), make(2, process=FakeProcess(status=0))
    assert mark({1: l1, 2: l2}, 3, False) == {1: ConsoleMark(l1.console.size(), None)}
    assert mark({1: l1}, 3, True)[1].kernel_log_tag == "nestedkvm: test 3 starts"
    assert l1.commands == ["echo 'nestedkvm: test 3 starts' > /dev/kmsg"]
    l1.refuse = True
    assert mark({1: l1}, 4, True)[1].kernel_log_tag is None


def test_panic_after_the_mark_is_the_tests_trouble(make: Any) -> None:
    guest = make(1, "ready")
    guests, marks = marked(guest)
    guest.print("$ running the test", PANIC)
    guest.process.status = 0
    trouble = trouble_since(guests, marks)
    assert trouble == Trouble(1, "kernel panic", f"L1 kernel panic during this test: {PANIC.strip()}",
                              f"$ running the test\n{PANIC}\n")


def test_nothing_new_is_no_trouble(make: Any) -> None:
    guest = make(1, "ready")
    guests, marks = marked(guest)
    guest.print("all quiet")
    assert trouble_since(guests, marks) is None


def test_a_problem_before_the_mark_is_ignored(make: Any) -> None:
    guest = make(1, WARN)
    guests, marks = marked(guest)
    assert trouble_since(guests, marks) is None


def test_a_problem_before_a_reboot_was_ready_is_ignored(make: Any) -> None:
    guest = make(1)
    guests, marks = marked(guest)
    guest.print("rebooting", WARN)  # the test rebooted the guest; its boot judges this
    guest.console_ready = guest.console.size()
    assert trouble_since(guests, marks) is None


def test_a_guest_stopped_on_purpose_is_ignored(make: Any) -> None:
    guest = make(1)
    guests, marks = marked(guest)
    guest.print(PANIC)
    guest.process.status, guest.stopped_on_purpose = 0, True
    assert trouble_since(guests, marks) is None


@pytest.mark.parametrize(
    ("events", "kind", "source"),
    [([{"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}, {"event": "GUEST_PANICKED"}],
      "kernel panic", "QMP GUEST_PANICKED"),
     ([{"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}}], "shut down",
      "QMP SHUTDOWN, reason guest-shutdown")],
)
def test_dead_qemu_without_console_problem_is_told_by_qmp_events(
    make: Any, events: list[dict[str, Any]], kind: str, source: str,
) -> None:
    guest = make(1, events=events)
    guests, marks = marked(guest)
    guest.process.status = 0
    trouble = trouble_since(guests, marks)
    assert trouble is not None
    assert (trouble.kind, trouble.headline) == (kind, f"L1 {kind} during this test ({source}; QEMU exit status 0)")


def test_a_dead_guests_console_is_settled_before_it_is_judged(make: Any) -> None:
    guest = make(1, "ready")
    guests, marks = marked(guest)
    guest.link.pending = f"$ running the test\n{PANIC}\n"  # its last words, still on their way
    guest.process.status = 0
    trouble = trouble_since(guests, marks)
    assert guest.link.settled == [1]
    assert trouble is not None and trouble.kind == "kernel panic"
    assert trouble.console == f"$ running the test\n{PANIC}\n"


def test_a_live_guests_console_is_not_waited_for(make: Any) -> None:
    guest = make(1, "ready")
    guests, marks = marked(guest)
    guest.link.pending = PANIC + "\n"
    assert trouble_since(guests, marks) is None
    assert guest.link.settled == []


def test_a_dead_deeper_guest_settles_its_own_level(make: Any) -> None:
    l1, l2 = make(1), make(2)
    guests, marks = marked(l1, l2)
    l2.process.status = 0
    l2.link.pending = PANIC + "\n"
    trouble = trouble_since(guests, marks)
    assert (l1.link.settled, l2.link.settled) == ([], [2])  # L1 runs on: nothing to wait for
    assert trouble is not None and (trouble.level, trouble.kind) == (2, "kernel panic")


def test_dead_qemu_with_nothing_else_to_go_on_reports_its_exit_status(make: Any) -> None:
    guest = make(1)
    guests, marks = marked(guest)
    guest.process.status = 1
    trouble = trouble_since(guests, marks)
    assert trouble is not None and trouble.kind == "qemu exited"
    assert trouble.headline == "L1 QEMU exited with status 1 during this test (no panic on its console)"


def test_a_domu_that_ended_names_xl_not_qemu(make: Any) -> None:
    """A Xen domU's process is `xl create -F` in dom0: its exit is xl's, whatever its device model did."""
    guest = make(2, spec=SimpleNamespace(domu=object()))
    guests, marks = marked(guest)
    guest.process.status = 0
    trouble = trouble_since(guests, marks)
    assert trouble is not None and trouble.headline == (
        "L2 xl create exited with status 0 during this test (no panic on its console)")
    assert str(exit_error(guest)).startswith("l2 xl create exited with status 0 (no kernel panic")


def test_a_running_guest_whose_shell_broke_is_unresponsive(make: Any) -> None:
    guest = make(1)
    guests, marks = marked(guest)
    guest.channel_trouble = "the guest closed the connection"
    trouble = trouble_since(guests, marks)
    assert trouble is not None and trouble.kind == "unresponsive"
    assert trouble.headline == "L1 stopped answering during this test: the guest closed the connection"


def test_the_outermost_guest_is_blamed_and_deeper_ones_went_down_with_it(make: Any) -> None:
    l1, l2 = make(1), make(2)
    l2.parent = l1
    guests, marks = marked(l1, l2)
    l2.print(WARN)
    l1.print(PANIC)
    l1.process.status = 0
    l2.process.parent_lost = True
    trouble = trouble_since(guests, marks)
    assert trouble is not None and trouble.level == 1
    assert trouble.headline == f"L1 kernel panic during this test: {PANIC.strip()}; L2 went down with it"


def test_a_deeper_guests_problem_is_blamed_when_its_parent_is_fine(make: Any) -> None:
    l1, l2 = make(1), make(2)
    guests, marks = marked(l1, l2)
    l2.print(WARN)
    trouble = trouble_since(guests, marks)
    assert trouble is not None
    assert (trouble.level, trouble.kind) == (2, "kernel WARN")
    assert "went down" not in trouble.headline  # L2's QEMU still runs


# -- the public record -------------------------------------------------------------------------

TROUBLE = Trouble(2, "kernel oops", "L2 kernel oops during this test: Oops: 0002", "Oops: 0002\n")


def test_trouble_round_trips_through_a_report() -> None:
    report = pytest.TestReport("t.py::test", ("t.py", 0, "test"), {}, "failed", None, "call")
    assert trouble_of(report) is None
    setattr(report, REPORT_ATTRIBUTE, TROUBLE.as_dict())
    assert TROUBLE.as_dict() == {"level": 2, "kind": "kernel oops", "headline": TROUBLE.headline,
                                 "console": "Oops: 0002\n", "emulated": False}
    assert trouble_of(report) == TROUBLE


def test_trouble_of_an_item_reads_its_stash(request: pytest.FixtureRequest) -> None:
    item = request.node
    assert isinstance(item, pytest.Item)
    assert trouble_of(item) is None
    item.stash[TROUBLE_KEY] = TROUBLE
    assert trouble_of(item) is TROUBLE


# -- exit_error --------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "panicked", "what"), [
    (PANIC, True, f"kernel panic: {PANIC}"), (WARN, False, f"kernel WARN: {WARN}"),
    ("clean", False, "no kernel panic on the console"),
])
def test_exit_error_fields(make: Any, line: str, panicked: bool, what: str) -> None:
    guest = make(1, line, process=FakeProcess(status=137, said="qemu-system-x86_64: terminating on signal 9"))
    error = exit_error(guest)
    assert (error.level, error.exit_status, error.panicked, error.parent_down) == (1, 137, panicked, False)
    assert str(error).startswith(f"l1 QEMU exited with status 137 ({what})")
    assert "QEMU said:\nqemu-system-x86_64: terminating on signal 9" in str(error)
    assert str(error).endswith(f"last console lines:\nbooting\n{line}")


def test_exit_error_settles_the_console_first(make: Any) -> None:
    guest = make(1, process=FakeProcess(status=0))
    guest.link.pending = PANIC + "\n"
    error = exit_error(guest)
    assert guest.link.settled == [1]
    assert error.panicked
    assert str(error).endswith(f"last console lines:\nbooting\n{PANIC}")


def test_exit_error_of_a_xen_l1_whose_dom0_crashed_is_a_hypervisor_panic(make: Any) -> None:
    """Xen reboots after dom0 crashed under it: QEMU exits 0 with no kernel panic line, not a reset."""
    line = "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds."
    error = exit_error(make(1, line, process=FakeProcess(status=0)))
    assert error.panicked
    assert str(error).splitlines()[0] == f"l1 QEMU exited with status 0 (hypervisor panic: {line})"


def test_exit_error_sees_a_panic_after_an_earlier_warning(make: Any) -> None:
    """Every L2 boots with an xstate WARN under nested TCG SVM: the panic after it is what ended it."""
    guest = make(1, f"{WARN}\n{PANIC}", process=FakeProcess(status=0))
    error = exit_error(guest)
    assert error.panicked
    assert str(error).splitlines()[0] == f"l1 QEMU exited with status 0 (kernel panic: {PANIC})"


def test_exit_error_ignores_problems_of_an_earlier_boot(make: Any) -> None:
    guest = make(1, PANIC, process=FakeProcess(status=0))
    guest.console_start = guest.console.size()
    error = exit_error(guest)
    assert not error.panicked
    assert "(no kernel panic on the console)" in str(error)


@pytest.mark.parametrize(
    ("parent_state", "why"),
    [({"process": FakeProcess(status=137)}, "l1 QEMU exited with status 137"),
     ({"channel_trouble": "the guest closed the connection"}, "the guest closed the connection"),
     ({"boots": 2}, "l1 was restarted (boot 2)")],
)
def test_exit_error_of_a_guest_whose_parent_went_down(make: Any, parent_state: dict[str, Any], why: str) -> None:
    parent = make(1, **parent_state)
    guest = make(2, process=FakeProcess(parent_lost=True), parent=parent)
    error = exit_error(guest)
    assert (error.level, error.exit_status, error.parent_down, error.panicked) == (2, None, True, False)
    assert str(error).startswith(f"l2 went down with its parent: {why}")



# -- stalls: wedged on emulated virtualization, a kernel stall on hardware KVM ------------------

RCU_STALL = "[   24.101] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
KVM_TRACE = ["[   24.102]  svm_vcpu_run+0x2d5/0x6a0 [kvm_amd]",
             "[   24.103]  kvm_arch_vcpu_ioctl_run+0x1c0/0x5e0 [kvm]"]
SOFT_LOCKUP = "[   48.000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:120]"


def test_a_stall_on_emulated_virtualization_wedges_the_guest(make: Any) -> None:
    guest = make(1, "ready", emulated=True)
    guests, marks = marked(guest)
    guest.print("$ ./set_sregs_test", RCU_STALL, *KVM_TRACE)
    trouble = trouble_since(guests, marks)
    assert trouble is not None
    assert (trouble.level, trouble.kind, trouble.emulated, trouble.emulator_fault) == (1, "wedged", True, True)
    assert trouble.headline.startswith("L1 wedged: RCU stall while its KVM guest ran (its virtualization is emulated")
    assert trouble.headline.endswith(RCU_STALL)
    assert not guest.alive and guest.wedged.stall == "RCU stall"  # the next test gets a fresh guest


def test_a_stall_an_emulated_guest_runs_on_from_is_no_trouble(make: Any) -> None:
    # Under TCG a stall line often only means the emulator held back the timer for a while.
    guest = make(1, "ready", emulated=True, runs_on=True)
    guests, marks = marked(guest)
    guest.print("$ ./set_sregs_test", SOFT_LOCKUP, *KVM_TRACE)
    assert trouble_since(guests, marks) is None
    assert guest.alive


def test_a_stall_is_named_before_the_bug_line_it_also_is(make: Any) -> None:
    guest = make(1, "ready", emulated=True)
    guests, marks = marked(guest)
    guest.print(SOFT_LOCKUP, "[   48.001]  lkdtm_SOFTLOCKUP+0x10/0x20")
    trouble = trouble_since(guests, marks)
    assert trouble is not None and trouble.kind == "wedged"
    assert trouble.headline.startswith("L1 wedged: soft lockup (its")  # no KVM in the report


def test_the_same_stall_on_hardware_kvm_is_a_kernel_stall_and_no_emulator_fault(make: Any) -> None:
    guest = make(1, "ready")
    guests, marks = marked(guest)
    guest.print(RCU_STALL, *KVM_TRACE)
    trouble = trouble_since(guests, marks)
    assert trouble is not None
    assert (trouble.kind, trouble.emulator_fault) == ("kernel stall", False)
    assert "possibly the hypervisor under test" in trouble.headline
    assert guest.wedged is None and guest.alive


def test_an_outer_wedge_is_blamed_before_the_stall_it_causes_deeper(make: Any) -> None:
    l1, l2 = make(1, "ready", emulated=True), make(2, "ready", emulated=True)
    guests, marks = marked(l1, l2)
    l2.print("[ 30.0] rcu: INFO: rcu_sched self-detected stall on CPU")
    l1.print(SOFT_LOCKUP)
    trouble = trouble_since(guests, marks)
    assert trouble is not None and (trouble.level, trouble.kind) == (1, "wedged")


@pytest.mark.parametrize(
    ("events", "kind", "fault"),
    [([{"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}], "reset", True),
     ([{"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}}], "shut down", False),
     ([{"event": "GUEST_PANICKED"}, {"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}], "kernel panic", False)],
)
def test_a_reset_without_a_panic_is_an_emulator_fault_where_emulated(
    make: Any, events: list[dict[str, Any]], kind: str, fault: bool,
) -> None:
    guest = make(1, "ready", emulated=True)
    guests, marks = marked(guest)
    guest.process.status = 0
    guest.events = events
    trouble = trouble_since(guests, marks)
    assert trouble is not None and (trouble.kind, trouble.emulator_fault) == (kind, fault)


@pytest.mark.parametrize(
    ("why", "panicked", "kind", "fault"),
    [("reset", False, "reset", True), ("wedged", False, "wedged", True), ("timeout", False, "wedged", True),
     ("crashed", True, "kernel panic", False), ("crashed", False, "qemu exited", False)],
)
def test_boot_trouble(make: Any, why: Any, panicked: bool, kind: str, fault: bool) -> None:
    guest = make(2, "booting on", emulated=True)
    error = BootError("l2 died while booting: x\nmore", level=2, why=why, panicked=panicked)
    trouble = boot_trouble(evidence_of(guest), error)
    assert (trouble.level, trouble.kind, trouble.emulator_fault) == (2, kind, fault)
    assert trouble.headline == f"L2 {kind} while booting: l2 died while booting: x"
    assert "booting on" in trouble.console


def test_nothing_is_an_emulator_fault_on_hardware_kvm(make: Any) -> None:
    guest = make(2, "booting on")
    assert not boot_trouble(evidence_of(guest), BootError("l2 reset", level=2, why="reset")).emulator_fault


def test_reruns_travel_on_a_report() -> None:
    report = pytest.TestReport("t.py::test", ("t.py", 0, "test"), {}, "passed", None, "call")
    assert reruns_of(report) == []
    wedged = Trouble(1, "wedged", "L1 wedged: RCU stall", "console", emulated=True)
    setattr(report, RERUNS_ATTRIBUTE, [wedged.as_dict()])
    assert reruns_of(report) == [wedged]


def test_a_guest_that_stopped_answering_is_wedged_where_emulated_and_unresponsive_on_hardware(make: Any) -> None:
    for emulated, kind in ((True, "wedged"), (False, "unresponsive")):
        guest = make(1, "ready", emulated=emulated)
        guests, marks = marked(guest)
        guest.channel_trouble = "'x' timed out and killing it failed"
        trouble = trouble_since(guests, marks)
        assert trouble is not None and (trouble.kind, trouble.emulator_fault) == (kind, emulated)


def test_a_guest_found_silent_during_a_command_is_the_tests_wedge_after_its_qemu_was_stopped(make: Any) -> None:
    guest = make(1, "ready", emulated=True)
    guests, marks = marked(guest)
    guest.mark_wedged("l1: a command ran for 30 s and then its control shell did not answer", stall="no answer")
    guest.process.status = -9  # stopped by the plugin: no stall line, no panic on its console
    trouble = trouble_since(guests, marks)
    assert trouble is not None and (trouble.kind, trouble.emulator_fault) == ("wedged", True)
    assert trouble.headline.startswith("L1 wedged: no answer (its virtualization is emulated")
