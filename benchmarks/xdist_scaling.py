"""pytest-xdist scaling: one 20-test suite on L1 with `-n 0` and with `-n 2` (each worker boots its own L1).

    python benchmarks/xdist_scaling.py [--runs 3] [--pytest-args='--nested-smp=1'] [--repeat 2]

Both runs are real pytest sessions with `--nested-levels=1` in a subprocess; the figure
is each session's wall time (pytest start, L1 boot(s), tests, teardown), median over
--runs, the two kinds alternating so that both see the same load. The ratio's bar is
-n 2 <= 0.7 x -n 0, judged on the suite as it is (--repeat 1). --pytest-args are added to
both kinds of session; --repeat N runs each test's check N times over, to show how the
ratio moves with the work per test against the fixed cost of a boot per worker.

The 20 tests are the guest work of a kernel/hypervisor check suite, each one shell
script in L1 (busybox ash, host root over 9p) that must exit 0, 0.02 to 1.1 s each
under TCG here, about 10 s in all:
- CPU in the guest's userland: shell arithmetic loops (ash and bash), an awk loop,
  sorting 100000 numbers, counting kernel symbol types from /proc/kallsyms;
- CPU in the guest kernel: sha256 of 8 MiB from /dev/urandom, md5 of 16 MiB of zeros;
- reading /proc and /sys: kallsyms, every process's status, a walk of /sys/devices,
  svm in cpuinfo, kvm_amd loaded with nested=1, the KVM line in dmesg;
- host files over 9p and dynamic programs: gzip round trip of python3, tar of the
  kernel's arch modules, md5 of the kernel, a python3 one-liner.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from generated_suite import load, machine, run_suite, write_suite


def sum_of_squares(n: int) -> str:
    expected = (n - 1) * n * (2 * n - 1) // 6
    return f"i=0; s=0; while [ $i -lt {n} ]; do s=$((s+i*i)); i=$((i+1)); done; test $s = {expected}"


WORK: dict[str, str] = {
    "ash-squares-10k": sum_of_squares(10_000),
    "ash-squares-20k": sum_of_squares(20_000),
    "ash-squares-40k": sum_of_squares(40_000),
    "bash-loop-20k": "bash -c 'for ((i=0; i<20000; i++)); do :; done; test $i = 20000'",
    "awk-loop": "test $(awk 'BEGIN { for (i = 0; i < 200000; i++) s += i % 7; print s }') = 599994",
    "sort-100k": "test $(seq 100000 | sort -rn | head -1) = 100000",
    "kallsyms-types": "awk '{ print $2 }' /proc/kallsyms | sort | uniq -c | sort -rn | grep -qw T",
    "sha256-urandom-8m": "head -c 8388608 /dev/urandom | sha256sum | grep -qE '^[0-9a-f]{64} '",
    "md5-zeros-16m": "dd if=/dev/zero bs=1M count=16 2>/dev/null | md5sum | grep -q ^2c7ab85a893283e98c931e9511add182",
    "kallsyms-count": "test $(wc -l < /proc/kallsyms) -gt 50000",
    "kallsyms-svm": "test $(grep -c ' svm_' /proc/kallsyms) -gt 10",
    "proc-status-all": "test $(for p in /proc/[0-9]*; do cat $p/status; done 2>/dev/null | grep -c ^Name:) -gt 10",
    "sysfs-uevents": "test $(find /sys/devices -name uevent | wc -l) -gt 100",
    "cpuinfo-svm": "grep -qw svm /proc/cpuinfo && test -c /dev/kvm",
    "kvm-amd-nested": "grep -q '^kvm_amd ' /proc/modules && test $(cat /sys/module/kvm_amd/parameters/nested) = 1",
    "dmesg-nested": "dmesg | grep -q 'Nested Virtualization enabled'",
    "gzip-python3": "gzip -c /usr/bin/python3 | gzip -dc | cmp - /usr/bin/python3",
    "tar-arch-modules": "test $(tar -cf - -C /lib/modules/$(uname -r)/kernel arch | wc -c) -gt 1000000",
    "md5-kernel": "md5sum /boot/vmlinuz-$(uname -r) | grep -qE '^[0-9a-f]{32} '",
    "python3-cpus": "test $(python3 -c 'import os; print(os.cpu_count())') -ge 1",
}
KINDS = {"-n 0": ["-n", "0"], "-n 2": ["-n", "2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pytest-args", default="", help="more pytest options for both kinds of session")
    parser.add_argument("--repeat", type=int, default=1, help="run each test's check this many times over")
    args = parser.parse_args()
    work = WORK if args.repeat == 1 else {name: " && ".join([f"( {check} )"] * args.repeat)
                                           for name, check in WORK.items()}
    extra = shlex.split(args.pytest_args)
    info, start = machine(), time.strftime("%Y-%m-%d %H:%M %Z")
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="bench-xdist-") as tmp:
        write_suite(Path(tmp), work)
        for number in range(1, args.runs + 1):
            for kind, kind_args in KINDS.items():
                run = run_suite(Path(tmp), "--nested-levels=1", *kind_args, *extra)
                if run.passed != len(WORK):
                    sys.exit(f"{kind}: {run.passed} of {len(WORK)} tests passed; pytest said:\n{run.output_tail}")
                seconds[kind].append(run.seconds)
                print(f"run {number}, {kind}: {run.seconds:.1f} s (load average {load()})", file=sys.stderr)
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    ratio = medians["-n 2"] / medians["-n 0"]
    print(f"pytest-xdist scaling, {len(WORK)} tests on L1 (each check x{args.repeat}), {args.runs} runs each, "
          f"{start}: {info['nproc']} cores, {info['cpu']}; load average at start {info['load']}, at end {load()}")
    for kind, values in seconds.items():
        print(f"  {' '.join([kind, '--nested-levels=1', *extra])}: {medians[kind]:.1f} s median "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    verdict = f"bar <= 0.70 {'met' if ratio <= 0.7 else 'NOT met'}" if args.repeat == 1 else "(the bar: --repeat 1)"
    print(f"  ratio -n 2 / -n 0: {ratio:.2f}; {verdict}")
    out = Path(__file__).parent / "results" / ("xdist_scaling.json" if args.repeat == 1
                                               else f"xdist_scaling_repeat{args.repeat}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": start, "machine": info, "load_end": load(), "pytest_args": extra,
                               "repeat": args.repeat, "tests": work, "seconds": seconds, "median": medians,
                               "ratio": ratio}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
