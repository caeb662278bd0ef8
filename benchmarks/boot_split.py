"""Where the built-in L1's boot goes, phase by phase, with KVM against TCG in the same run.

    python benchmarks/boot_split.py [--runs 5] [--accel kvm,tcg]   # L1 on this host
    python benchmarks/boot_split.py --inside-l1 [--runs 5]          # issue 13: the same, run inside
                                                                   # an L1 this host boots (a KVM host)

Phases, medians over runs (seconds):
  qemu start   QEMU's exec to its QMP greeting: the guest's own argv with -S, sockets as null chardevs
  firmware     from there until the kernel starts (guest uptime 0)
  kernel       kernel start to /init (decompression is done on the host: PVH boots the ELF vmlinux)
  drivers      /init loading virtio, 9p, pvpanic (kvm loads at the same time)
  mounts       the sealed view's 9p mounts and tmpfs
  ports        waiting for the virtio ports' names
  kvm modules  what is left of loading kvm and kvm_amd/kvm_intel
  stage2       switch_root to the shells on the ports
  channel      stage2 up to the first command's answer on the host
  ready        QEMU's exec to the first command's answer (Guest.boot_seconds)
The guest records its uptime at each phase (layout.BOOT_MARKS); the kernel's start on the host
clock is the first command's midpoint minus the guest's uptime then.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pytest_nestedkvm.base.errors import ConfigError
from pytest_nestedkvm.base.host import probe
from pytest_nestedkvm.boot.initramfs import find_kernel
from pytest_nestedkvm.boot.layout import BOOT_MARKS
from pytest_nestedkvm.config.settings import Settings
from pytest_nestedkvm.lab import Lab

PHASES = ("qemu start", "firmware", "kernel", "drivers", "mounts", "ports", "kvm modules", "stage2", "channel",
          "ready")
MARKS = ("init", "drivers", "mounts", "ports", "kvm", "stage2")
REPO = Path(__file__).resolve().parent.parent
INNER_WORK = "/tmp/boot-split"  # on L1's tmpfs


def qemu_start_seconds(argv: list[str]) -> float:
    """The guest's argv, vCPUs stopped (-S), every socket a null chardev: exec to QMP greeting."""
    quiet = list(argv)
    for i, arg in enumerate(quiet[:-1]):
        if arg == "-chardev":
            quiet[i + 1] = "null," + re.search(r"\bid=[^,]+", quiet[i + 1]).group(0)  # type: ignore[union-attr]
    started = time.monotonic()
    with subprocess.Popen([*quiet, "-S", "-qmp", "stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as qemu:
        assert qemu.stdout is not None and qemu.stdin is not None
        greeting = qemu.stdout.readline()
        seconds = time.monotonic() - started
        qemu.stdin.write('{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
        qemu.stdin.flush()
        qemu.wait(30)
    if '"QMP"' not in greeting:
        raise RuntimeError(f"QEMU did not greet on QMP: {greeting!r}")
    return seconds


def one_boot(options: dict[str, str]) -> dict[str, float]:
    session = Lab(Settings.from_sources(options, env={}))
    try:
        guest = session.guest(1)
        ready_at = time.monotonic()
        assert guest.boot_seconds is not None
        spawned_at = ready_at - guest.boot_seconds
        result = guest.run(f"cat /proc/uptime {BOOT_MARKS}")
        midpoint = time.monotonic() - result.duration / 2
        lines = result.stdout.split()
        uptime = float(lines[0])
        marks = {name: float(value) for name, _, value in (item.partition("=") for item in lines[2:])}
        argv = guest.qemu_argv
    finally:
        session.close()
    kernel_started_at = midpoint - uptime
    qemu = qemu_start_seconds(argv)
    ready_uptime = uptime - (midpoint - ready_at)
    return {
        "qemu start": qemu,
        "firmware": kernel_started_at - spawned_at - qemu,
        "kernel": marks["init"],
        "drivers": marks["drivers"] - marks["init"],
        "mounts": marks["mounts"] - marks["drivers"],
        "ports": marks["ports"] - marks["mounts"],
        "kvm modules": marks["kvm"] - marks["ports"],
        "stage2": marks["stage2"] - marks["kvm"],
        "channel": ready_uptime - marks["stage2"],
        "ready": ready_at - spawned_at,
    }


def measure(configs: dict[str, dict[str, str]], runs: int) -> dict[str, dict[str, list[float]]]:
    """Runs alternate between the configurations, so a noisy minute hits all of them."""
    samples: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in configs}
    for _ in range(runs):
        for name, options in configs.items():
            for phase, seconds in one_boot({**options, "levels": "1"}).items():
                samples[name][phase].append(seconds)
    return samples


def usable_accels(accels: tuple[str, ...]) -> str:
    """Those of `accels` this host can run L1 with; a note on stderr for each left out."""
    usable = []
    for accel in accels:
        try:
            probe(accel=accel)
        except ConfigError as exc:
            print(f"note: no {accel} column: {exc}", file=sys.stderr)
            continue
        usable.append(accel)
    return ",".join(usable)


def configurations(accels: str, variant: str | None, options: dict[str, str]) -> dict[str, dict[str, str]]:
    """One per accelerator, and with --variant ARGS KVM once more with those QEMU arguments."""
    configs = {accel: {**options, "accel": accel} for accel in accels.split(",")}
    if variant:
        configs[f"kvm {variant}"] = {**options, "accel": "kvm", "qemu_args": variant}
    return configs


def table(samples: dict[str, dict[str, list[float]]], title: str) -> str:
    names = list(samples)
    lines = [title, *(f"  {chr(65 + i)}: {name}" for i, name in enumerate(names)),
             f"{'phase':<12}" + "".join(f"{chr(65 + i):>10}" for i in range(len(names)))]
    for phase in PHASES:
        lines.append(f"{phase:<12}" + "".join(f"{statistics.median(samples[n][phase]):>10.3f}" for n in names))
    lines.append("ready, each run: " + "; ".join(
        f"{chr(65 + i)} " + ", ".join(f"{v:.1f}" for v in samples[n]["ready"]) for i, n in enumerate(names)))
    return "\n".join(lines)


def inside_l1(runs: int, variant: str | None) -> None:
    """Boot L1 on this host and run this script inside it, where KVM is kvm_amd on emulated SVM."""
    kernel = find_kernel()
    session = Lab(Settings.from_sources({"levels": "1"}, env={}))
    try:
        l1 = session.guest(1)
        copy = f"{INNER_WORK}/vmlinuz-{kernel.release}"
        l1.succeed(f"mkdir -p {INNER_WORK}/cache")
        l1.put(kernel.path, copy)  # L1 has no /boot
        out = l1.succeed(
            f"cd {INNER_WORK} && XDG_CACHE_HOME={INNER_WORK}/cache TMPDIR=/tmp {shlex.quote(sys.executable)} "
            f"{shlex.quote(str(Path(__file__).resolve()))} --runs {runs} --accel kvm,tcg --json "
            + (f"--variant={shlex.quote(variant)} " if variant else "") +
            f"--kernel {copy} --modules {kernel.modules_dir} --memory 1024 "
            "--boot-timeout 900", timeout=7200)  # TCG inside TCG: minutes per boot on a loaded host
        outer = f"L1 {session.report.accel} -cpu {session.report.cpu}"
    finally:
        session.close()
    samples = json.loads(out.splitlines()[-1])
    print(table(samples, f"inner L1 boot inside {outer}, medians of {runs} runs (s)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", help="comma-separated accelerators to compare (default: kvm,tcg, leaving out "
                        "one this host cannot use, with a note)")
    parser.add_argument("--inside-l1", action="store_true", help="run the comparison inside an L1 of this host")
    parser.add_argument("--kernel", help="--nested-kernel for the measured guest")
    parser.add_argument("--modules", help="--nested-modules for the measured guest")
    parser.add_argument("--memory", help="--nested-memory for the measured guest")
    parser.add_argument("--boot-timeout", help="--nested-boot-timeout for the measured guest")
    parser.add_argument("--variant", metavar="ARGS", help="also KVM with these extra QEMU arguments, e.g. "
                        "'-bios /usr/share/seabios/bios-256k.bin' (the last -bios wins)")
    parser.add_argument("--json", action="store_true", help="print the samples as one JSON line")
    args = parser.parse_args()
    if args.inside_l1:
        inside_l1(args.runs, args.variant)
        return
    options = {name: value for name in ("kernel", "modules", "memory", "boot_timeout")
               if (value := getattr(args, name))}
    try:
        accels = args.accel or usable_accels(("kvm", "tcg"))
        samples = measure(configurations(accels, args.variant, options), args.runs)
    except ConfigError as exc:  # an accelerator asked for by name that this host cannot use
        sys.exit(f"boot_split.py: {exc}")
    print(json.dumps(samples) if args.json else table(samples, f"L1 boot, medians of {args.runs} runs (s)"))


if __name__ == "__main__":
    main()
