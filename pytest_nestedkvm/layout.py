"""Names and places inside the built-in guest that the init, the QEMU argv and the host side
must agree on (one definition each)."""

from __future__ import annotations

# The 9p tags of the host's exports are EXPORT_TAG + their number.
EXPORT_TAG = "nk"
# virtio-serial port names the init starts a shell on (see channel.py).
COMMAND_PORT = "nestedkvm.cmd"
CONTROL_PORT = "nestedkvm.ctl"
# Where the guest links each named virtio port as port.<name> (udev would use /dev/virtio-ports).
PORT_DIR = "/run/nestedkvm"
# Guest uptime at each phase of the built-in guest's boot, "name=seconds" (benchmarks read it).
BOOT_MARKS = f"{PORT_DIR}/boot-marks"
# Writable places on top of the read-only shared root.
TMPFS_DIRS = ("/tmp", "/run", "/var/tmp", "/var/log", "/mnt")
