"""The run directories of sessions that were killed: removed by the next session, when they are
this user's (by uid: an owner without a passwd entry is no error) and their pytest is gone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pytest_nestedkvm import lab


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def gone_pid() -> int:
    pid = 4_000_000  # above pid_max's default: no such process
    assert not Path(f"/proc/{pid}").exists()
    return pid


def test_a_dead_sessions_run_directory_is_removed_and_a_live_ones_kept(temp: Path) -> None:
    dead, live = temp / f"nestedkvm-{gone_pid()}-abc", temp / f"nestedkvm-{os.getpid()}-def"
    for path in (dead, live):
        (path / "ssh").mkdir(parents=True)
    lab._remove_stale_run_dirs()
    assert not dead.exists() and live.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_a_run_directory_of_an_unknown_uid_is_left_alone_without_an_error(temp: Path) -> None:
    foreign = temp / f"nestedkvm-{gone_pid()}-xyz"
    foreign.mkdir()
    os.chown(foreign, 54321, 54321)  # no passwd entry: Path.owner() would raise KeyError
    lab._remove_stale_run_dirs()
    assert foreign.exists()
