"""Crash safety with real guests: blame the test, come back pristine, leave no QEMU behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

pytestmark = [pytest.mark.nested(level=1), pytest.mark.usefixtures("no_qemu_left")]


def test_l1_crash_fails_that_test_only_and_the_next_test_gets_a_pristine_l1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_a_leaves_a_mark(l1):
            l1.succeed("echo dirty > /tmp/mark")

        def test_b_crashes_l1(l1):
            l1.crash()

        def test_c_runs_on_a_fresh_l1(l1):
            assert l1.alive
            l1.fail("test -e /tmp/mark")
            assert l1.succeed("echo fine") == "fine\\n"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "test_b_crashes_l1 - L1 kernel panic during this test: " in out or (
        "L1 kernel panic during this test: " in out and "FAILED test_l1_crash" in out
    )
    assert "sysrq triggered crash" in out
    assert "L1 console during this test" in out


@pytest.mark.parametrize(
    ("command", "headline"),
    [
        ("echo c > /proc/sysrq-trigger", "L1 kernel panic during this test: "),
        # A reset without a panic: where L1's virtualization is emulated the test runs once more (a reset
        # there is what the emulator does on its own) and fails again, the same way.
        ("reboot -f", "L1 reset during this test (QMP SHUTDOWN, reason guest-reset; QEMU exit status 0)"),
    ],
    ids=["panic", "reboot"],
)
def test_a_command_that_ends_l1_is_blamed_on_its_test(pytester: pytest.Pytester, command: str, headline: str) -> None:
    pytester.makepyfile(
        f"""
        def test_ends_l1(l1):
            l1.run({command!r}, timeout=30)

        def test_after(l1):
            l1.succeed("true")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    assert headline in result.stdout.str()


@pytest.mark.nested(level=2)
def test_l2_crash_restarts_l2_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="session")
        def first_l1_pid(l1):
            return l1.process.pid

        def test_a(l2, first_l1_pid):
            l2.succeed("true")

        def test_b_crashes_l2(l2):
            l2.crash()

        def test_c(l2, l1, first_l1_pid):
            assert l2.succeed("echo back") == "back\\n"
            assert l1.process.pid == first_l1_pid  # L1 kept running
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-levels=2")
    result.assert_outcomes(passed=2, failed=1)
    assert "L2 kernel panic during this test: " in result.stdout.str()
    # Progress on the terminal, one line per boot, even while pytest captures output.
    result.stdout.fnmatch_lines(["nestedkvm: L1 ready in * s (tcg, -cpu max)",
                                 "nestedkvm: L2 ready in * s (kvm, -cpu host)",
                                 "nestedkvm: L2 is down; starting a fresh one",
                                 "nestedkvm: L2 ready in * s (kvm, -cpu host)"])
    assert len([line for line in result.outlines if line.startswith("nestedkvm: L1 ready in")]) == 1


def test_sigkill_of_pytest_leaves_no_qemu(pytester: pytest.Pytester, running_qemus: Callable[[], set[str]]) -> None:
    pytester.makepyfile(
        """
        import time

        def test_holds_l1(l1):
            print("L1-UP", flush=True)
            time.sleep(300)
        """
    )
    before = running_qemus()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider"], cwd=pytester.path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if "L1-UP" in line or time.monotonic() > deadline:
            break
    assert running_qemus() - before, "the inner session should have an L1 running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # no_qemu_left checks that its QEMU died with it


def test_l1_crash_takes_l2_down_and_both_come_back(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_a(l2):
            l2.succeed("true")

        def test_b_crashes_l1(l1):
            l1.crash()

        def test_c(l2, l1):
            assert l2.succeed("echo back") == "back\\n"
            assert l1.alive
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-levels=2")
    result.assert_outcomes(passed=2, failed=1)
    assert "L1 kernel panic during this test: " in result.stdout.str()


def test_artifacts_of_a_failed_test_and_junit_properties(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_passes(l1):
            l1.succeed("true")

        def test_fails(l1):
            l1.succeed("echo from-the-failing-test > /dev/kmsg")
            assert False, "boom"
        """
    )
    artifacts = pytester.path / "artifacts"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--nested-artifacts={artifacts}", "--junitxml=junit.xml"
    )
    result.assert_outcomes(passed=1, failed=1)
    kept = sorted(p.name for p in artifacts.iterdir())
    assert kept == ["test_artifacts_of_a_failed_test_and_junit_properties.py_test_fails"]
    files = artifacts / kept[0]
    assert sorted(p.name for p in files.iterdir()) == ["l1-console.log", "l1-dmesg.txt", "l1-qemu.sh"]
    assert "from-the-failing-test" in (files / "l1-dmesg.txt").read_text()
    assert "Linux version" not in (files / "l1-dmesg.txt").read_text()  # only what came during the test
    assert (files / "l1-qemu.sh").read_text().splitlines()[2].startswith("/usr/bin/qemu-system-x86_64 ")
    junit = (pytester.path / "junit.xml").read_text()
    assert 'name="nestedkvm_accel"' in junit and 'name="nestedkvm_kernel"' in junit


def test_thirty_tests_with_every_third_crashing_l1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(1, 31))
        def test_n(l1, n):
            if n % 3 == 0:
                l1.run("echo c > /proc/sysrq-trigger", timeout=60)
            assert l1.succeed(f"echo {n}") == f"{n}\\n"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(passed=20, failed=10)
    failed = sorted(int(line.split("[", 1)[1].split("]", 1)[0]) for line in result.outlines
                    if line.startswith("FAILED "))
    assert failed == list(range(3, 31, 3))
    # Each failure's report is the headline alone (the summary line repeats it, cut to the terminal width).
    assert result.stdout.str().count("\nL1 kernel panic during this test: ") == 10


def test_sigkill_of_l1_qemu_mid_test_is_reported_and_recovered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal

        def test_kills_qemu(l1):
            os.kill(l1.process.pid, signal.SIGKILL)
            l1.run("sleep 5", timeout=60)

        def test_after(l1):
            assert l1.succeed("echo alive") == "alive\\n"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    assert "L1 QEMU exited with status -9 during this test (no panic on its console)" in result.stdout.str()
