"""The fixtures tests ask for. Thin: the pool decides what runs where."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from .errors import NestedKvmError
from .guest import Guest
from .host import HostReport
from .pool import GuestPool

POOL_KEY = pytest.StashKey[GuestPool]()
T = TypeVar("T")


def reported(call: Callable[[int], T], level: int) -> T:
    """`call(level)`, with plugin errors turned into a test error that shows just the message.

    Infrastructure trouble says what and why; the plugin's own stack does not help.
    """
    try:
        return call(level)
    except NestedKvmError as exc:
        error = exc
    pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)


def _pool(config: pytest.Config) -> GuestPool:
    return config.stash[POOL_KEY]


@pytest.fixture(scope="session")
def l0(pytestconfig: pytest.Config) -> HostReport:
    """The host check: KVM, nesting, and the accelerator plan for L1, with reasons."""
    return _pool(pytestconfig).report


@pytest.fixture(scope="session")
def nested_guest(pytestconfig: pytest.Config) -> Callable[[int], Guest]:
    """Factory: `nested_guest(level)` returns the running guest at that level."""
    pool = _pool(pytestconfig)

    def get(level: int) -> Guest:
        return reported(pool.get, level)

    return get


@pytest.fixture(scope="session")
def l1(nested_guest: Callable[[int], Guest]) -> Guest:
    """The L1 guest (QEMU on the host), booted once and reused by every test."""
    return nested_guest(1)


@pytest.fixture(scope="session")
def l2(nested_guest: Callable[[int], Guest]) -> Guest:
    """The L2 guest: QEMU with KVM inside L1, booted once and reused by every test."""
    return nested_guest(2)
