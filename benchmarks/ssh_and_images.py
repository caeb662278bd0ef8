"""SSH and disk-image figures (prints a table, writes JSON).

    python benchmarks/ssh_and_images.py [--runs 3] [--levels 2] [--image debian.qcow2] [--mib 50]

Built-in guests, per level: shell channel ready -> `guest.ssh` connected (sshd started in
the guest, port read over QMP, L2 through L1), and `put`/`get` of a --mib file checked
byte for byte. With --image (e.g. the one `python tests/images.py` builds): that image
as L1, QEMU start to first command over its SSH channel, and the command round trip; with
--image-levels 2 (the image needs QEMU, as the test image has), L2 inside it: image ready ->
first L2 command result (the image readied and L2's boot files copied in through a port, L2 booted,
KVM checked), that preparation alone, the L2 command round trip, and a panic of L2 -> a fresh
L2 answering (nothing copied again). --image-l2-kernel FILE boots that L2 from FILE instead
(e.g. /boot/vmlinuz-*: an eighth of the PVH vmlinux to copy, but it unpacks itself, emulated).
--image-login USER:PASSWORD reaches the image by a serial console login instead of SSH.
Each run boots fresh guests through the plugin's pool. Medians over runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from boot_and_latency import latency, session_for

from pytest_nestedkvm.boot.qemu import GuestSpec
from pytest_nestedkvm.lab import Lab, LabHooks
from pytest_nestedkvm.machine import hosting

RESULT = Path(__file__).parent / "results" / "ssh_and_images.json"


def builtin_run(levels: int, mib: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    session = session_for(levels=str(levels))
    with tempfile.TemporaryDirectory() as scratch:
        payload, back = Path(scratch, "payload"), Path(scratch, "back")
        payload.write_bytes(os.urandom(mib << 20))
        try:
            for level in range(1, levels + 1):
                guest = session.guest(level)
                started = time.monotonic()
                guest.ssh  # noqa: B018 (first use: sshd starts, the client connects)
                figures[f"L{level} shell ready -> SSH ready s"] = time.monotonic() - started
                started = time.monotonic()
                guest.put(payload, "/tmp/payload")
                figures[f"L{level} put {mib} MiB s"] = time.monotonic() - started
                started = time.monotonic()
                guest.get("/tmp/payload", back)
                figures[f"L{level} get {mib} MiB s"] = time.monotonic() - started
                if back.read_bytes() != payload.read_bytes():
                    raise SystemExit(f"L{level}: the file came back different")
                guest.succeed("rm /tmp/payload")
        finally:
            session.close()
    return figures


def image_run(
    image: Path, commands: int, levels: int, l2_kernel: Path | None = None, login: str | None = None,
) -> dict[str, float]:
    session = session_for(levels=str(levels), l1_image=str(image), **({"login": login} if login else {}))
    if l2_kernel is not None:
        session.hooks = LabHooks(guest_spec=partial(_l2_kernel, l2_kernel))
    try:
        guest = session.guest(1)
        figures = {"image L1 ready s": guest.boot_seconds or 0.0}
        for command in ("true", "cat /proc/uptime"):
            figures[f"image L1 {command!r} median ms"] = latency(guest, command, commands)["median_ms"]
        if levels >= 2:
            figures |= image_l2(session, commands)
    finally:
        session.close()
    return figures


def _l2_kernel(kernel: Path, level: int, spec: GuestSpec) -> GuestSpec:
    """L2's spec with `kernel` copied in and booted in place of the plugin's boot image."""
    if level != 2 or spec.kernel is None:
        return spec
    inside = str(spec.kernel.with_name(kernel.name))
    uploads = tuple((kernel, inside) if there == str(spec.kernel) else (local, there) for local, there in spec.uploads)
    return dataclasses.replace(spec, kernel=Path(inside), uploads=uploads)


def image_l2(session: Lab, commands: int) -> dict[str, float]:
    """L2 inside the image L1 that `session` runs: ready, its preparation, round trip, after a panic."""
    prepared: list[float] = []
    prepare = hosting.prepare

    def timed(*args: Any) -> None:
        started = time.monotonic()
        prepare(*args)
        prepared.append(time.monotonic() - started)

    hosting.prepare = timed  # looked up when L2's process is made
    try:
        started = time.monotonic()
        guest = session.guest(2)
        figures = {"image L2 ready s": time.monotonic() - started, "image L2 preparation + copy s": sum(prepared)}
    finally:
        hosting.prepare = prepare
    figures["image L2 'true' median ms"] = latency(guest, "true", commands)["median_ms"]
    guest.crash()
    started = time.monotonic()
    session.guest(2)
    figures["image L2 panic -> fresh L2 s"] = time.monotonic() - started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--image-levels", type=int, default=1, choices=(1, 2))
    parser.add_argument("--image-l2-kernel", type=Path)
    parser.add_argument("--image-login")
    parser.add_argument("--commands", type=int, default=100)
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        figures = builtin_run(args.levels, args.mib) if args.levels else {}
        if args.image is not None:
            figures |= image_run(args.image, args.commands, args.image_levels, args.image_l2_kernel,
                                 args.image_login)
        runs.append(figures)
    print(f"pytest-nestedkvm SSH and images, {args.runs} runs ({os.cpu_count()} cores, {platform.node()})")
    width = max(len(key) for key in runs[0])
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = statistics.median(values)
        print(f"  {key:<{width}}  {summary[key]:8.2f}  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps({"runs": runs, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
