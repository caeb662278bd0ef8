"""Names and places inside the built-in guest that the init, the QEMU argv and the host side
must agree on (one definition each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The 9p tags of the host's exports are EXPORT_TAG + their number.
EXPORT_TAG = "nk"
# A guest's byte streams, by role: its two shells (main and control), each with the port its
# commands come in on and the port its replies go out on, its serial console and its QMP
# monitor. The built-in init starts a root shell on each pair of SHELL_PORTS. Below L1
# every role travels through each parent as a virtio port of its own (qemu.passthrough_port):
# the console is logged as it comes, the others are sockets the link hands to the channel
# and to QMP (SOCKET_ROLES). "serial": a disk image's console to log in on (--nested-login).
Role = Literal["cmd", "cmd-out", "ctl", "ctl-out", "console", "qmp", "serial"]
CMD: Role = "cmd"
CMD_OUT: Role = "cmd-out"
CTL: Role = "ctl"
CTL_OUT: Role = "ctl-out"
CONSOLE: Role = "console"
QMP: Role = "qmp"
SERIAL: Role = "serial"
ROLES: tuple[Role, ...] = (CMD, CMD_OUT, CTL, CTL_OUT, CONSOLE, QMP)
SOCKET_ROLES: tuple[Role, ...] = (CMD, CMD_OUT, CTL, CTL_OUT, QMP)
# Replies leave on a port of their own, which the shell opens write-only: a virtio port has
# one opener at a time, so nothing a command starts can read the next command off its stdout.
# Role names stay within "console"'s length: each is a socket's file name under the run
# directory, and a UNIX socket's path has at most 107 bytes.
REPLY_ROLE: dict[Role, Role] = {CMD: CMD_OUT, CTL: CTL_OUT}
SHELL_PORTS: dict[Role, str] = {role: f"nestedkvm.{role}" for role in (CMD, CMD_OUT, CTL, CTL_OUT)}
# Where the guest links each named virtio port as port.<name> (udev would use /dev/virtio-ports).
PORT_DIR = "/run/nestedkvm"
# In a parent that is a user's disk image (no built-in init): what the plugin brings for the built-in
# guest inside it, the boot files (copied in over SFTP) and a copy of its /etc without secrets.
HOSTED_BOOT = f"{PORT_DIR}/boot"
HOSTED_ETC = f"{PORT_DIR}/etc"
# Guest uptime at each phase of the built-in guest's boot, "name=seconds" (benchmarks read it).
BOOT_MARKS = f"{PORT_DIR}/boot-marks"
# Host directories a guest gets as they are (where they are directories, not /usr symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Exports the built-in guest may write to, each under an overlay with a tmpfs upper layer (what a
# daemon configures: /etc/libvirt; what `make install` writes: /usr/local). Not the project, the
# cache and the shares: a plugin session inside the guest writes its own files there and exports
# them to its own guests.
WRITABLE_EXPORTS = ("/etc", *SYSTEM_DIRS)
# Where the guest also sees the read-only 9p mount under each such overlay, at the overlay's path
# below it: a plugin session inside the guest exports that to its own L1 (QEMU's multidevs=forbid
# refuses the files of an overlay over 9p: their st_dev is the lower layer's, not the overlay's).
LOWER_DIR = f"{PORT_DIR}/lower"
# Tmpfs mounts of their own (world-writable, sticky), over the exports where one lies below them.
TMPFS_DIRS = ("/tmp", "/run", "/var/tmp", "/var/log", "/mnt")


# How a guest's shells are reached: the built-in init's agent shells, SSH into a disk image
# with cloud-init, or a login on a disk image's serial console.
ChannelKind = Literal["agent", "ssh", "serial"]


@dataclass(frozen=True)
class ChannelNeeds:
    """What a channel kind needs of its guest's QEMU and boot (read by the argv and the plan)."""

    agent_ports: bool  # the built-in init's shells on virtio-serial ports
    console_role: Role  # SERIAL: a console socket to log in on
    # A disk image boots firmware, a bootloader and a whole init system (systemd, cloud-init):
    # ~20-45 s under TCG where the built-in guest takes ~3 s.
    boot_factor: int


CHANNEL_NEEDS: dict[ChannelKind, ChannelNeeds] = {
    "agent": ChannelNeeds(agent_ports=True, console_role=CONSOLE, boot_factor=1),
    "ssh": ChannelNeeds(agent_ports=False, console_role=CONSOLE, boot_factor=4),
    "serial": ChannelNeeds(agent_ports=False, console_role=SERIAL, boot_factor=4),
}
