"""libvirt inside L1: a KVM domain defined, run, inspected and destroyed with virsh; a crash of
the domain is libvirt's to see and costs L1 nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_initramfs import MARKER

from pytest_nestedkvm import CommandFailed, Guest

BOOT_TIMEOUT = 180  # a kernel on KVM inside an emulated L1 boots in tens of seconds
# The domain's files live in L1's /tmp: L1's memory, gone with L1.
DOMAIN_DIR = "/tmp/libvirt-example"


def domain_xml(name: str, kernel: str, initrd: str, console_log: str, append: str = "") -> str:
    """A KVM domain that boots L1's own kernel with the tiny initramfs, its serial console in a file,
    a pvpanic device (found through ACPI: a panic reaches libvirt) and on_crash=preserve (libvirt
    keeps it, as crashed)."""
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=0 {append}</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>preserve</on_crash>
  <devices>
    <serial type='file'><source path='{console_log}'/><target port='0'/></serial>
    <panic model='isa'><address type='isa' iobase='0x505'/></panic>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture
def domain_files(l1: Guest) -> tuple[str, str]:
    """(kernel, initrd) for a domain: L1's kernel from /boot and an initramfs built inside L1."""
    release = l1.succeed("uname -r").strip()
    kernel = f"/boot/vmlinuz-{release}"
    l1.succeed(f"test -r {kernel}")
    initrd = f"{DOMAIN_DIR}/initrd"
    builder = Path(__file__).with_name("tiny_initramfs.py")  # the rootdir is exported at its own path
    # pvpanic's modules where the kernel has them as modules (Debian's does); built-in needs none.
    modules = f"$(for m in pvpanic pvpanic-mmio; do find /lib/modules/{release} -name $m.ko; done)"
    l1.succeed(f"mkdir -p {DOMAIN_DIR} && python3 {builder} {initrd} /bin/busybox {modules}")
    return kernel, initrd


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
        console = _wait_for(l1, f"grep -q '{MARKER}' {console_log} && cat {console_log}", console_log)
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
