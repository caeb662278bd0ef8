"""pytest-nestedkvm: pytest fixtures that boot nested KVM guests (L1, L2, ...) for hypervisor tests.

The names below are the public API; everything else may change between releases.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _moved
from .base.errors import (
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestCrashed,
    GuestWedged,
    HostError,
    LoginFailed,
    NestedKvmError,
    SshError,
)
from .base.host import HostReport
from .boot.qemu import GuestSpec
from .machine.channel import CommandResult
from .machine.forensics import Trouble
from .machine.guest import Guest
from .trouble import reruns_of, trouble_of

_moved.install()  # the 0.x flat module names, for one release

try:
    __version__ = version("pytest-nestedkvm")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BootError",
    "ChannelError",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "Guest",
    "GuestCrashed",
    "GuestSpec",
    "GuestWedged",
    "HostError",
    "HostReport",
    "LoginFailed",
    "NestedKvmError",
    "SshError",
    "Trouble",
    "__version__",
    "reruns_of",
    "trouble_of",
]
