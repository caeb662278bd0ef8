"""What a failed test leaves behind in --nested-artifacts DIR, one directory per test.

Per guest level: the console while the test ran, the exact QEMU command line as a
runnable script, and the kernel log lines printed since the test started.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .base.errors import NestedKvmError
from .boot.qemu import shell_line
from .machine.forensics import ConsoleMark

if TYPE_CHECKING:
    from .machine.guest import Guest


SECTION = "nestedkvm artifacts"


def directory_for(root: Path, nodeid: str) -> Path:
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")


def report_section(root: Path, nodeid: str, guests: dict[int, Guest], marks: dict[int, ConsoleMark]) -> tuple[str, str]:
    """Save a failed test's artifacts under `root`; the report section saying where, or why they could not
    be saved (a full disk or an unwritable directory must never hide the test's own result)."""
    directory = directory_for(root, nodeid)
    try:
        return SECTION, str(save(directory, guests, marks))
    except (OSError, NestedKvmError) as exc:
        return SECTION, f"artifacts could not be saved in {directory}: {exc}"


def save(directory: Path, guests: dict[int, Guest], marks: dict[int, ConsoleMark]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for level, guest in sorted(guests.items()):
        mark = marks.get(level)
        start = mark.console if mark is not None else guest.console_start
        (directory / f"l{level}-console.log").write_text(guest.console.read(start))
        where = "on the host" if guest.parent is None else f"inside L{level - 1}"
        (directory / f"l{level}-qemu.sh").write_text(
            f"#!/bin/sh\n# L{level}, started {where}\n{shell_line(guest.qemu_argv)}\n"
        )
        if mark is not None and mark.kernel_log_tag is not None and guest.alive:
            dmesg = guest.run("dmesg").stdout
            (directory / f"l{level}-dmesg.txt").write_text(_after_tag(dmesg, mark.kernel_log_tag))
    return directory


def _after_tag(dmesg: str, tag: str) -> str:
    """The kernel log lines after the last line carrying `tag`."""
    lines = dmesg.splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith(tag)]
    kept = lines[starts[-1] + 1:] if starts else lines
    return "\n".join(kept) + "\n" if kept else ""
