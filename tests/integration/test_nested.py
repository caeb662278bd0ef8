"""Real nesting: L2 on L1's KVM, L3 on L2's KVM, each reached with the same Guest API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_nestedkvm.base.errors import BootError, CommandTimeout
from pytest_nestedkvm.machine.guest import Guest, new_guest
from pytest_nestedkvm.session import SESSION_KEY


@pytest.mark.nested(level=1)
def test_l1_kvm_module_has_nested_on(l1: Guest) -> None:
    module = "kvm_amd" if l1.run("grep -qw svm /proc/cpuinfo").ok else "kvm_intel"
    assert l1.succeed(f"cat /sys/module/{module}/parameters/nested").strip() in ("1", "Y")


def test_l2_is_a_kvm_guest(l2: Guest) -> None:
    assert "hypervisor" in l2.succeed("grep -m1 '^flags' /proc/cpuinfo").split()
    assert "Hypervisor detected: KVM" in l2.succeed("dmesg")


def test_l2_qemu_inside_l1_reports_kvm_enabled(l2: Guest, l1: Guest) -> None:
    assert l2.qmp().query_kvm() == {"enabled": True, "present": True}
    assert l2.qemu_argv[l2.qemu_argv.index("-accel") + 1] == "kvm"
    assert "-snapshot" in l2.qemu_argv
    l1.succeed(f"kill -0 $(cat /run/nestedkvm/{l2.name}/pid)")  # the L2 QEMU is a process inside L1


def test_l2_console_is_captured_on_l0(l2: Guest, l1: Guest) -> None:
    assert l2.console_log != l1.console_log
    l2.succeed("echo marker-from-l2 > /dev/console")
    l2.wait_until_succeeds("true", 5)
    assert "marker-from-l2" in l2.console_log.read_text(errors="replace")


def test_l2_command_channel_is_exact(l2: Guest) -> None:
    result = l2.run("printf 'a\\000b'; echo oops >&2; exit 4")
    assert (result.exit_status, result.stdout_bytes, result.stderr) == (4, b"a\x00b", "oops\n")
    assert l2.succeed("seq 1 20000").splitlines()[-1] == "20000"


def test_l2_timeout_leaves_channel_usable(l2: Guest) -> None:
    with pytest.raises(CommandTimeout):
        l2.run("sleep 300", timeout=2)
    assert l2.succeed("echo ok") == "ok\n"


def test_l2s_writes_stay_in_l2(l1: Guest, l2: Guest) -> None:
    l2.succeed("echo from-l2 > /etc/nestedkvm-l2-wrote && mkdir -p /var/lib/nestedkvm-l2")
    l1.fail("test -e /etc/nestedkvm-l2-wrote || test -e /var/lib/nestedkvm-l2")
    assert not Path("/etc/nestedkvm-l2-wrote").exists()
    l2.succeed("touch /tmp/fine")


@pytest.mark.nested(level=3)
def test_l3_runs_on_l2s_kvm(nested_guest) -> None:  # type: ignore[no-untyped-def]
    l3 = nested_guest(3)
    assert l3.level == 3
    assert l3.succeed("echo hello from L3") == "hello from L3\n"
    assert "Hypervisor detected: KVM" in l3.succeed("dmesg")
    assert l3.qmp().query_kvm()["enabled"] is True


def test_l2_that_never_boots_reports_its_console_and_l1_survives(l1: Guest, l2: Guest, pytestconfig) -> None:  # type: ignore[no-untyped-def]
    session = pytestconfig.stash[SESSION_KEY]
    session.lab.stop_from(2)  # free L2's streams for the broken guest; the next L2 user gets a fresh one
    spec = dataclasses.replace(session.lab.spec_for(2), append="rdinit=/no/such/init")
    broken = new_guest(spec, session.lab.run_root, parent=l1, boot_timeout=120, command_timeout=10)
    try:
        with pytest.raises(BootError) as caught:
            broken.start()
    finally:
        broken.close()
    message = str(caught.value)
    assert "l2" in message and "Kernel panic" in message
    assert (caught.value.level, caught.value.why, caught.value.panicked) == (2, "crashed", True)
    assert l1.succeed("echo L1 still answers") == "L1 still answers\n"


SKEWED_TSC = """
import dataclasses

def pytest_nestedkvm_guest_spec(config, level, spec):
    if level == 1:
        return dataclasses.replace(spec, append=(spec.append + " tsc_early_khz=2590000").strip())
    return None
"""

L2_SLEEPS = """
def test_l2_keeps_its_timer(l1, l2):
    l2.succeed("sleep 0.1", timeout=30)
    log = l1.console_log.read_text(errors="replace")
    assert "Refined TSC clocksource calibration" in log
    assert "user requested TSC rate below hardware speed" not in log
"""


@pytest.mark.usefixtures("no_qemu_left")
def test_l2_keeps_its_timer_when_l1s_first_tsc_estimate_is_off(pytester: pytest.Pytester) -> None:
    """Under TCG, L1's first TSC estimate is sometimes 0.1 % below the refined one; a kvm_amd loaded
    before the refinement gave L2 a TSC-deadline timer that never fired (1 in ~20 L2 boots).
    tsc_early_khz makes that estimate 0.4 % low on every boot: the init must wait for the refinement."""
    pytester.makeconftest(SKEWED_TSC)
    pytester.makepyfile(L2_SLEEPS)
    result = pytester.runpytest_subprocess("--nested-levels=2", "--nested-emulator-reruns=0", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
