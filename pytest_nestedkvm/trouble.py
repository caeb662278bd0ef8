"""The trouble API: what the plugin blamed on a test, and the emulator faults it ran it again for.

A Trouble (machine/forensics.py) rides on the item's stash and, as a plain dict, on the test's
reports, so it also travels from pytest-xdist workers to the controller.
"""

from __future__ import annotations

import pytest

from .machine.forensics import Trouble

TROUBLE_KEY = pytest.StashKey[Trouble]()
RERUNS_KEY = pytest.StashKey[list[Trouble]]()
RERUNS_ATTRIBUTE = "nestedkvm_reruns"  # the troubles that made the plugin run a test again
REPORT_ATTRIBUTE = "nestedkvm_trouble"  # a plain dict on the report


def trouble_of(node: pytest.TestReport | pytest.Item) -> Trouble | None:
    """The trouble the plugin blamed on a test, from its report (any phase) or its item; else None."""
    if isinstance(node, pytest.Item):
        return node.stash.get(TROUBLE_KEY, None)
    data = getattr(node, REPORT_ATTRIBUTE, None)
    return None if data is None else Trouble(**data)


def reruns_of(node: pytest.TestReport | pytest.Item) -> list[Trouble]:
    """The emulator faults that made the plugin run this test again, oldest first (see
    --nested-emulator-reruns); from its item or any report of its last run."""
    if isinstance(node, pytest.Item):
        faults: list[Trouble] = node.stash[RERUNS_KEY] if RERUNS_KEY in node.stash else []
        return list(faults)
    return [Trouble(**data) for data in getattr(node, RERUNS_ATTRIBUTE, [])]
