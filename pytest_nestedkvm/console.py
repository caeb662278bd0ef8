"""A guest's serial console: a log file QEMU writes, read back for tails and problems."""

from __future__ import annotations

import re
from pathlib import Path

# Lines that mean the kernel under test is in trouble (panic, oops, BUG, KVM WARN).
PROBLEM = re.compile(
    rb"^.*(Kernel panic - not syncing|BUG: |Oops: |general protection fault|WARNING: CPU: ).*$", re.MULTILINE
)


class Console:
    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, start: int = 0, end: int | None = None) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def tail(self, lines: int = 15) -> str:
        """The last `lines` lines, for error messages."""
        size = self.size()
        text = self.read(max(0, size - 64 * 1024))
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def first_problem(self, start: int = 0) -> str | None:
        """The first panic/oops/BUG/WARN line printed at or after byte `start`."""
        try:
            with self.path.open("rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return None
        match = PROBLEM.search(data)
        return match.group(0).decode("utf-8", "replace").strip() if match else None
