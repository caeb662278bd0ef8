"""One way to wait: a Deadline that travels down from the caller's budget, and one retry helper.

A boot or a command gets a budget once (the boot and command timeouts); every wait
below it takes the time that is left, or a share of it, never a fixed number of
seconds of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, and the budget it was made from (for messages)."""

    at: float
    budget: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def share(self, seconds: float) -> Deadline:
        """A deadline for one step: at most `seconds` from now, and never past this one."""
        return Deadline(min(self.at, time.monotonic() + seconds), self.budget)


def retry(
    what: str, check: Callable[[], T | None], deadline: Deadline, *, interval: float = 0.05,
    last_seen: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something truthy, and return that; the one bounded wait loop.

    `check` may raise to stop waiting (a guest found dead). On timeout, TimeoutError says
    what was awaited, for how long, and, when given, what was last seen.
    """
    while True:
        value = check()
        if value:
            return value
        if deadline.expired():
            seen = f"; last seen:\n{last_seen()}" if last_seen else ""
            raise TimeoutError(f"{what} did not happen within {deadline.budget:g} s{seen}")
        time.sleep(min(interval, deadline.remaining()) or interval)
