"""Drive the KVM inside the guests by hand: /dev/kvm ioctls, a VM of our own, its exits.

`kvm_hello.py` (next to this file) creates a VM through /dev/kvm, runs a few
real-mode instructions in it and prints each VM exit. Each test copies it into
the guest with `guest.put` (SFTP) and runs it with the host's python3, which the
guests see through the shared root. In L1 the little VM runs on L1's KVM; in L2 it runs on L2's
KVM, which itself runs on L1's: KVM on KVM on KVM where L0 has KVM too.

    pytest --nested-levels=2 example_suites/kvm_api
"""

from __future__ import annotations

import random
import shlex
from pathlib import Path

import pytest

from pytest_nestedkvm.machine.guest import Guest

PROGRAM = Path(__file__).resolve().with_name("kvm_hello.py")


def expected_exits(addend: int) -> list[str]:
    """What the guest code (mov al, 0x42; out 0x10, al; add al, bl; out 0x11, al; hlt) must make KVM report."""
    second = (0x42 + addend) & 0xFF
    return [
        "api_version 12",  # KVM_GET_API_VERSION: 12 is the stable KVM API
        "exit KVM_EXIT_IO out port=0x10 size=1 count=1 data=42",
        f"exit KVM_EXIT_IO out port=0x11 size=1 count=1 data={second:02x}",
        f"exit KVM_EXIT_HLT rip={0x1000 + 9:#x} rax={second:#x}",  # 9 bytes of code loaded at 0x1000
        "kvm_hello: OK",
    ]


def copied_in(guest: Guest) -> str:
    """kvm_hello.py, copied into the guest over SFTP; its path there.

    (The guest sees the host root, but not a checkout under /tmp or /var/tmp: the guest
    has its own tmpfs there.)
    """
    guest.put(PROGRAM, "/tmp/kvm_hello.py")
    return "/tmp/kvm_hello.py"


def run_program(guest: Guest, *args: str) -> list[str]:
    """Run kvm_hello.py in `guest`; its stdout lines."""
    command = shlex.join(["python3", "-B", copied_in(guest), *args])
    return guest.succeed(command).splitlines()


def kvm_module(guest: Guest) -> str:
    """Which module provides the guest's /dev/kvm: kvm_amd or kvm_intel."""
    modules = guest.succeed("cut -d' ' -f1 /proc/modules").split()
    return next(m for m in ("kvm_amd", "kvm_intel") if m in modules)


def test_l1_runs_a_vm_of_its_own_through_dev_kvm(l1: Guest) -> None:
    addend = random.randrange(1, 256)  # bl comes in through KVM_SET_REGS: a fresh value each run
    print(f"L1's /dev/kvm is {kvm_module(l1)}; addend {addend:#x}")
    assert run_program(l1, str(addend)) == expected_exits(addend)


@pytest.mark.nested(level=2)
def test_l2_runs_a_vm_of_its_own_through_dev_kvm(l2: Guest) -> None:
    addend = random.randrange(1, 256)
    print(f"L2's /dev/kvm is {kvm_module(l2)}; addend {addend:#x}")
    assert run_program(l2, str(addend)) == expected_exits(addend)


def test_the_program_refuses_a_device_that_is_not_kvm(l1: Guest) -> None:
    """The checks are real: pointed at /dev/null, the first ioctl fails and the program says so."""
    result = l1.run(shlex.join(["python3", "-B", copied_in(l1), "--device", "/dev/null"]))
    assert result.exit_status == 2
    assert "Inappropriate ioctl for device" in result.stderr
    assert "kvm_hello: OK" not in result.stdout
