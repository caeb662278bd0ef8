"""The pluggy hooks, from a user's conftest, on a real L1: spec, argv, provisioning, teardown."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = """
import dataclasses
from pathlib import Path

def pytest_nestedkvm_guest_spec(config, level, spec):
    return dataclasses.replace(spec, memory_mib=640) if level == 1 else None

def pytest_nestedkvm_qemu_argv(config, spec, argv):
    argv += ["-device", "virtio-rng-pci"]

def pytest_nestedkvm_guest_ready(config, guest):
    guest.succeed("echo provisioned > /tmp/ready-mark")

def pytest_nestedkvm_guest_teardown(config, guest):
    Path(config.rootpath, "teardown.txt").write_text(guest.succeed("cat /tmp/ready-mark; cat /proc/cmdline"))
"""


def test_user_hooks_shape_provision_and_tear_down_l1(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_spec_and_argv_edits_reached_qemu(l1):
            assert l1.spec.memory_mib == 640
            total_kib = int(l1.succeed("grep MemTotal /proc/meminfo").split()[1])
            assert 500 * 1024 < total_kib <= 640 * 1024
            # virtio-rng-pci: vendor 0x1af4, transitional device id 0x1005
            assert "0x1005" in l1.succeed("cat /sys/bus/pci/devices/*/device")

        def test_ready_hook_provisioned_l1(l1):
            assert l1.succeed("cat /tmp/ready-mark") == "provisioned\\n"

        def test_ready_hook_runs_again_after_a_crash(l1):
            l1.crash()

        def test_after_the_crash(l1):
            assert l1.succeed("cat /tmp/ready-mark") == "provisioned\\n"
        """
    )
    result = pytester.runpytest("--nested-levels=1")
    result.assert_outcomes(passed=3, failed=1)  # the crashing test is blamed for the crash
    teardown = Path(pytester.path, "teardown.txt").read_text()
    assert teardown.startswith("provisioned\n") and "panic=-1" in teardown


def test_a_guest_spec_hook_returning_nonsense_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("def pytest_nestedkvm_guest_spec(config, level, spec):\n    return 'l1.qcow2'\n")
    pytester.makepyfile("def test_x(l1):\n    pass\n")
    result = pytester.runpytest("--nested-levels=1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ConfigError: pytest_nestedkvm_guest_spec returned 'l1.qcow2' for L1: return a "
                                 "GuestSpec for level 1*"])
