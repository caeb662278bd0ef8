"""The run directories of sessions that were killed: removed by the next session, when they are
this user's (by uid: an owner without a passwd entry is no error) and their pytest is gone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pytest_nestedkvm import lab
from pytest_nestedkvm.base.errors import HostError
from pytest_nestedkvm.config.settings import Settings


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


def test_a_temporary_directory_too_long_for_the_sockets_is_refused_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deepest guest's console socket must fit a UNIX socket's 107 bytes; QEMU would otherwise
    refuse every boot, each with a line of its own."""
    long = tmp_path / ("d" * (110 - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    session = lab.Lab(Settings.from_sources({}, env={}))
    with pytest.raises(HostError) as refused:
        session.run_root  # noqa: B018 (made when first wanted)
    message = str(refused.value)
    assert message.startswith(f"the temporary directory {long} is too long for the guests' sockets: ")
    assert message.endswith("bytes (e.g. /tmp)") and "point TMPDIR at a directory of at most" in message
    assert list(long.iterdir()) == []


def test_the_longest_temporary_directory_that_fits_is_taken() -> None:
    allowed = int(_refusal(Path("/" + "d" * 100)).split("at most ")[-1].split(" bytes")[0])
    fits = Path("/" + "e" * (allowed - 1))  # only its length matters: nothing is made
    assert len(str(fits)) == allowed
    lab.check_socket_room(fits / f"nestedkvm-{os.getpid()}-xxxxxxxx")  # no error
    with pytest.raises(HostError):
        lab.check_socket_room(Path(f"{fits}e") / f"nestedkvm-{os.getpid()}-xxxxxxxx")


def _refusal(temp: Path) -> str:
    with pytest.raises(HostError) as refused:
        lab.check_socket_room(temp / f"nestedkvm-{os.getpid()}-xxxxxxxx")
    return str(refused.value)
