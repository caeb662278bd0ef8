"""Unit tests for deadline.py: Deadline arithmetic and the one retry loop."""

from __future__ import annotations

import time

import pytest

from pytest_nestedkvm.base.deadline import Deadline, retry


def test_after_sets_budget_and_remaining() -> None:
    deadline = Deadline.after(10)
    assert deadline.budget == 10
    assert 9 < deadline.remaining() <= 10
    assert not deadline.expired()


def test_a_past_deadline_is_expired_with_nothing_remaining() -> None:
    deadline = Deadline(time.monotonic() - 1, 5)
    assert deadline.expired()
    assert deadline.remaining() == 0.0


def test_share_takes_at_most_the_seconds_asked() -> None:
    parent = Deadline.after(100)
    step = parent.share(2)
    assert 1 < step.remaining() <= 2
    assert step.budget == 100  # messages still name the caller's budget


def test_share_never_goes_past_the_parent() -> None:
    parent = Deadline.after(1)
    step = parent.share(50)
    assert step.at == parent.at
    assert step.remaining() <= 1


def test_retry_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", "ready", "later"])
    calls = 0

    def check() -> str | int | None:
        nonlocal calls
        calls += 1
        return next(values)

    assert retry("ready", check, Deadline.after(5), interval=0.001) == "ready"
    assert calls == 4


def test_retry_times_out_naming_what_the_budget_and_last_seen() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        retry("the prompt", lambda: None, Deadline.after(0.2), interval=0.01, last_seen=lambda: "login: ")
    assert 0.15 < time.monotonic() - start < 2
    assert str(caught.value) == "the prompt did not happen within 0.2 s; last seen:\nlogin: "


def test_retry_timeout_without_last_seen() -> None:
    with pytest.raises(TimeoutError, match=r"^the socket did not happen within 0\.05 s$"):
        retry("the socket", lambda: False, Deadline.after(0.05), interval=0.01)


def test_retry_checks_at_least_once_even_when_expired() -> None:
    assert retry("x", lambda: 42, Deadline(time.monotonic() - 1, 1)) == 42


def test_an_exception_from_check_stops_the_wait() -> None:
    def check() -> None:
        raise RuntimeError("guest died")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="guest died"):
        retry("boot", check, Deadline.after(30))
    assert time.monotonic() - start < 1
