"""The classic nested-KVM recipe, one step per test.

By hand it goes: check that the host can nest; boot L1; inside L1 check for
vmx/svm and load kvm with nested=1; start L2 with `qemu-system-x86_64
-enable-kvm -cpu host -snapshot`; check that L2 runs. Here each step is a test
and each guest is a fixture. Run it with:

    pytest --nested-levels=2 example_suites/classic_recipe
"""

from __future__ import annotations

from pytest_nestedkvm.base.host import HostReport
from pytest_nestedkvm.machine.guest import Guest


def test_step1_host_can_nest(l0: HostReport) -> None:
    """L0: the plugin's host check says how L1 will run, and why."""
    assert l0.nesting_possible, l0.nesting_fix
    print(f"L1 will run with {l0.accel}, -cpu {l0.cpu}:", *l0.reasons, sep="\n  ")


def test_step2_l1_cpu_has_virtualization(l1: Guest) -> None:
    """L1: the CPU model offers hardware virtualization (AMD svm or Intel vmx)."""
    flags = l1.succeed("grep -m1 '^flags' /proc/cpuinfo").split()
    assert "svm" in flags or "vmx" in flags


def test_step3_l1_has_kvm_with_nesting(l1: Guest) -> None:
    """L1: kvm and kvm_amd/kvm_intel are loaded with nested=1, and /dev/kvm exists."""
    modules = l1.succeed("cut -d' ' -f1 /proc/modules").split()
    vendor = "kvm_amd" if "kvm_amd" in modules else "kvm_intel"
    assert "kvm" in modules and vendor in modules
    assert l1.succeed(f"cat /sys/module/{vendor}/parameters/nested").strip() in ("1", "Y")
    l1.succeed("test -c /dev/kvm")


def test_step4_l2_starts_with_kvm_inside_l1(l2: Guest, l1: Guest) -> None:
    """L2: QEMU inside L1, with KVM, -cpu host and -snapshot; its QEMU confirms KVM."""
    assert l2.qemu_argv[l2.qemu_argv.index("-accel") + 1] == "kvm"
    assert "-snapshot" in l2.qemu_argv
    assert l2.qmp().query_kvm()["enabled"]
    assert "qemu-system" in l1.succeed(f"cat /proc/$(cat /run/nestedkvm/{l2.name}/pid)/cmdline")


def test_step5_l2_runs(l2: Guest) -> None:
    """L2: it boots, answers commands, and knows it runs under a hypervisor."""
    assert "hypervisor" in l2.succeed("grep -m1 '^flags' /proc/cpuinfo").split()
    assert l2.succeed("uname -s") == "Linux\n"
