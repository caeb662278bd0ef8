"""Every benchmark in one command: one table on stdout, JSON in benchmarks/results/run_all.json.

    python benchmarks/run_all.py [--parts boot,crash,checks,virtme] [--virtme-checks 100] [...]

boot    L1, L2, L3 ready and command latency per level (boot_and_latency.py): --runs fresh
        chains through the plugin's pool, medians.
crash   kernel panic -> fresh guest answering, per level up to --crash-levels (crash_recovery.py).
checks  a generated suite of --checks tests, each `l1.succeed(CHECK)`, run as one real pytest
        session (`python -m pytest --nested-levels=1`) on one reused L1: the session's wall time.
virtme  the same CHECK, one VM per check, with virtme-ng on the same kernel under TCG like L1
        (`vng --run KERNEL --disable-kvm --exec CHECK`), --virtme-checks VMs one after another.
        With fewer than --checks VMs, the total is scaled up to --checks and the table says so.
        Needs `.venv/bin/pip install virtme-ng`, qemu-system-x86_64, busybox and a readable kernel.
With both checks and virtme, the table ends with the ratio of the two totals (bar: <= 0.1).
Timings are wall clock on a shared machine: the table gives the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boot_and_latency
import crash_recovery
from generated_suite import load, machine, run_suite, write_suite

from pytest_nestedkvm.boot.initramfs import find_kernel

PARTS = ("boot", "crash", "checks", "virtme")
RESULT = Path(__file__).parent / "results" / "run_all.json"
Rows = list[tuple[str, str]]


def boot_part(args: argparse.Namespace, results: dict[str, object]) -> Rows:
    runs = [boot_and_latency.one_run(args.levels, args.commands) for _ in range(args.runs)]
    summary, rows = boot_and_latency.summarize(runs)
    results["boot"] = {"runs": runs, "median": summary}
    return [(boot_figure(key, args), value) for key, value in rows]


def boot_figure(key: str, args: argparse.Namespace) -> str:
    """'L2 ready s' -> 'L2 ready from L1 ready (median of 3 runs)'; latency rows say how many round trips."""
    if "latency" in key:
        return f"{key} ({args.commands} round trips, median of {args.runs} runs)"
    level = int(key[1])
    return f"{key.removesuffix(' s')} from {'QEMU start' if level == 1 else f'L{level - 1} ready'} " \
           f"(median of {args.runs} runs)"


def crash_part(args: argparse.Namespace, results: dict[str, object]) -> Rows:
    figures = crash_recovery.measure(args.crash_levels, args.crash_runs)
    results["crash"] = figures
    return [(f"L{level} crash recovery", crash_recovery.describe(lists)) for level, lists in figures.items()]


def checks_part(args: argparse.Namespace, results: dict[str, object]) -> Rows:
    with tempfile.TemporaryDirectory(prefix="bench-checks-") as tmp:
        write_suite(Path(tmp), {f"check-{i:03}": args.check for i in range(args.checks)})
        run = run_suite(Path(tmp), "--nested-levels=1")
    results["checks"] = {"seconds": run.seconds, "tests": run.tests, "passed": run.passed, "check": args.check}
    if run.passed != args.checks:
        print(f"checks: {run.passed} of {args.checks} passed; pytest said:\n{run.output_tail}", file=sys.stderr)
    return [(f"{args.checks} checks, one pytest session on a reused L1",
             f"{run.seconds:.1f} s total, {run.passed}/{args.checks} passed "
             f"(whole session: pytest start, L1 boot, tests, teardown)")]


def virtme_problems(vng: Path | None, kernel: Path) -> list[str]:
    """What virtme-ng lacks here, each with the fix."""
    problems = []
    if vng is None:
        problems.append("virtme-ng is not installed: .venv/bin/pip install virtme-ng")
    if shutil.which("qemu-system-x86_64") is None:
        problems.append("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    if not any(shutil.which(name) for name in ("busybox-static", "busybox.static", "busybox")):
        problems.append("virtme-ng builds its initramfs with busybox, not found: apt-get install busybox-static")
    if not os.access(kernel, os.R_OK):
        problems.append(f"{kernel} is not readable by you: run as root (as tested here) or make it readable")
    if not os.access(tempfile.gettempdir(), os.W_OK):
        problems.append(f"virtme-ng writes its return-code file to {tempfile.gettempdir()}: make it writable "
                        "or set TMPDIR")
    return problems


def virtme_part(args: argparse.Namespace, results: dict[str, object]) -> Rows:
    kernel = find_kernel().path  # the plugin's default kernel: the one the checks suite boots
    installed = Path(sys.executable).parent / "vng"
    vng = installed if installed.exists() else (Path(found) if (found := shutil.which("vng")) else None)
    problems = virtme_problems(vng, kernel)
    if problems or vng is None:
        sys.exit("virtme-ng cannot run here:\n  " + "\n  ".join(problems))
    # vng starts virtme-run (installed beside it) through PATH.
    env = {**os.environ, "PATH": f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = [str(vng), "--run", str(kernel), "--disable-kvm", "--exec", args.check]
    seconds: list[float] = []
    passed = 0
    for number in range(1, args.virtme_checks + 1):
        started = time.monotonic()
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        seconds.append(time.monotonic() - started)
        passed += done.returncode == 0
        if done.returncode != 0 and passed == 0:
            sys.exit(f"virtme-ng check {number} exited {done.returncode}: {' '.join(argv)}\n{done.stderr[-2000:]}")
        if number % 10 == 0:
            print(f"virtme-ng: {number}/{args.virtme_checks} VMs, {sum(seconds):.0f} s", file=sys.stderr)
    measured = sum(seconds)
    total = measured / len(seconds) * args.checks
    results["virtme"] = {"argv": argv, "seconds": seconds, "passed": passed, "measured_s": measured,
                         "total_s": total, "scaled": len(seconds) != args.checks}
    per_vm = f"{statistics.median(seconds):.1f} s per VM (median)"
    if len(seconds) == args.checks:
        value = f"{total:.1f} s total, {passed}/{len(seconds)} passed, {per_vm}"
    else:
        value = (f"{total:.1f} s total SCALED from {len(seconds)} VMs measured ({measured:.1f} s, "
                 f"{passed}/{len(seconds)} passed) x {args.checks}/{len(seconds)}; {per_vm}")
    return [(f"{args.checks} checks, virtme-ng, one VM per check", value)]


def ratio_rows(results: dict[str, object]) -> Rows:
    checks, virtme = results["checks"], results["virtme"]
    assert isinstance(checks, dict) and isinstance(virtme, dict)
    ratio = checks["seconds"] / virtme["total_s"]
    results["ratio"] = ratio
    verdict = "met" if ratio <= 0.1 else "NOT met"
    return [("ratio: reused L1 / virtme-ng", f"{ratio:.3f} (1 : {1 / ratio:.0f}); bar <= 0.10 {verdict}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    parser.add_argument("--levels", type=int, default=3, help="boot: deepest level (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="boot: fresh chains (default 3)")
    parser.add_argument("--commands", type=int, default=200, help="boot: latency round trips per command")
    parser.add_argument("--crash-levels", type=int, default=2, help="crash: deepest level (default 2)")
    parser.add_argument("--crash-runs", type=int, default=3, help="crash: panics per level (default 3)")
    parser.add_argument("--checks", type=int, default=100, help="checks: tests in the suite (default 100)")
    parser.add_argument("--virtme-checks", type=int, default=100, help="virtme: VMs to run (default 100)")
    parser.add_argument("--check", default="grep -qw svm /proc/cpuinfo", help="the check command, both sides")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.virtme_checks < 1 or args.checks < 1:
        parser.error("--checks and --virtme-checks must be at least 1")
    info, date, kernel = machine(), time.strftime("%Y-%m-%d %H:%M %Z"), find_kernel().release
    results: dict[str, object] = {"date": date, "machine": info, "args": vars(args)}
    measure = {"boot": boot_part, "crash": crash_part, "checks": checks_part, "virtme": virtme_part}
    rows: Rows = []
    for part in PARTS:
        if part in parts:
            print(f"running {part} (load average {load()})", file=sys.stderr)
            rows += measure[part](args, results)
    if "checks" in results and "virtme" in results:
        rows += ratio_rows(results)
    results["load_end"] = load()
    rows.append(("load average (1, 5, 15 min) at start / end", f"{info['load']} / {results['load_end']}"))
    print(f"pytest-nestedkvm benchmarks, {date}: {info['nproc']} cores, {info['cpu']}, host kernel "
          f"{info['host_kernel']}, guest kernel {kernel}, check `{args.check}`")
    width = max(len(name) for name, _ in rows)
    print(f"| {'figure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2, default=str))
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
