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

