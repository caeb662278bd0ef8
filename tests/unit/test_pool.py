"""GuestPool's boot retry: only a reset (no panic) of a KVM guest on emulated SVM is booted again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from pytest_nestedkvm.errors import BootEnd, BootError
from pytest_nestedkvm.guest import Guest
from pytest_nestedkvm.host import Accel
from pytest_nestedkvm.pool import NESTED_BOOT_ATTEMPTS, GuestPool


class FakeGuest:
    """An L1 whose first `failures` starts end with `why`."""

    def __init__(self, accel: str, failures: int, why: BootEnd) -> None:
        self.spec = SimpleNamespace(accel=accel, cpu="host")
        self.level, self.parent, self.boot_seconds, self.alive = 1, None, 1.0, False
        self.failures, self.why, self.starts = failures, why, 0

    def start(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise BootError("l1 died while booting", level=1, why=self.why, exit_status=0)
        self.alive = True


def boot(pace: Accel, guest: FakeGuest) -> list[str]:
    said: list[str] = []
    pool = GuestPool(lambda level, parent: cast(Guest, guest), said.append, pace=pace)
    pool.get(1)
    return said


def test_kvm_on_an_emulated_cpu_boots_again_after_a_reset_and_says_so() -> None:
    guest = FakeGuest("kvm", failures=1, why="reset")
    said = boot("tcg", guest)
    assert guest.starts == 2 and guest.alive
    assert said[0] == "L1 reset while booting (attempt 1); booting it again"


@pytest.mark.parametrize(
    ("pace", "accel", "why"),
    [("kvm", "kvm", "reset"),   # hardware KVM: a reset may be the code under test
     ("tcg", "tcg", "reset"),   # TCG's own guest runs on no SVM
     ("tcg", "kvm", "crashed")],  # a panic is never retried
)
def test_other_boot_failures_are_not_retried(pace: Accel, accel: str, why: Any) -> None:
    guest = FakeGuest(accel, failures=1, why=why)
    with pytest.raises(BootError):
        boot(pace, guest)
    assert guest.starts == 1


def test_retries_end_after_the_last_attempt() -> None:
    guest = FakeGuest("kvm", failures=NESTED_BOOT_ATTEMPTS, why="reset")
    with pytest.raises(BootError):
        boot("tcg", guest)
    assert guest.starts == NESTED_BOOT_ATTEMPTS
