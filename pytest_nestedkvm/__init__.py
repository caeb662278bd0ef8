"""pytest-nestedkvm: pytest fixtures that boot nested KVM guests (L1, L2, ...) for hypervisor tests.

The names below are the public API; everything else may change between releases.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .channel import CommandResult
from .errors import (
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
from .forensics import Trouble, reruns_of, trouble_of
from .guest import Guest
from .host import HostReport
from .qemu import GuestSpec

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
