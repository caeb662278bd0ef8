"""pytest-xdist: each worker boots its own L1, nothing is shared, the header is printed once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is in the `test` extra: pip install -e .[test]")

pytestmark = [pytest.mark.nested(level=1), pytest.mark.usefixtures("no_qemu_left")]

TESTS = 6  # xdist's load scheduling hands each of two workers a batch of these at once

# Each inner test records, from inside its worker, the L1 it got: its QEMU process,
# what that process has open (sockets, console), the run directory, the guest's boot id.
INNER_SUITE = f"""
import json, os
from pathlib import Path

import pytest


def chardev_paths(argv):
    # Every path= of a -chardev: the sockets and the console file this QEMU uses.
    chardevs = [value for option, value in zip(argv, argv[1:]) if option == "-chardev"]
    return sorted(part.split("=", 1)[1] for spec in chardevs for part in spec.split(",") if part.startswith("path="))


@pytest.mark.parametrize("n", range({TESTS}))
def test_records_its_l1(l1, n, pytestconfig):
    qemu = l1.process
    stat = Path(f"/proc/{{qemu.pid}}/stat").read_text()
    argv = Path(f"/proc/{{qemu.pid}}/cmdline").read_bytes().decode().split("\\0")[:-1]
    record = {{
        "n": n,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "none"),
        "pytest_pid": os.getpid(),
        "qemu_pid": qemu.pid,
        "qemu_ppid": int(stat.rsplit(")", 1)[1].split()[1]),
        "run_root": str(l1.link.run_root),
        "run_root_exists": l1.link.run_root.is_dir(),
        "qemu_paths": chardev_paths(argv),
        "qmp": str(l1.link.paths(1).qmp),
        "boot_id": l1.succeed("cat /proc/sys/kernel/random/boot_id").strip(),
        "echo": l1.succeed(f"echo {{n}}"),
    }}
    out = pytestconfig.rootpath / "records" / f"{{n}}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record))
"""


def _records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json"))]


def test_two_workers_boot_two_separate_l1s(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--nested-levels=1")
    result.assert_outcomes(passed=TESTS)
    records = _records(pytester.path)
    assert sorted(r["n"] for r in records) == list(range(TESTS))
    assert all(r["echo"] == f"{r['n']}\n" for r in records)

    by_worker: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_worker.setdefault(record["worker"], []).append(record)
    assert sorted(by_worker) == ["gw0", "gw1"], "both workers should have run tests"

    l1s = {}
    for worker, seen in by_worker.items():
        # Within a worker: one L1, booted once and reused by each of its tests.
        for key in ("pytest_pid", "qemu_pid", "run_root", "boot_id", "qmp"):
            assert len({str(r[key]) for r in seen}) == 1, f"{worker}: {key} changed between its tests"
        l1 = seen[0]
        assert l1["qemu_ppid"] == l1["pytest_pid"], f"{worker}: its L1 QEMU is not its own child"
        assert l1["run_root_exists"]
        assert l1["qemu_paths"], f"{worker}: its QEMU has no -chardev path"
        for path in [*l1["qemu_paths"], l1["qmp"]]:
            assert Path(path).is_relative_to(l1["run_root"]), f"{worker}: {path} outside its run dir"
        l1s[worker] = l1

    first, second = l1s["gw0"], l1s["gw1"]
    assert first["pytest_pid"] != second["pytest_pid"]
    assert first["qemu_pid"] != second["qemu_pid"]
    assert first["boot_id"] != second["boot_id"]  # two kernels booted, not one guest seen twice
    run_roots = [Path(first["run_root"]), Path(second["run_root"])]
    assert not run_roots[0].is_relative_to(run_roots[1]) and not run_roots[1].is_relative_to(run_roots[0])
    assert not set(first["qemu_paths"]) & set(second["qemu_paths"]), "the two L1s share a socket or file"
    for run_root in run_roots:
        assert not run_root.exists(), f"{run_root} outlived the session"

    # The plan comes from the controller alone (what its workers used), each of its lines once.
    header = [line for line in result.outlines if line.startswith("nestedkvm: ") and " ready in " not in line]
    assert any(line.startswith("nestedkvm: L1 accel=") for line in header), result.outlines[:20]
    assert header.count("nestedkvm: levels 1") == 1
    assert len(header) == len(set(header)), header
