#!/usr/bin/env python3
"""Run the FULL kvm-unit-tests x86 list and the FULL KVM selftests list inside L1 (and L2 with
--levels 1,2) and print, per suite and level: passed, skipped (by reason), failed, xfailed, wall time.
`--suites xtf` runs every XTF instance as a domU of a Xen L1 (dom0 is L1: levels do not apply)
and also prints each instance's verdict.

Each (suite, level) is one pytest session of the plugin's own items, with a JUnit report that
this script reads. Trees come from scripts/build_suites.sh (cached). Under TCG it takes long
(each kvm-unit-test 15-30 s, some up to their timeout): run it in the background.

    nohup .venv/bin/python benchmarks/kvm_suites.py --levels 1 > /tmp/kvm_suites.log 2>&1 &
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "scripts" / "build_suites.sh"
KUT_TARBALL = REPO.parent / "shared" / "kvm-unit-tests-1da1819e.tar.xz"
XTF_TARBALL = REPO.parent / "shared" / "xtf-453490d.tar.xz"


def build(*args: str) -> Path | None:
    done = subprocess.run([str(BUILD), *args], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"build_suites.sh {' '.join(args)}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return Path(done.stdout.strip().splitlines()[-1])


def run(option: str, tree: Path, level: int, extra: list[str]) -> tuple[float, Path]:
    work = Path(tempfile.mkdtemp(prefix="kvm-suites-bench-"))
    junit = work / "junit.xml"
    suite = option.removeprefix("--nested-")
    where = ["--nested-hypervisor=xen"] if suite == "xtf" else [f"--nested-{suite}-level={level}"]
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"{option}={tree}",
                    *where, f"--junitxml={junit}", *extra], cwd=work)
    return time.monotonic() - start, junit


XTF_ENVS = ("pv64", "pv32pae", "hvm64", "hvm32pae", "hvm32pse", "hvm32")  # XTF's own order
SHORT = {"passed": "pass", "skipped": "skip", "xfailed": "xfail", "failure": "FAIL", "error": "ERROR"}


def xtf_grid(verdicts: list[tuple[str, str, str]]) -> str:
    """One row per test (and variation), one column per environment: the verdicts at a glance."""
    rows: dict[str, dict[str, str]] = {}
    for name, outcome, message in verdicts:
        env, _, test = name.removeprefix("test-").partition("-")
        word = SHORT[outcome]
        if outcome == "failure" and message.startswith("CRASH"):
            word = "CRASH"
        if outcome == "xfailed" and "[NOTRUN]" in message:
            word = "not run"
        rows.setdefault(test, {})[env] = word
    lines = ["| test | " + " | ".join(XTF_ENVS) + " |", "|---|" + "---|" * len(XTF_ENVS)]
    lines += [f"| {test} | " + " | ".join(cells.get(env, "") for env in XTF_ENVS) + " |"
              for test, cells in rows.items()]
    return "\n".join(lines)


def table(junit: Path) -> tuple[collections.Counter[str], collections.Counter[str], list[str],
                                list[tuple[str, str, str]]]:
    counts: collections.Counter[str] = collections.Counter()
    skips: collections.Counter[str] = collections.Counter()
    failed: list[str] = []
    verdicts: list[tuple[str, str, str]] = []  # (name, outcome, message)
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = found.get("message", "")
                outcome = "xfailed" if tag == "skipped" and found.get("type") == "pytest.xfail" else tag
                if outcome == "skipped":
                    skips[_reason(message)] += 1
                elif outcome in ("failure", "error"):
                    failed.append(f"{case.get('name')}: {message[:140]}")
                verdicts.append((case.get("name", ""), outcome, message))
        if outcome == "passed":
            verdicts.append((case.get("name", ""), "passed", ""))
        counts[outcome] += 1
    return counts, skips, failed, verdicts


def _reason(message: str) -> str:
    """A skip message without the test's name, so equal reasons count together."""
    words = message.split(" ", 2)
    if len(words) == 3 and words[0] == "SKIP" and words[1].endswith(":"):  # XTF's "SKIP <instance>: <reason>"
        return words[2]
    inner = message.partition("(")[2].rpartition(")")[0] if "(" in message else message
    return inner or message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1", help="comma list of levels to run each suite at (default 1)")
    parser.add_argument("--suites", default="kut,kselftests")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    # The suites run against the KVM of the kernel built from source, as in CI (else the host's kernel).
    kernel = build("kernel")
    extra = [f"--nested-kernel={kernel}"] if kernel else []
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: {' '.join(sys.argv)}; L1 kernel: {kernel or 'the host kernel'}")
    trees = {}
    if "kut" in args.suites:
        trees["--nested-kut"] = build("kut", str(KUT_TARBALL)) if KUT_TARBALL.is_file() else None
    if "kselftests" in args.suites:
        trees["--nested-kselftests"] = build("kselftests")
    if "xtf" in args.suites:
        trees["--nested-xtf"] = build("xtf", str(XTF_TARBALL)) if XTF_TARBALL.is_file() else None
    for option, tree in trees.items():
        if tree is None:
            print(f"{option}: no tree, skipped")
            continue
        xtf = option == "--nested-xtf"  # dom0 runs Debian's kernel: the built one has no Xen dom0 support
        for level in [1] if xtf else (int(x) for x in args.levels.split(",")):
            wall, junit = run(option, tree, level, [*([] if xtf else extra), *args.pytest_args])
            counts, skips, failed, verdicts = table(junit)
            print(f"\n## {option.removeprefix('--nested-')} at L{level}: wall {wall:.0f} s")
            print("| outcome | count |\n|---|---|")
            for outcome in ("passed", "skipped", "xfailed", "failure", "error"):
                print(f"| {outcome} | {counts[outcome]} |")
            print("\nskipped by reason:")
            for reason, number in skips.most_common():
                print(f"  {number:3d}  {reason}")
            print("failed:")
            for line in failed:
                print(f"  {line}")
            if xtf:
                print("\n" + xtf_grid(verdicts))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
