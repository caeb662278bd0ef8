"""Boot and command-latency figures for the built-in guests (prints a table, writes JSON).

    python benchmarks/boot_and_latency.py [--levels 3] [--runs 3] [--commands 200] [--xen]

Each run boots a fresh chain L1 -> L2 -> ... through the plugin's own pool, so the
figures are what a test session sees. "ready" is QEMU start to the first command
result for L1, and parent ready to first command result for deeper levels.
Medians over runs; latency is the median and p95 over `--commands` round trips (a tenth
of them for the 1000-line pipe, a shell loop echoing into `cat`). With --xen each run then
boots a Xen chain too (--nested-hypervisor=xen: L1 is Xen with its dom0, L2 an HVM domU), its
figures named "xen L1 ...": the two hypervisors side by side, on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from pytest_nestedkvm.config.settings import Settings
from pytest_nestedkvm.lab import Lab
from pytest_nestedkvm.machine.guest import Guest

LATENCY_COMMANDS = ("true", "cat /proc/uptime")
# One write per line into a pipe: what the guest's scheduler tuning is for (initramfs.stage2_script).
PIPE_COMMAND = "i=0; while [ $i -lt 1000 ]; do echo $i; i=$((i+1)); done | cat > /dev/null"


def latency(guest: Guest, command: str, count: int) -> dict[str, float]:
    samples = sorted(guest.run(command).duration * 1000 for _ in range(count))
    return {"median_ms": statistics.median(samples), "p95_ms": samples[int(0.95 * (count - 1))]}


def session_for(**options: str) -> Lab:
    """The plugin's own session with these options and the defaults: no NESTEDKVM_* from the environment."""
    return Lab(Settings.from_sources(options, env={}))


def one_run(levels: int, commands: int, hypervisor: str = "kvm") -> dict[str, object]:
    session = session_for(levels=str(levels), hypervisor=hypervisor)
    name = "" if hypervisor == "kvm" else f"{hypervisor} "
    figures: dict[str, object] = {}
    try:
        for level in range(1, levels + 1):
            started = time.monotonic()
            guest = session.guest(level)
            # L1: QEMU start to first command result. Deeper: parent ready to first command result,
            # which includes starting QEMU inside the parent and checking that it uses KVM.
            figures[f"{name}L{level} ready s"] = guest.boot_seconds if level == 1 else time.monotonic() - started
            for command in LATENCY_COMMANDS:
                figures[f"{name}L{level} {command!r}"] = latency(guest, command, commands)
            figures[f"{name}L{level} 1000-line pipe"] = latency(guest, PIPE_COMMAND, max(10, commands // 10))
    finally:
        session.close()
    return figures


def summarize(runs: list[dict[str, object]]) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """Medians over runs, and a printable (name, value) row for each figure."""
    rows: list[tuple[str, str]] = []
    summary: dict[str, object] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if isinstance(values[0], float):
            summary[key] = statistics.median(values)  # type: ignore[type-var]
            rows.append((key, f"{summary[key]:.2f} s (runs: {', '.join(f'{v:.2f}' for v in values)})"))
        else:
            med = statistics.median(v["median_ms"] for v in values)  # type: ignore[index]
            p95 = statistics.median(v["p95_ms"] for v in values)  # type: ignore[index]
            summary[key] = {"median_ms": med, "p95_ms": p95}
            rows.append((f"{key} latency", f"median {med:.1f} ms, p95 {p95:.1f} ms"))
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--xen", action="store_true", help="also a Xen L1 and its L2 domU in each run")
    args = parser.parse_args()
    runs = [one_run(args.levels, args.commands)
            | (one_run(min(args.levels, 2), args.commands, "xen") if args.xen else {}) for _ in range(args.runs)]
    summary, rows = summarize(runs)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, {platform.node()}"
    print(f"pytest-nestedkvm boot/latency, {args.runs} runs, {args.commands} commands each ({machine})")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    out = Path(__file__).parent / "results" / "boot_and_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "runs": runs, "median": summary}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
