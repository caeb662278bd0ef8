"""--nested-qemu: the user's QEMU for each level, here two copies of L0's QEMU laid out as build
trees (a binary and its pc-bios/), so no QEMU has to be built. L1 runs on the first, L2 (inside
L1, through the guests' read-only share) on the second: each proven by the process's executable
and by QMP's query-version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

INNER = """
from pathlib import Path

BUILDS = {builds!r}


def test_each_level_runs_its_own_qemu(l1, l2):
    assert Path(f"/proc/{{l1.process.pid}}/exe").resolve() == Path(BUILDS[0], "qemu-system-x86_64")
    inner_pid = l1.succeed(f"cat {{l2.process.workdir}}/pid").strip()
    assert l1.succeed(f"readlink /proc/{{inner_pid}}/exe").strip() == str(Path(BUILDS[1], "qemu-system-x86_64"))
    for guest in (l1, l2):
        assert guest.qmp().command("query-version")["qemu"]["major"] >= 6
    assert l2.qmp().query_kvm()["enabled"] is True
    assert l2.succeed("echo on the second build") == "on the second build\\n"
"""


def build_tree(where: Path) -> Path:
    """A directory laid out as a QEMU build: qemu-system-x86_64, pc-bios/ with the firmware, and
    qemu-bundle/, where a binary run from its build tree finds its modules and data (here the
    installed ones: Debian's QEMU loads TCG as a module)."""
    (where / "qemu-bundle").mkdir(parents=True)
    (where / "qemu-bundle" / "usr").symlink_to("/usr")
    shutil.copy2(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64", where / "qemu-system-x86_64")
    (where / "pc-bios").mkdir()
    for firmware in Path("/usr/share/qemu").iterdir():
        (where / "pc-bios" / firmware.name).symlink_to(firmware)
    return where


@pytest.mark.nested(level=2)
def test_l1_and_l2_run_the_qemu_builds_given_for_them(pytester: pytest.Pytester) -> None:
    builds = [build_tree(pytester.path / "build-l1"), build_tree(pytester.path / "build-l2")]
    inner = pytester.makepyfile(INNER.format(builds=[str(b) for b in builds]))
    result = pytester.runpytest_subprocess(inner.name, "-p", "no:cacheprovider", "--nested-levels=2",
                                           f"--nested-qemu={builds[0]},{builds[1]}",
                                           f"--junit-xml={pytester.path / 'junit.xml'}")
    result.assert_outcomes(passed=1)
    version = result.stdout.str().split("QEMU ", 1)[1].split()[0]  # L1's, from the plan line
    result.stdout.fnmatch_lines([f"nestedkvm: L2 QEMU {version} {builds[1]}/qemu-system-x86_64"])
    junit = (pytester.path / "junit.xml").read_text()
    assert f'name="nestedkvm_qemu_l2" value="{version} {builds[1]}/qemu-system-x86_64"' in junit
