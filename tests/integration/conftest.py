from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.boot.initramfs import cache_dir

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build_suites.sh"
# pytester points HOME into /tmp, which guests cover with tmpfs: inner sessions keep
# using the real (content-addressed, shareable) boot cache instead.
CACHE_ROOT = cache_dir().parent
# Each of these runs pytest sessions inside L1 that boot guests of their own (minutes per test):
# they run last, so that a quick failure elsewhere shows first.
SLOWEST_LAST = ("test_self_hosting.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in SLOWEST_LAST)  # stable: the order within stays


@pytest.fixture(autouse=True)
def _real_boot_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(CACHE_ROOT))


def qemu_processes() -> set[str]:
    """The QEMUs this session answers for: its descendants, and orphans (a QEMU that outlived
    its pytest is reparented to init). Other processes' guests on a shared machine (a benchmark,
    another session) come and go on their own and are not counted."""
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout
    return {pid for pid in out.split() if _ours_or_orphaned(int(pid))}


def _ours_or_orphaned(pid: int) -> bool:
    me = os.getpid()
    parent = _parent(pid)
    if parent == 1:
        return True
    while parent is not None and parent > 1:
        if parent == me:
            return True
        parent = _parent(parent)
    return False


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone meanwhile
    return int(stat.rpartition(")")[2].split()[1])  # the field after the state; comm may hold spaces


@pytest.fixture
def running_qemus() -> Callable[[], set[str]]:
    """PIDs of the QEMU processes on this machine now."""
    return qemu_processes


@pytest.fixture
def no_qemu_left() -> Iterator[None]:
    """The test must not leave a QEMU process behind (it gets 5 s to go away)."""
    before = qemu_processes()
    yield
    for _ in range(50):
        if qemu_processes() <= before:
            return
        time.sleep(0.1)
    assert qemu_processes() <= before, "a QEMU process outlived the test"


def build(*args: str) -> Path:
    """A tree scripts/build_suites.sh builds once into the cache (instant once built); skips when the
    build says what is missing (exit 2)."""
    done = subprocess.run([str(BUILD), *args], capture_output=True, text=True)
    if done.returncode == 2:
        pytest.skip(f"build_suites.sh {args[0]}: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def kernel_tree() -> str:
    """The kernel built from source (linux-source-6.1, our fragment, LKDTM in it) as L1 and L2: what a
    kernel CI runs."""
    return f"--nested-kernel={build('kernel')}"
