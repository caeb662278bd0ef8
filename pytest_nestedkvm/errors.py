"""One exception tree for the whole plugin.

Infrastructure problems (a guest that will not boot, a missing binary) derive from
NestedKvmError and surface as test *errors*; a command whose outcome a test asserted
on raises CommandFailed, an AssertionError, so it surfaces as a test *failure*.
"""

from __future__ import annotations


class NestedKvmError(Exception):
    """Base of every error the plugin raises on purpose."""


class ConfigError(NestedKvmError):
    """A setting is invalid; the message names the setting, its source and the fix."""


class HostError(NestedKvmError):
    """The host lacks something the requested setup needs (binary, kernel, module)."""


class BootError(NestedKvmError):
    """A guest did not become ready; the message quotes its last console lines."""


class GuestCrashed(NestedKvmError):
    """A guest died (QEMU exited, kernel panic) while it was in use."""


class ChannelError(NestedKvmError):
    """The command channel to a guest broke or answered something unexpected."""


class CommandTimeout(NestedKvmError):
    """A command ran past its timeout; it was killed and the channel stays usable."""

    def __init__(self, message: str, *, command: str, timeout: float, stdout: bytes, stderr: bytes) -> None:
        super().__init__(message)
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(AssertionError):
    """`Guest.succeed` / `Guest.fail` saw the other outcome; carries the whole result."""

    def __init__(self, message: str, *, command: str, exit_status: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.command = command
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
