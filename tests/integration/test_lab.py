"""The Lab without pytest's session: what benchmarks and scripts use (a real L1)."""

from __future__ import annotations

import pytest

from pytest_nestedkvm.base.errors import LevelUnavailable
from pytest_nestedkvm.config.settings import Settings
from pytest_nestedkvm.lab import Lab


def test_a_lab_boots_l1_and_leaves_nothing_behind_when_closed() -> None:
    with Lab(Settings.from_sources({"levels": "1"}, env={})) as lab:
        guest = lab.guest(1)
        assert guest.succeed("echo from the lab") == "from the lab\n"
        assert lab.guest(1) is guest  # reused, not booted again
        with pytest.raises(LevelUnavailable, match="--nested-levels=2") as caught:
            lab.guest(2)
        assert caught.value.level == 2
        run_root = lab.run_root
    assert not guest.alive
    assert not run_root.exists()  # the session key with it
    lab.close()  # a second close does nothing
