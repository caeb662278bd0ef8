"""Fakes shared by several test modules (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest


def fake_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A qemu-system-<arch> first on PATH that records each call and answers only --version;
    returns the file its calls go to (it exists once QEMU was called)."""
    called, bin_dir = tmp_path / "qemu-called", tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / f"qemu-system-{platform.machine()}"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {called}\necho 'QEMU emulator version 7.2.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return called
