"""A guest that wedges fails its test at once, with a headline that says so, and the next test gets a
fresh guest: LKDTM provokes a real soft lockup in L1 on the kernel built from source (its fragment
enables LKDTM). Under TCG the guest's virtualization is emulated, so the stall counts as a wedge."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytestmark = [pytest.mark.nested(level=1), pytest.mark.usefixtures("no_qemu_left")]


def test_a_soft_lockup_in_l1_fails_fast_as_a_wedge_and_the_next_test_gets_a_fresh_l1(
    pytester: pytest.Pytester, kernel_tree: str,
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_nestedkvm import GuestWedged, trouble_of

        BOOT_IDS = []

        def test_locks_up(l1):
            BOOT_IDS.append(l1.succeed("cat /proc/sys/kernel/random/boot_id"))
            # A timeout far beyond the detector's ~20 s: only the console watch can end this early.
            with pytest.raises(GuestWedged) as wedged:
                l1.run("echo SOFTLOCKUP > /sys/kernel/debug/provoke-crash/DIRECT", timeout=3000)
            assert wedged.value.level == 1 and wedged.value.stall in ("soft lockup", "RCU stall")
            assert not l1.alive

        def test_after(l1, request):
            assert l1.succeed("cat /proc/sys/kernel/random/boot_id") != BOOT_IDS[0]
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(kernel_tree, "--nested-emulator-reruns=0", f"--junitxml={junit}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    failures = {case.get("name"): case.find("failure") for case in ET.parse(junit).getroot().iter("testcase")}
    assert failures["test_after"] is None
    headline = failures["test_locks_up"].get("message", "")  # type: ignore[union-attr]
    assert headline.startswith(("L1 wedged: soft lockup", "L1 wedged: RCU stall")), headline
    assert "its virtualization is emulated" in headline
    assert "timed out" not in result.stdout.str()


def test_a_guest_frozen_whole_is_wedged_within_a_heartbeat_and_the_next_test_gets_a_fresh_l1(
    pytester: pytest.Pytester, kernel_tree: str,
) -> None:
    # LKDTM's HARDLOCKUP spins with interrupts off: on L1's one vCPU nothing else runs and nothing is
    # printed (TCG gives the guest no NMI watchdog), as when the emulator froze L1 under a KVM selftest.
    pytester.makepyfile(
        """
        import pytest
        from pytest_nestedkvm import GuestWedged

        BOOT_IDS = []

        def test_freezes(l1):
            BOOT_IDS.append(l1.succeed("cat /proc/sys/kernel/random/boot_id"))
            with pytest.raises(GuestWedged) as wedged:
                l1.run("echo HARDLOCKUP > /sys/kernel/debug/provoke-crash/DIRECT", timeout=3000)
            assert (wedged.value.level, wedged.value.stall) == (1, "no answer")

        def test_after(l1):
            assert l1.succeed("cat /proc/sys/kernel/random/boot_id") != BOOT_IDS[0]
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(kernel_tree, "--nested-emulator-reruns=0", f"--junitxml={junit}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    failures = {case.get("name"): case.find("failure") for case in ET.parse(junit).getroot().iter("testcase")}
    assert failures["test_after"] is None
    headline = failures["test_freezes"].get("message", "")  # type: ignore[union-attr]
    assert headline.startswith("L1 wedged: no answer (its virtualization is emulated"), headline
    assert "its control shell did not answer `true`" in headline
