"""One exception tree for the whole plugin; each exception carries the fields callers decide on.

Infrastructure problems (a guest that will not boot, a missing binary) derive from
NestedKvmError and surface as test *errors*; a command whose outcome a test asserted
on raises CommandFailed, an AssertionError, so it surfaces as a test *failure*.
Code decides on the fields (`why`, `exit_status`, `panicked` ...), never on the text.
"""

from __future__ import annotations

import re
from typing import Literal

# Control characters but newline and tab: a guest's output quoted in a message must not drive
# the terminal that shows it (escape sequences, carriage returns that hide what came before).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` from a guest, fit for a message: each control character shown as an escape (\\x1b)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# Why a boot ended without a ready guest.
BootEnd = Literal["timeout", "reset", "wedged", "crashed", "parent_down", "login", "ssh"]


class NestedKvmError(Exception):
    """Base of every error the plugin raises on purpose."""


class ConfigError(NestedKvmError):
    """A setting is invalid; the message names the setting, its source and the fix."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option  # the setting at fault ("accel", "cpu", ...), when one is


class LevelUnavailable(NestedKvmError):
    """This session cannot provide a guest at that level (too deep for --nested-levels, no QEMU, no
    nested virtualization): the pytest plugin skips a test that asks for it, with this message."""

    def __init__(self, message: str, *, level: int) -> None:
        super().__init__(message)
        self.level = level


class HostError(NestedKvmError):
    """The host lacks something the requested setup needs (binary, kernel, module)."""


class GuestCrashed(NestedKvmError):
    """A guest's QEMU is gone (exited, killed, or its parent went down) while it was in use."""

    def __init__(
        self, message: str, *, level: int, exit_status: int | None = None, panicked: bool = False,
        parent_down: bool = False,
    ) -> None:
        super().__init__(message)
        self.level = level
        self.exit_status = exit_status  # QEMU's; None when unknown (the parent took it down)
        self.panicked = panicked  # the console or QMP showed a kernel panic
        self.parent_down = parent_down


class GuestWedged(NestedKvmError):
    """A guest whose virtualization is emulated stopped: it printed a stall (RCU stall, soft or hard
    lockup, hung task) and then did not answer `true` on its control shell, or its control shell
    stopped answering while a command ran. Raised at once, not after the command's timeout; the
    guest is replaced before the next test."""

    def __init__(self, message: str, *, level: int, stall: str, line: str) -> None:
        super().__init__(message)
        self.level = level
        self.stall = stall  # "RCU stall", "soft lockup", ... (console.stall_kind)
        self.line = line  # the console line that said so


class BootError(NestedKvmError):
    """A guest did not become ready; the message quotes its last console lines."""

    def __init__(
        self, message: str, *, level: int, why: BootEnd, exit_status: int | None = None, panicked: bool = False,
    ) -> None:
        super().__init__(message)
        self.level = level
        self.why = why
        self.exit_status = exit_status
        self.panicked = panicked

    @property
    def reset(self) -> bool:
        """QEMU ended cleanly (status 0, -no-reboot) while booting, with no panic: a reset."""
        return self.why == "reset"


class ChannelError(NestedKvmError):
    """The command channel to a guest broke or answered something unexpected."""


class GuestSilent(ChannelError):
    """While a command ran, the guest's control shell did not answer `true` either: the whole guest
    stopped, not only the command (see ChannelSetup.heartbeat)."""


class SshError(ChannelError):
    """A guest's SSH server could not be reached or refused the session key."""

    def __init__(self, message: str, *, rejected_key: bool = False) -> None:
        super().__init__(message)
        self.rejected_key = rejected_key


class LoginFailed(ChannelError):
    """The serial console refused the login, or no shell prompt came."""


class CommandTimeout(NestedKvmError):
    """A command ran past its timeout. Where the guest's control shell killed it and the rest of
    its reply came within deadline.KILL_GRACE, the channel stays usable; otherwise the channel is
    broken (the message says so) and the guest is replaced before its next user."""

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
