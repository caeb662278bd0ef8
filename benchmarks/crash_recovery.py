"""Crash recovery figures: from a real kernel panic to the next test's guest answering.

    python benchmarks/crash_recovery.py [--runs 5] [--levels 2]

For each level: panic the guest (sysrq-c), then do what the plugin does before the
next test (notice it is down, boot it again from its pristine spec) and time until
it answers a command. Printed beside that level's fresh boot time, medians over runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from pytest_nestedkvm.host import find_qemu, probe
from pytest_nestedkvm.pool import GuestPool
from pytest_nestedkvm.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--levels", type=int, default=2)
    args = parser.parse_args()
    settings = Settings.from_sources({"levels": str(args.levels)}, env={})
    pool = GuestPool(settings, probe(qemu=find_qemu(platform.machine())), progress=lambda _: None)
    boots: dict[int, list[float]] = {level: [] for level in range(1, args.levels + 1)}
    recoveries: dict[int, list[float]] = {level: [] for level in boots}
    try:
        for level in boots:
            pool.get(level)
            for _ in range(args.runs):
                guest = pool.get(level)
                boots[level].append(guest.boot_seconds or 0.0)
                started = time.monotonic()
                guest.crash()
                pool.restore(level)
                pool.get(level).succeed("true")
                recoveries[level].append(time.monotonic() - started)
    finally:
        pool.close()
    print(f"crash recovery, {args.runs} runs ({platform.node()}, {platform.machine()})")
    for level in boots:
        boot, recovery = statistics.median(boots[level]), statistics.median(recoveries[level])
        print(f"  L{level}: panic -> fresh guest answering {recovery:.2f} s (median; runs "
              f"{', '.join(f'{r:.2f}' for r in recoveries[level])}); its boot alone {boot:.2f} s; "
              f"difference {recovery - boot:+.2f} s")


if __name__ == "__main__":
    main()
