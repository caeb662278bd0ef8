"""Boot and latency of two revisions side by side, in one run (prints a table, writes JSON).

    python benchmarks/compare_revisions.py OLD_REV [--new WORKTREE] [--levels 2] [--rounds 3] [--commands 200]

OLD_REV is checked out into a temporary git worktree. Each round runs each revision's own
benchmarks/boot_and_latency.py once (one fresh chain, --runs 1), and a whole one-test pytest
session (start to exit: settings, host check, /etc copy, initramfs, boot of L1, one
command, teardown), alternating which goes first, with that revision's package first on
PYTHONPATH: both see the same machine load. The table gives the median over rounds of each
figure and new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = Path("benchmarks") / "boot_and_latency.py"


def one_run(tree: Path, levels: int, commands: int) -> dict[str, object]:
    """One chain booted by the package in `tree`, through that tree's own benchmark script."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env = {k: v for k, v in env.items() if not k.startswith("NESTEDKVM_")}
    subprocess.run([sys.executable, str(tree / SCRIPT), "--levels", str(levels), "--runs", "1",
                    "--commands", str(commands)], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, object] = json.loads((tree / "benchmarks" / "results" / "boot_and_latency.json").read_text())
    return result["runs"][0]  # type: ignore[index, no-any-return]


ONE_TEST = "def test_one(l1):\n    l1.succeed('true')\n"


def one_session(tree: Path, work: Path) -> float:
    """Seconds for `pytest` of a one-test file (it uses L1) with the package in `tree`."""
    (work / "test_one.py").write_text(ONE_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NESTEDKVM_")}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"], cwd=work,
                   env={**env, "PYTHONPATH": str(tree)}, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def figure(value: object) -> float:
    """Seconds for a boot figure, ms (median) for a latency figure."""
    return float(value["median_ms"]) if isinstance(value, dict) else float(value)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("--new", type=Path, default=HERE.parent, help="the tree to compare (default: this one)")
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nk-old-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "-q", "--detach", str(old), args.old],
                       check=True)
        try:
            runs: dict[str, list[dict[str, object]]] = {"old": [], "new": []}
            failures = {"old": 0, "new": 0}
            for round_ in range(args.rounds):
                order = [("old", old), ("new", args.new)]
                for name, tree in order if round_ % 2 == 0 else reversed(order):
                    try:
                        run = one_run(tree, args.levels, args.commands)
                        run["one-test session"] = one_session(tree, Path(tmp))
                        runs[name].append(run)
                    except subprocess.CalledProcessError:  # a guest that wedged: say so, keep measuring
                        failures[name] += 1
                        print(f"round {round_ + 1}: the {name} run failed (its output is above)", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(old)], check=False)
    print(f"{args.old} (old) vs {args.new} (new): medians of {len(runs['old'])} and {len(runs['new'])} runs "
          f"({failures['old']} and {failures['new']} failed), {os.cpu_count()} cores")
    rows = {}
    for key in runs["new"][0]:
        if key not in runs["old"][0]:
            continue
        old_value = statistics.median(figure(run[key]) for run in runs["old"])
        new_value = statistics.median(figure(run[key]) for run in runs["new"])
        unit = "ms" if isinstance(runs["new"][0][key], dict) else "s"
        rows[key] = {"old": old_value, "new": new_value, "unit": unit}
        ratio = new_value / old_value
        print(f"  {key:<28} old {old_value:8.2f} {unit}   new {new_value:8.2f} {unit}   new/old {ratio:.2f}")
    out = HERE / "results" / "compare_revisions.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"old": args.old, "rounds": args.rounds, "failures": failures, "median": rows,
                               "runs": runs}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
