#!/usr/bin/env python3
"""The smallest KVM user: a VM of our own, three real-mode instructions, ioctls on /dev/kvm.

What QEMU does for a whole PC, in a page of Python (standard library only, no
compiler): open /dev/kvm, check the API version, create a VM, give it 64 KiB of
memory holding a few instructions, create a vCPU, point it at them in real mode,
and KVM_RUN it until it halts. The guest code is

    mov al, 0x42    ; b0 42
    out 0x10, al    ; e6 10     -> KVM_EXIT_IO, out, port 0x10, data 0x42
    add al, bl      ; 00 d8     (bl = ADDEND, set from the command line through KVM_SET_REGS)
    out 0x11, al    ; e6 11     -> KVM_EXIT_IO, out, port 0x11, data 0x42 + ADDEND
    hlt             ; f4        -> KVM_EXIT_HLT, rip just past the hlt

Every exit is printed as one line; the program exits 1 if any exit differs from
the list above. Usage: python3 kvm_hello.py [ADDEND] [--device /dev/kvm]

The ioctl numbers and structures are those of the Linux UAPI, <linux/kvm.h> and
<asm/kvm.h> (x86_64); each number is built with the _IO/_IOR/_IOW encoding of
<asm-generic/ioctl.h> from the structure it carries, as the C macros do.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import sys

# <asm-generic/ioctl.h>: | dir (2 bits) | size (14 bits) | type (8 bits) | nr (8 bits) |
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE
KVM_API_VERSION = 12  # <linux/kvm.h>: the only version there has ever been since 2.6.22


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):  # <linux/kvm.h>
    _fields_ = (("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64))


class KvmRegs(ctypes.Structure):  # <asm/kvm.h>
    _fields_ = tuple((name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"))


class KvmSegment(ctypes.Structure):  # <asm/kvm.h>
    _fields_ = (("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8))


class KvmDtable(ctypes.Structure):  # <asm/kvm.h>
    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):  # <asm/kvm.h>
    _fields_ = (*((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
                ("gdt", KvmDtable), ("idt", KvmDtable),
                *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)))


class KvmRunIo(ctypes.Structure):  # the `io` member of kvm_run's exit union
    _fields_ = (("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64))


class KvmRunHead(ctypes.Structure):
    """The start of struct kvm_run, shared with the kernel through the vCPU's mmap."""

    _fields_ = (("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("io", KvmRunIo))  # the exit union starts at offset 32


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)

# Exit reasons (<linux/kvm.h>), by number, for messages.
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
              7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

MEMORY_SIZE = 0x10000
CODE_ADDRESS = 0x1000
CODE = bytes.fromhex("b042" "e610" "00d8" "e611" "f4")


def run_guest(device: str, addend: int) -> list[str]:
    """Run CODE in a fresh VM on `device`; one line per VM exit, ending with the HLT."""
    kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    version = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
    if version != KVM_API_VERSION:
        raise SystemExit(f"KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}")
    lines = [f"api_version {version}"]
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)  # machine type 0: the default

    memory = mmap.mmap(-1, MEMORY_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    memory[CODE_ADDRESS:CODE_ADDRESS + len(CODE)] = CODE
    region = KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=MEMORY_SIZE,
                                      userspace_addr=ctypes.addressof(ctypes.c_char.from_buffer(memory)))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)

    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)  # vCPU id 0
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run_area = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    run = KvmRunHead.from_buffer(run_area)

    # Real mode, as after reset, but with CS at 0 so that CS:IP = 0:CODE_ADDRESS.
    sregs = KvmSregs()
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base, sregs.cs.selector = 0, 0
    fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
    fcntl.ioctl(vcpu, KVM_SET_REGS, KvmRegs(rip=CODE_ADDRESS, rbx=addend, rflags=0x2))  # bit 1 is always set

    for _ in range(16):  # the code makes three exits; more means something went wrong
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason = run.exit_reason
        name = EXIT_NAMES.get(reason, str(reason))
        if reason == KVM_EXIT_IO:
            io = run.io
            data = run_area[io.data_offset:io.data_offset + io.size * io.count]
            direction = "out" if io.direction == KVM_EXIT_IO_OUT else "in"
            lines.append(f"exit KVM_EXIT_IO {direction} port={io.port:#x} size={io.size} count={io.count} "
                         f"data={data.hex()}")
        elif reason == KVM_EXIT_HLT:
            regs = KvmRegs()
            fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
            lines.append(f"exit KVM_EXIT_HLT rip={regs.rip:#x} rax={regs.rax:#x}")
            break
        else:
            lines.append(f"exit KVM_EXIT_{name} (unexpected)")
            break
    del run  # release the buffer before the mapping goes
    for fd in (vcpu, vm, kvm):
        os.close(fd)
    return lines


def expected(addend: int) -> list[str]:
    """The exits CODE must make, worked out from the instructions, not from a run."""
    second = (0x42 + addend) & 0xFF
    return [
        f"api_version {KVM_API_VERSION}",
        "exit KVM_EXIT_IO out port=0x10 size=1 count=1 data=42",
        f"exit KVM_EXIT_IO out port=0x11 size=1 count=1 data={second:02x}",
        f"exit KVM_EXIT_HLT rip={CODE_ADDRESS + len(CODE):#x} rax={second:#x}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("addend", nargs="?", type=lambda s: int(s, 0), default=7, help="value for bl (0-255)")
    parser.add_argument("--device", default="/dev/kvm")
    args = parser.parse_args(argv)
    if not 0 <= args.addend <= 0xFF:
        parser.error("addend must be 0-255")
    try:
        lines = run_guest(args.device, args.addend)
    except OSError as exc:
        print(f"kvm_hello: {args.device}: {exc}", file=sys.stderr)
        return 2
    print(*lines, sep="\n")
    if lines != expected(args.addend):
        print("kvm_hello: FAILED, expected:", *expected(args.addend), sep="\n  ", file=sys.stderr)
        return 1
    print("kvm_hello: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
