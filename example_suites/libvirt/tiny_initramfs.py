#!/usr/bin/env python3
"""Write the initramfs of the libvirt example's domain: /init, a static busybox, and modules.

Runs inside L1 (Python standard library only). The archive is the kernel's "newc" cpio
format, written by hand so that no cpio tool and no root (for /dev/console) is needed.
The domain's /init mounts /proc and /sys, loads the given modules in order (pvpanic, so a
panic reaches QEMU and libvirt sees the domain crash), prints one line that shows what it
runs on and then the marker, panics at once when its command line holds `nestedkvm.crash`,
and else sleeps.

Usage: python3 tiny_initramfs.py OUTPUT BUSYBOX [MODULE.ko ...]
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

MARKER = "nestedkvm-libvirt-domain: up"
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
for module in /modules/*.ko; do [ -e "$module" ] && /bin/busybox insmod "$module"; done
# What it runs on first, the marker last: once a reader sees the whole marker, the line before it
# is whole too (the serial console reaches the log a byte at a time, and two echoes raced the reader).
echo "clocksource $(/bin/busybox cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\
, $(/bin/busybox dmesg | /bin/busybox grep -m1 -o 'Hypervisor detected.*')"
echo "{MARKER}"
case " $(/bin/busybox cat /proc/cmdline) " in *" nestedkvm.crash "*) echo c > /proc/sysrq-trigger ;; esac
while :; do /bin/busybox sleep 3600; done
"""


def _entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One newc record: a 110-byte header of hex fields, the name, the data, each padded to 4 bytes."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    record = header + name.encode() + b"\0"
    record += b"\0" * (-len(record) % 4) + data
    return record + b"\0" * (-len(record) % 4)


def archive(busybox: Path, modules: list[Path]) -> bytes:
    entries = [("dev", stat.S_IFDIR | 0o755, b""), ("proc", stat.S_IFDIR | 0o755, b""),
               ("sys", stat.S_IFDIR | 0o755, b""), ("bin", stat.S_IFDIR | 0o755, b""),
               ("modules", stat.S_IFDIR | 0o755, b""),
               ("init", stat.S_IFREG | 0o755, INIT.encode()),
               ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())]
    # Numbered, so that /init's glob loads them in the order given (pvpanic before pvpanic-mmio).
    entries += [(f"modules/{n}-{module.name}", stat.S_IFREG | 0o644, module.read_bytes())
                for n, module in enumerate(modules)]
    out = b"".join(_entry(name, mode, data, ino=n + 1) for n, (name, mode, data) in enumerate(entries))
    out += _entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), ino=len(entries) + 1)  # init's stdout
    return out + _entry("TRAILER!!!", 0)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    output, busybox, *modules = (Path(arg) for arg in argv)
    output.write_bytes(archive(busybox, modules))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
