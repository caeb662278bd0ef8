"""The fixtures tests ask for. Thin: the session object decides what runs where."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .base.host import HostReport
from .machine.guest import Guest
from .session import SESSION_KEY, NestedSession, reported

POOL_KEY = SESSION_KEY  # deprecated alias (0.1): use SESSION_KEY; the object also has .settings and .report


def _session(config: pytest.Config) -> NestedSession:
    return config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def l0(pytestconfig: pytest.Config) -> HostReport:
    """The host check: KVM, nesting, and the accelerator plan for L1, with reasons."""
    return reported(lambda: _session(pytestconfig).report)


@pytest.fixture(scope="session")
def nested_guest(pytestconfig: pytest.Config) -> Callable[[int], Guest]:
    """Factory: `nested_guest(level)` returns the running guest at that level."""
    session = _session(pytestconfig)

    def get(level: int) -> Guest:
        return reported(session.guest, level)

    return get


@pytest.fixture(scope="session")
def l1(nested_guest: Callable[[int], Guest]) -> Guest:
    """The L1 guest (QEMU on the host), booted once and reused by every test."""
    return nested_guest(1)


@pytest.fixture(scope="session")
def l2(nested_guest: Callable[[int], Guest]) -> Guest:
    """The L2 guest: QEMU with KVM inside L1, booted once and reused by every test."""
    return nested_guest(2)
