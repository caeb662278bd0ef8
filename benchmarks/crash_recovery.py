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

from boot_and_latency import session_for


def measure(levels: int, runs: int) -> dict[int, dict[str, list[float]]]:
    """Per level: the boot time of the guest that was panicked, and panic -> answering again, per run."""
    session = session_for(levels=str(levels))
    figures: dict[int, dict[str, list[float]]] = {level: {"boot_s": [], "recovery_s": []} for level in
                                                  range(1, levels + 1)}
    try:
        for level, lists in figures.items():
            session.guest(level)
            for _ in range(runs):
                guest = session.guest(level)
                lists["boot_s"].append(guest.boot_seconds or 0.0)
                started = time.monotonic()
                guest.crash()
                session.pool.ensure_running(level)
                session.guest(level).succeed("true")
                lists["recovery_s"].append(time.monotonic() - started)
    finally:
        session.close()
    return figures


def describe(lists: dict[str, list[float]]) -> str:
    boot, recovery = statistics.median(lists["boot_s"]), statistics.median(lists["recovery_s"])
    return (f"panic -> fresh guest answering {recovery:.2f} s (median; runs "
            f"{', '.join(f'{r:.2f}' for r in lists['recovery_s'])}); its boot alone {boot:.2f} s; "
            f"difference {recovery - boot:+.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--levels", type=int, default=2)
    args = parser.parse_args()
    figures = measure(args.levels, args.runs)
    print(f"crash recovery, {args.runs} runs ({platform.node()}, {platform.machine()})")
    for level, lists in figures.items():
        print(f"  L{level}: {describe(lists)}")


if __name__ == "__main__":
    main()
