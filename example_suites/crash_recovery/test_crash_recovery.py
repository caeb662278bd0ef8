"""A test panics L1 on purpose; the tests after it run on a fresh, pristine L1.

When the hypervisor or kernel under test crashes a guest, the plugin fails the
test it happened in (with the panic as the headline) and boots the guest again,
from its pristine spec, for the next test that needs it. Here the crash is the
point of test 2, which says so with `@pytest.mark.expect_crash(level=1)` (see
conftest.py), so the whole file passes. The tests run in file order and share
what they saw through the `seen` fixture.

    pytest --nested-levels=2 example_suites/crash_recovery
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from pytest_nestedkvm import Guest
from pytest_nestedkvm.machine.process import HostProcess

MARK = "/tmp/written-before-the-crash"  # the guest's /tmp: a tmpfs in its memory


def qemu_pid(guest: Guest) -> int:
    """The pid of L1's QEMU on this host."""
    assert isinstance(guest.process, HostProcess) and guest.process.pid is not None
    return guest.process.pid


def boot_id(guest: Guest) -> str:
    """A random id the guest kernel draws at each boot."""
    return guest.succeed("cat /proc/sys/kernel/random/boot_id").strip()


@pytest.fixture(scope="module")
def seen() -> dict[str, Any]:
    """What the tests of this file saw before the crash, for the tests after it."""
    return {}


def need_crash(seen: dict[str, Any]) -> None:
    if "crashed" not in seen:
        pytest.skip("runs after test_2_panic_l1_on_purpose (run the whole file)")


def test_1_l1_gets_a_file_in_tmp(l1: Guest, seen: dict[str, Any]) -> None:
    token = secrets.token_hex(8)
    l1.succeed(f"echo {token} > {MARK}")
    assert l1.succeed(f"cat {MARK}") == f"{token}\n"
    seen.update(token=token, boot_id=boot_id(l1), qemu_pid=qemu_pid(l1), boots=l1.boots)


@pytest.mark.expect_crash(level=1)
def test_2_panic_l1_on_purpose(l1: Guest, seen: dict[str, Any]) -> None:
    if "token" in seen:
        assert l1.succeed(f"cat {MARK}") == f"{seen['token']}\n"  # still there just before the crash
    l1.crash()  # a real kernel panic (sysrq-c); returns once L1's QEMU is gone
    assert not l1.alive
    seen["crashed"] = True


def test_3_the_next_test_gets_a_freshly_booted_l1(l1: Guest, seen: dict[str, Any]) -> None:
    need_crash(seen)
    assert l1.alive
    assert l1.boots == seen["boots"] + 1
    assert qemu_pid(l1) != seen["qemu_pid"]  # a new QEMU process
    assert boot_id(l1) != seen["boot_id"]  # and a new kernel boot inside it
    assert l1.succeed("echo fine") == "fine\n"


def test_4_the_fresh_l1_is_pristine(l1: Guest, seen: dict[str, Any]) -> None:
    need_crash(seen)
    l1.fail(f"test -e {MARK}")  # the file written before the crash is gone
    assert "Kernel panic" not in l1.succeed("dmesg")  # nothing of the old boot carried over


@pytest.mark.nested(level=2)
def test_5_l2_runs_again_inside_the_fresh_l1(l2: Guest, l1: Guest, seen: dict[str, Any]) -> None:
    need_crash(seen)
    assert l2.parent is l1
    assert l2.qmp().query_kvm()["enabled"]  # on the fresh L1's KVM
    assert l2.succeed("echo hi from L2") == "hi from L2\n"
