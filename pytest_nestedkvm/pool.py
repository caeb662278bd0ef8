"""The session's guests: what to boot at each level, started on first use and reused.

A guest found dead before a test is started again from its pristine spec (every
disk is -snapshot and the built-in root is read-only, so a restart is a clean slate).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .guest import Guest
from .host import HostReport
from .initramfs import boot_image, build_initramfs, find_kernel
from .qemu import QBOOT, GuestSpec
from .settings import Settings

log = logging.getLogger("pytest_nestedkvm.pool")

# Seconds to first command: TCG boots are slow, and each level multiplies the cost.
BOOT_TIMEOUT = {"kvm": 30.0, "tcg": 90.0}


class GuestPool:
    def __init__(self, settings: Settings, report: HostReport, progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.report = report
        self.progress = progress or log.info
        self.run_root = Path(tempfile.mkdtemp(prefix="nestedkvm-"))  # 0700, private to this process
        self.guests: dict[int, Guest] = {}

    def skip_reason(self, level: int) -> str | None:
        """Why a test at `level` cannot run in this session, or None."""
        if level > self.settings.levels:
            return (f"needs L{level}, but this session provides up to L{self.settings.levels} "
                    f"(run with --nested-levels={level})")
        if self.report.qemu is None:
            return "QEMU not found: apt-get install qemu-system-x86"
        if level >= 2 and not self.report.nesting_possible:
            return f"L{level} needs nested virtualization, which this host cannot provide: {self.report.nesting_fix}"
        return None

    def spec_for(self, level: int) -> GuestSpec:
        """The built-in guest at `level`: host kernel, plugin initramfs, host root over 9p."""
        assert self.report.qemu is not None
        kernel = find_kernel(self.settings.kernel, self.settings.modules)
        return GuestSpec(
            level=level, qemu=self.report.qemu.binary, accel=self.report.accel, cpu=self.report.cpu,
            memory_mib=self.settings.memory_for(level), smp=self.settings.smp_for(level),
            kernel=boot_image(kernel), initrd=build_initramfs(kernel), append=self.settings.append,
            share_root=Path("/"), firmware=QBOOT if QBOOT.is_file() else None,
        )

    def get(self, level: int) -> Guest:
        """The running guest at `level`, started (or started again) when needed."""
        reason = self.skip_reason(level)
        if reason:
            pytest.skip(reason)
        guest = self.guests.get(level)
        if guest is not None and guest.alive:
            return guest
        if guest is None:
            guest = Guest(
                self.spec_for(level), self.run_root / f"l{level}",
                boot_timeout=self.settings.boot_timeout or BOOT_TIMEOUT[self.report.accel] * level,
                command_timeout=self.settings.command_timeout,
            )
            self.guests[level] = guest
        else:
            self.progress(f"L{level} is down; starting a fresh one")
            guest.close()
        guest.start()
        self.progress(f"L{level} ready in {guest.boot_seconds:.1f} s ({guest.spec.accel}, -cpu {guest.spec.cpu})")
        return guest

    def restart(self, level: int) -> None:
        """Give the next user of `level` a freshly booted guest."""
        guest = self.guests.get(level)
        if guest is not None:
            guest.close()

    def close(self) -> None:
        for guest in reversed(list(self.guests.values())):
            guest.close()
        self.guests.clear()
        shutil.rmtree(self.run_root, ignore_errors=True)
