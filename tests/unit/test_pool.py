"""GuestPool: a boot that fails is not tried again by the pool (the session decides whether the
test earns a rerun); it is kept in `boot_failures`, and the next user gets a fresh boot."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from pytest_nestedkvm.base.errors import BootError, LevelUnavailable
from pytest_nestedkvm.machine.guest import Guest
from pytest_nestedkvm.machine.pool import GuestPool, LifecycleHooks


class FakeGuest:
    """An L1 whose first `failures` starts end in a reset."""

    def __init__(self, failures: int) -> None:
        self.spec = SimpleNamespace(accel="kvm", cpu="host", domu=False, runs_as="kvm, -cpu host")
        self.level, self.parent, self.boot_seconds, self.alive = 1, None, 1.0, False
        self.failures, self.starts, self.closes = failures, 0, 0

    def start(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise BootError("l1 died while booting", level=1, why="reset", exit_status=0)
        self.alive = True

    def close(self) -> None:
        self.closes += 1


def test_a_failed_boot_is_recorded_not_retried() -> None:
    guest = FakeGuest(failures=1)
    pool = GuestPool(lambda level, parent: cast(Guest, guest), [].append)
    with pytest.raises(BootError) as raised:
        pool.get(1)
    assert guest.starts == 1
    assert pool.boot_failures == [(guest, raised.value)]


def test_the_next_user_gets_a_fresh_boot_and_the_record_is_the_callers_to_clear() -> None:
    guest = FakeGuest(failures=1)
    said: list[str] = []
    pool = GuestPool(lambda level, parent: cast(Guest, guest), said.append)
    with pytest.raises(BootError):
        pool.get(1)
    pool.boot_failures.clear()
    assert pool.get(1) is cast(Guest, guest)
    assert (guest.starts, guest.closes, guest.alive) == (2, 1, True)
    assert said == ["L1 is down; starting a fresh one", "L1 ready in 1.0 s (kvm, -cpu host)"]
    assert pool.boot_failures == []


def test_a_teardown_hook_that_raises_still_stops_every_guest_and_is_raised_after() -> None:
    guests = {level: FakeGuest(failures=0) for level in (1, 2)}
    for level, guest in guests.items():
        guest.level, guest.alive = level, True

    def teardown(guest: Guest) -> None:
        raise RuntimeError(f"teardown of L{guest.level} failed")

    pool = GuestPool(lambda level, parent: cast(Guest, guests[level]), [].append,
                     hooks=LifecycleHooks(guest_teardown=teardown))
    pool.guests.update({level: cast(Guest, guest) for level, guest in guests.items()})  # both running
    with pytest.raises(RuntimeError, match="teardown of L2 failed"):  # the first, the deepest
        pool.close()
    assert [g.closes for g in guests.values()] == [1, 1] and pool.guests == {}


class UnrunnableGuest(FakeGuest):
    """An L2 whose parent cannot run it (a disk image without QEMU): never started, nothing says it ended."""

    def start(self) -> None:
        raise LevelUnavailable("no QEMU in the image", level=2)


def test_a_level_its_parent_cannot_run_is_asked_for_again_by_each_user_never_handed_out() -> None:
    made: list[UnrunnableGuest] = []

    def new(level: int, parent: Guest | None) -> Guest:
        made.append(UnrunnableGuest(failures=0))
        made[-1].level, made[-1].parent, made[-1].alive = level, parent, True
        return cast(Guest, made[-1])

    l1 = FakeGuest(failures=0)
    l1.alive = True
    pool = GuestPool(new, [].append)
    pool.guests[1] = cast(Guest, l1)
    for _ in range(2):
        with pytest.raises(LevelUnavailable):
            pool.get(2)
    assert len(made) == 2 and 2 not in pool.guests and pool.boot_failures == []
