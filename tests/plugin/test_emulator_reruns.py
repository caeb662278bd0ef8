"""--nested-emulator-reruns: a test that an emulator fault ended (a wedge or a reset of emulated
virtualization) runs again on fresh guests, openly; nothing else is rerun.

The session's pool is replaced by a fake one (guests whose console is a file the test writes),
so these check the reporting and the decision, not QEMU: tests/integration provokes real stalls.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CONFTEST = '''
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_nestedkvm.machine import forensics
from pytest_nestedkvm.machine.console import Console
from pytest_nestedkvm.machine.guest import evidence_of
from pytest_nestedkvm.base.errors import BootError
from pytest_nestedkvm.session import SESSION_KEY
from pytest_nestedkvm import reruns_of

BOOTS = Path("boots.txt")  # one word per boot to come: "ok" or "reset"


class Guest:
    level, console_start, console_ready, stopped_on_purpose, channel_trouble = 1, 0, 0, False, None
    name, boots, boot_timeout = "l1", 1, 60.0
    spec = SimpleNamespace(domu=None)  # a KVM guest, not a Xen domU

    def __init__(self):
        self.emulated = not Path("hardware-kvm").exists()
        self.console = Console(Path("console.log"))
        self.console.path.write_text("booted\\n")
        self.wedged = None
        self.link = self

    @property
    def alive(self):
        return self.wedged is None

    def settle_console(self, level):
        pass

    def mark_wedged(self, line):
        self.wedged = forensics.wedge_error(evidence_of(self), line)
        return self.wedged

    def watch_stalls(self):  # a guest that does not answer once it printed a stall
        line = self.console.first_stall(self.console_ready)
        if line is not None and self.wedged is None:
            self.mark_wedged(line)
        if self.wedged is not None:
            raise self.wedged


class Pool:
    def __init__(self):
        self.guests, self.boot_failures = {}, []

    def get(self, level):
        guest = self.guests.get(level)
        if guest is not None and guest.alive:
            return guest
        plan = BOOTS.read_text().split()
        BOOTS.write_text(" ".join(plan[1:]))
        guest = self.guests[level] = Guest()
        if plan and plan[0] == "reset":
            error = BootError("l1 died while booting: QEMU exited with status 0", level=1, why="reset", exit_status=0)
            self.boot_failures.append((guest, error))
            del self.guests[level]
            raise error
        return guest

    def stop_from(self, level):
        self.guests.clear()

    def close(self):
        pass


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    lab = config.stash[SESSION_KEY].lab
    lab.__dict__["pool"] = Pool()
    lab.__dict__["properties"] = []
    lab.unavailable_reason = lambda level: None


def pytest_runtest_logreport(report):
    with open("reports.jsonl", "a") as f:
        f.write(json.dumps([report.when, report.outcome, [t.kind for t in reruns_of(report)]]) + "\\n")
'''

def outcomes(result: pytest.RunResult) -> dict[str, int]:
    """The closing line's counts, without the tests -k left out."""
    return {kind: n for kind, n in result.parseoutcomes().items() if kind != "deselected"}


STALL = "[ 30.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"


@pytest.fixture
def run(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_guest=f"""
        from pathlib import Path

        def test_boots(l1):
            pass

        def test_wedges_once(l1):
            if not Path("wedged-once").exists():
                Path("wedged-once").touch()
                with l1.console.path.open("a") as f:
                    f.write({STALL!r} + "\\n")
                raise TimeoutError("the command never answered")

        def test_fails_for_real(l1):
            assert 1 + 1 == 3
    """)
    return pytester


def test_a_reset_while_booting_reruns_the_test_on_a_fresh_guest(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("reset ok")
    result = run.runpytest("-k", "boots", "--junitxml=junit.xml", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(passed=1, rerun=1)
    result.stdout.fnmatch_lines([
        "test_guest.py R",
        "*test_boots*: L1 reset while booting: l1 died while booting*; running it again on fresh guests (rerun 1 of 1)",
        "*nestedkvm: reruns after emulator faults*",
        "RERUN test_guest.py::test_boots - L1 reset while booting: l1 died while booting: QEMU exited with status 0",
        "*1 passed, 2 deselected, 1 rerun*",
    ])
    properties = {p.get("name"): p.get("value") for p in ET.parse("junit.xml").iter("property")}
    assert properties["nestedkvm_emulator_rerun"].startswith("L1 reset while booting")
    assert [line for line in Path("reports.jsonl").read_text().splitlines()] == [
        '["setup", "rerun", []]', '["setup", "passed", ["reset"]]', '["call", "passed", ["reset"]]',
        '["teardown", "passed", ["reset"]]']


def test_a_wedge_during_the_test_reruns_it_and_names_the_wedge(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("ok ok")
    result = run.runpytest("-k", "wedges", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(passed=1, rerun=1)
    assert (f"RERUN test_guest.py::test_wedges_once - L1 wedged: RCU stall (its virtualization is emulated, so "
            f"this is taken as the emulator's fault): {STALL}" in result.stdout.lines)


def test_a_stall_on_hardware_kvm_is_the_tests_failure_and_never_rerun(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("ok ok")
    Path("hardware-kvm").touch()
    result = run.runpytest("-k", "wedges", "--nested-emulator-reruns=3", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(failed=1)
    assert (f"L1 RCU stall during this test on hardware KVM (possibly the hypervisor under test): {STALL}"
            in result.stdout.lines)
    assert "RERUN" not in result.stdout.str()


def test_the_same_fault_on_the_last_run_fails(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("reset reset reset")
    result = run.runpytest("-k", "boots", "--nested-emulator-reruns=1", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(errors=1, rerun=1)
    assert Path("boots.txt").read_text().split() == ["reset"]  # two boots: the run and one rerun


def test_two_reruns_when_asked(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("reset reset ok")
    result = run.runpytest("-k", "boots", "--nested-emulator-reruns=2", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(passed=1, rerun=2)


def test_no_rerun_with_zero(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("reset ok")
    result = run.runpytest("-k", "boots", "--nested-emulator-reruns=0", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(errors=1)
    assert "RERUN" not in result.stdout.str()


def test_a_real_failure_is_never_rerun(run: pytest.Pytester) -> None:
    Path("boots.txt").write_text("ok ok")
    result = run.runpytest("-k", "for_real", "-p", "no:cacheprovider")
    assert outcomes(result) == dict(failed=1)
    assert "RERUN" not in result.stdout.str()
