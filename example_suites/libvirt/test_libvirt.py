"""libvirt inside L1: a KVM domain defined, run, inspected and destroyed with virsh; a crash of
the domain is libvirt's to see and costs L1 nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

from conftest import DOMAIN_DIR, domain_xml
from tiny_initramfs import MARKER

from pytest_nestedkvm import CommandFailed, Guest

BOOT_TIMEOUT = 180  # a kernel on KVM inside an emulated L1 boots in tens of seconds


def _define(l1: Guest, virsh: Callable[[str], str], name: str, files: tuple[str, str], append: str = "") -> str:
    console_log = f"{DOMAIN_DIR}/{name}.console"
    xml = domain_xml(name, *files, console_log=console_log, append=append)
    l1.succeed(f"cat > {DOMAIN_DIR}/{name}.xml <<'EOF'\n{xml}EOF")
    virsh(f"define {DOMAIN_DIR}/{name}.xml")
    return console_log


def _wait_for(l1: Guest, command: str, console_log: str) -> str:
    """`command`'s output once it succeeds; else a failure that shows the domain's console."""
    try:
        return l1.wait_until_succeeds(command, timeout=BOOT_TIMEOUT)
    except CommandFailed as exc:
        console = l1.run(f"tail -40 {console_log}").stdout
        raise AssertionError(f"{str(exc).splitlines()[0]}\nthe domain's console, last 40 lines:\n{console}") from exc


def test_a_kvm_domain_boots_l1s_kernel(l1: Guest, virsh: Callable[[str], str],
                                        domain_files: tuple[str, str]) -> None:
    console_log = _define(l1, virsh, "nk-boot", domain_files)
    try:
        virsh("start nk-boot")
        assert virsh("domstate nk-boot").strip() == "running"
        assert "<domain type='kvm'" in virsh("dumpxml nk-boot")
        # libvirt's own line to the domain's QEMU: its accelerator is KVM, not TCG.
        kvm = json.loads(virsh("""qemu-monitor-command nk-boot '{"execute": "query-kvm"}'"""))["return"]
        assert kvm == {"enabled": True, "present": True}
        console = _wait_for(l1, f"grep -A1 '{MARKER}' {console_log}", console_log)
        assert "clocksource kvm-clock" in console
        assert "Hypervisor detected: KVM" in console
        virsh("destroy nk-boot")
        assert virsh("domstate nk-boot").strip() == "shut off"
    finally:
        l1.run("virsh -c qemu:///system destroy nk-boot; virsh -c qemu:///system undefine nk-boot")


def test_a_domain_crash_is_libvirts_and_costs_l1_nothing(l1: Guest, virsh: Callable[[str], str],
                                                         domain_files: tuple[str, str]) -> None:
    boot_id = l1.succeed("cat /proc/sys/kernel/random/boot_id")
    console_log = _define(l1, virsh, "nk-crash", domain_files, append="nestedkvm.crash")
    try:
        virsh("start nk-crash")
        # pvpanic tells QEMU, QEMU tells libvirt, and on_crash=preserve keeps the domain to look at.
        _wait_for(l1, "virsh -c qemu:///system domstate --reason nk-crash | grep -x 'crashed (panicked)'",
                  console_log)
        assert "sysrq: Trigger a crash" in l1.succeed(f"cat {console_log}")
        virsh("destroy nk-crash")
    finally:
        l1.run("virsh -c qemu:///system destroy nk-crash; virsh -c qemu:///system undefine nk-crash")
    assert l1.succeed("cat /proc/sys/kernel/random/boot_id") == boot_id  # the same L1, still answering
