"""XTF's verdicts as the items report them, from xtf-runner's exit status and the logged console."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_nestedkvm.suites import xtf
from pytest_nestedkvm.suites.kut import SuiteResult

EXAMPLE = """Using logfile '/var/log/xen/console/guest-test-hvm64-example.log'
Executing 'xl create -F tests/example/test-hvm64-example.cfg'
--- Xen Test Framework ---
Environment: HVM 64bit (Long mode 4 levels)
Hello World
Test result: {result}

Combined test results:
test-hvm64-example                       {result}
"""


@pytest.mark.parametrize(("status", "result", "verdict", "message"), [
    (0, "SUCCESS", "passed", "SUCCESS test-hvm64-example"),
    (3, "SKIP", "skipped", "SKIP test-hvm64-example: Hello World"),
    (5, "FAILURE", "failed", "FAILURE test-hvm64-example: Hello World"),
    (4, "ERROR", "failed", "ERROR test-hvm64-example: Hello World"),
])
def test_the_runners_status_is_the_verdict_and_the_tests_last_words_its_reason(
    status: int, result: str, verdict: str, message: str,
) -> None:
    assert xtf.outcome("test-hvm64-example", status, EXAMPLE.format(result=result)) == SuiteResult(verdict, message)


def test_a_reason_wrapped_over_two_lines_is_read_whole() -> None:
    """XTF's arch setup prints the first half of its skip reason and skips with the second."""
    log = ("--- Xen Test Framework ---\nEnvironment: HVM 32bit (No paging)\n"
           "FEP unavailable, but needed by test. (Is Xen support\ncompiled in, and booted with 'hvm_fep'?)\n"
           "Test result: SKIP\n")
    assert xtf.outcome("test-hvm32-xsa-123", 3, log).message == (
        "SKIP test-hvm32-xsa-123: FEP unavailable, but needed by test. (Is Xen support compiled in, and booted "
        "with 'hvm_fep'?)")


def test_a_skip_before_the_test_ran_names_the_missing_virtualization() -> None:
    done = xtf.outcome("test-hvm64-example", 3, "Combined test results:\ntest-hvm64-example  SKIP\n")
    assert done == SuiteResult("skipped", "SKIP test-hvm64-example: Xen lacks the virtualization this "
                                   "environment needs (xl info virt_caps)")


def test_a_panic_and_a_failed_check_are_named_in_the_message() -> None:
    panic = ("--- Xen Test Framework ---\nEnvironment: PV 64bit (Long mode 4 levels)\nXSA-213 PoC\n"
             "******************************\nPANIC: Unhandled exception at e033:0000000000104007\n"
             "Vec 13 #GP[IDT[66]]\n******************************\nCombined test results:\n"
             "test-pv64-xsa-213                        CRASH\n")
    assert xtf.outcome("test-pv64-xsa-213", 6, panic).message == (
        "CRASH test-pv64-xsa-213: PANIC: Unhandled exception at e033:0000000000104007 Vec 13 #GP[IDT[66]]")
    checks = ("Test cpl0: all perms ok\n  Testing int3\n"
              "    Fail (Force-, Addr-): expected #NP[IDT[3]] fault, got #NP[IDT[6]] fault\n"
              "  Testing icebp\n    Fail (Force-, Addr-): expected #DB trap, got #UD fault\n  Testing into\n"
              "Test result: FAILURE\n")
    assert xtf.outcome("test-hvm64-swint-emulation", 5, checks).message == (
        "FAILURE test-hvm64-swint-emulation: Fail (Force-, Addr-): expected #NP[IDT[3]] fault, got #NP[IDT[6]] "
        "fault (first of 2 'Fail' lines)")


def test_a_crash_and_a_runner_error_fail_with_what_happened() -> None:
    assert xtf.outcome("test-pv64-example", 6, "--- Xen Test Framework ---\n").message == (
        "CRASH test-pv64-example (no 'Test result:' line: the domain crashed or was destroyed)")
    assert xtf.outcome("test-pv64-example", 1, "RunnerError: Failed to run test\n").message == (
        "FAIL test-pv64-example (xtf-runner exited with status 1: RunnerError: Failed to run test)")


def test_the_command_runs_the_instance_from_the_tree_and_destroys_its_domain() -> None:
    assert xtf.guest_command(Path("/cache/xtf"), "test-hvm64-invlpg~hap") == (
        "cd /cache/xtf && python3 ./xtf-runner --results-mode=logfile 'test-hvm64-invlpg~hap'; "
        "s=$?; xl destroy 'test-hvm64-invlpg~hap' >/dev/null 2>&1; exit $s")
