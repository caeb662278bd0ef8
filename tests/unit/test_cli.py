"""`python -m pytest_nestedkvm check` on the real host (read-only: it only probes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_nestedkvm.base.host import HostReport

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The package may not be installed: make the checkout importable for the child.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest_nestedkvm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_check_json_matches_exit_code() -> None:
    proc = run_cli("check", "--json")
    data = json.loads(proc.stdout)
    assert set(data) == {*HostReport.__dataclass_fields__, "kernel", "hypervisor"}
    assert data["accel"] in ("kvm", "tcg")
    assert isinstance(data["reasons"], list) and data["reasons"]
    assert proc.returncode == (0 if data["nesting_possible"] else 1), proc.stderr


def test_check_human_form_lists_facts_and_reasons() -> None:
    proc = run_cli("check")
    assert proc.returncode in (0, 1), proc.stderr
    lines = proc.stdout.splitlines()
    keys = [line.split(":", 1)[0] for line in lines if not line.startswith(" ")]
    for key in (
        "arch",
        "kvm_backend",
        "kvm_usable",
        "accel",
        "cpu",
        "qemu",
        "nesting_possible",
        "kernel",
    ):
        assert key in keys
    assert any(line.startswith("  - ") for line in lines)


def test_check_cpu_override_is_reported() -> None:
    # qemu64 has no svm/vmx under TCG; under KVM it is just another model. Either way it is echoed.
    proc = run_cli("check", "--json", "--accel", "tcg", "--cpu", "qemu64")
    data = json.loads(proc.stdout)
    assert (data["accel"], data["cpu"]) == ("tcg", "qemu64")
    assert data["nesting_possible"] is False
    assert proc.returncode == 1


def test_bogus_accel_exits_2_with_one_line() -> None:
    proc = run_cli("check", "--accel", "bogus")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_names_the_hypervisor_and_where_xen_comes_from() -> None:
    data = json.loads(run_cli("check", "--json").stdout)
    assert data["hypervisor"] == "kvm" and "xen" not in data
    data = json.loads(run_cli("check", "--json", "--hypervisor", "xen").stdout)
    assert data["hypervisor"] == "xen"
    assert "Debian's Xen packages" in data["xen"]  # in the cache, or fetched on first use: nothing is fetched here


def test_bogus_hypervisor_exits_2_with_one_line() -> None:
    proc = run_cli("check", "--hypervisor", "bhyve")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip() == ("python -m pytest_nestedkvm check: error: --hypervisor='bhyve': expected one of "
                                   "kvm, xen")


@pytest.mark.skipif(
    not os.path.exists("/sys/module/kvm_pvm"), reason="only on kvm_pvm hosts"
)
def test_accel_kvm_on_pvm_host_exits_2() -> None:
    proc = run_cli("check", "--accel", "kvm")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "kvm_pvm" in proc.stderr


def test_subcommand_is_required() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "COMMAND" in proc.stderr
