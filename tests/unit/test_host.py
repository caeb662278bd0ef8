"""Unit tests for the L0 probe, on fake procfs/sysfs trees (no real KVM or QEMU needed)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_nestedkvm.base.errors import ConfigError, HostError
from pytest_nestedkvm.base.host import HostReport, QemuInfo, enable_nested, find_qemu, probe

QEMU = QemuInfo(binary="/usr/bin/qemu-system-x86_64", version="7.2.22")
BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep lm nx sse sse2"


def make_tree(
    root: Path,
    *,
    vendor_id: str = "AuthenticAMD",
    flags: str = BASE_FLAGS,
    kvm_device: bool = True,
    modules: Sequence[str] = (),
    nested: dict[str, str] | None = None,
    refcnt: dict[str, str] | None = None,
    model_name: str = "Fake CPU",
) -> Path:
    """A fake root: proc/cpuinfo (two CPUs), optional dev/kvm, sys/module/<name>/..."""
    (root / "proc").mkdir(parents=True)
    cpu = f"vendor_id\t: {vendor_id}\nmodel name\t: {model_name}\nflags\t\t: {flags}\n"
    (root / "proc" / "cpuinfo").write_text(
        f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}", encoding="utf-8"
    )
    (root / "dev").mkdir()
    if kvm_device:
        (root / "dev" / "kvm").write_bytes(b"")
    for name in modules:
        (root / "sys" / "module" / name / "parameters").mkdir(parents=True)
    for name, value in (nested or {}).items():
        (root / "sys" / "module" / name / "parameters" / "nested").write_text(
            value + "\n"
        )
    for name, value in (refcnt or {}).items():
        (root / "sys" / "module" / name / "refcnt").write_text(value + "\n")
    return root


@pytest.fixture
def pvm_host(tmp_path: Path) -> Path:
    """This machine: AMD EPYC VM, no svm/vmx, /dev/kvm from the built-in kvm_pvm."""
    return make_tree(
        tmp_path,
        flags=BASE_FLAGS + " hypervisor lahf_lm sse4a",
        modules=("kvm", "kvm_pvm"),
    )


@pytest.fixture
def intel_host(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path,
        vendor_id="GenuineIntel",
        flags=BASE_FLAGS + " vmx ept",
        modules=("kvm", "kvm_intel"),
        nested={"kvm_intel": "Y"},
        refcnt={"kvm": "1", "kvm_intel": "0"},
    )


@pytest.fixture
def amd_nested_off(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path,
        flags=BASE_FLAGS + " svm npt",
        modules=("kvm", "kvm_amd"),
        nested={"kvm_amd": "0"},
        refcnt={"kvm": "1", "kvm_amd": "0"},
    )


# --- probe: the situations we meet ---------------------------------------------------


def test_pvm_host_falls_back_to_tcg_max(pvm_host: Path) -> None:
    report = probe(pvm_host, qemu=QEMU, arch="x86_64")
    assert report.vendor == "amd"
    assert report.virt_flags == ()
    assert report.in_vm is True
    assert report.kvm_device is True
    assert (
        report.kvm_openable is True
    )  # it opens, and still cannot run an ordinary guest
    assert report.kvm_backend == "kvm_pvm"
    assert report.kvm_usable is False
    assert report.nested is None
    assert (report.accel, report.cpu) == ("tcg", "max")
    assert report.nesting_possible is True
    assert report.nesting_fix is None
    assert "kvm_pvm" in report.reasons[0]
    assert "TCG with -cpu max" in report.reasons[0]


def test_intel_bare_metal_uses_kvm_host(intel_host: Path) -> None:
    report = probe(intel_host, qemu=QEMU, arch="x86_64")
    assert report.vendor == "intel"
    assert report.virt_flags == ("vmx",)
    assert report.in_vm is False
    assert report.kvm_backend == "kvm_intel"
    assert report.kvm_usable is True
    assert report.nested is True
    assert (report.accel, report.cpu) == ("kvm", "host")
    assert report.nesting_possible is True
    assert report.nesting_fix is None
    assert "kvm_intel" in report.reasons[0]


def test_amd_nested_off_gives_modprobe_fix(amd_nested_off: Path) -> None:
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    assert report.vendor == "amd"
    assert report.virt_flags == ("svm",)
    assert report.kvm_backend == "kvm_amd"
    assert report.kvm_usable is True
    assert report.nested is False
    assert (report.accel, report.cpu) == ("kvm", "host")
    assert report.nesting_possible is False
    assert report.nesting_fix is not None
    assert "kvm_amd nested=0" in report.nesting_fix
    assert "`modprobe -r kvm_amd && modprobe kvm_amd nested=1`" in report.nesting_fix
    assert "--nested-enable" in report.nesting_fix


def test_kvm_on_a_tcg_emulated_cpu_is_planned_at_tcgs_pace(tmp_path: Path) -> None:
    """Inside an L1 that QEMU runs under TCG with -cpu max: kvm_amd works, but on an emulated CPU."""
    root = make_tree(tmp_path, flags=BASE_FLAGS + " hypervisor svm", modules=("kvm", "kvm_amd"),
                     nested={"kvm_amd": "1"}, model_name="QEMU TCG CPU version 2.5+")
    report = probe(root, qemu=QEMU)
    assert (report.accel, report.cpu, report.cpu_emulated, report.kvm_on_emulated_cpu) == ("kvm", "host", True, True)
    assert any("QEMU's TCG emulation" in reason for reason in report.reasons)
    assert probe(make_tree(tmp_path / "hw", flags=BASE_FLAGS + " svm", modules=("kvm", "kvm_amd"),
                           nested={"kvm_amd": "1"}, model_name="AMD EPYC 7763"), qemu=QEMU).cpu_emulated is False


def test_builtin_module_fix_is_kernel_command_line(tmp_path: Path) -> None:
    # No refcnt/initstate: kvm_intel is built in, modprobe -r cannot help.
    root = make_tree(
        tmp_path,
        vendor_id="GenuineIntel",
        flags=BASE_FLAGS + " vmx",
        modules=("kvm", "kvm_intel"),
        nested={"kvm_intel": "N"},
    )
    report = probe(root, qemu=QEMU, arch="x86_64")
    assert report.nesting_possible is False
    assert report.nesting_fix is not None
    assert "kvm_intel.nested=1" in report.nesting_fix
    assert "modprobe -r" not in report.nesting_fix


@pytest.mark.parametrize(
    "raw, expected", [("Y", True), ("1", True), ("N", False), ("0", False)]
)
def test_nested_parameter_values(tmp_path: Path, raw: str, expected: bool) -> None:
    root = make_tree(
        tmp_path,
        flags=BASE_FLAGS + " svm",
        modules=("kvm", "kvm_amd"),
        nested={"kvm_amd": raw},
        refcnt={"kvm_amd": "0"},
    )
    report = probe(root, qemu=QEMU, arch="x86_64")
    assert report.nested is expected
    assert report.nesting_possible is expected


def test_no_dev_kvm_uses_tcg_with_reason(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flags=BASE_FLAGS + " svm", kvm_device=False)
    report = probe(root, qemu=QEMU, arch="x86_64")
    assert report.kvm_device is False
    assert report.kvm_openable is False
    assert report.kvm_backend is None
    assert report.kvm_usable is False
    assert (report.accel, report.cpu) == ("tcg", "max")
    assert "/dev/kvm does not exist" in report.reasons[0]
    assert (
        "modprobe kvm_amd" in report.reasons[0]
    )  # the CPU has svm: say how to get /dev/kvm


def test_dev_kvm_not_openable_uses_tcg(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        vendor_id="GenuineIntel",
        flags=BASE_FLAGS + " vmx",
        kvm_device=False,
        modules=("kvm", "kvm_intel"),
        nested={"kvm_intel": "Y"},
    )
    (root / "dev" / "kvm").mkdir()  # exists, but O_RDWR on a directory fails
    report = probe(root, qemu=QEMU, arch="x86_64")
    assert report.kvm_device is True
    assert report.kvm_openable is False
    assert report.kvm_usable is False
    assert (report.accel, report.cpu) == ("tcg", "max")
    assert "cannot be opened" in report.reasons[0]


def test_dev_kvm_permission_denied(
    intel_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deny(path: Any, flags: int, *args: Any) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", deny)
    report = probe(intel_host, qemu=QEMU, arch="x86_64")
    assert report.kvm_openable is False
    assert report.accel == "tcg"
    assert "'kvm' group" in report.reasons[0]


def test_unknown_kvm_backend_is_other(tmp_path: Path) -> None:
    root = make_tree(tmp_path, modules=("kvm",))
    report = probe(root, qemu=QEMU, arch="x86_64")
    assert report.kvm_backend == "other"
    assert report.kvm_usable is False
    assert report.accel == "tcg"


def test_accel_kvm_on_pvm_is_config_error(pvm_host: Path) -> None:
    with pytest.raises(ConfigError, match="kvm_pvm") as info:
        probe(pvm_host, accel="kvm", qemu=QEMU, arch="x86_64")
    assert "--nested-accel=auto or tcg" in str(info.value)
    assert "\n" not in str(info.value)


def test_accel_kvm_without_device_is_config_error(tmp_path: Path) -> None:
    root = make_tree(tmp_path, kvm_device=False)
    with pytest.raises(ConfigError, match="does not exist"):
        probe(root, accel="kvm", qemu=QEMU, arch="x86_64")


def test_accel_tcg_is_honoured_even_when_kvm_is_usable(intel_host: Path) -> None:
    report = probe(intel_host, accel="tcg", qemu=QEMU, arch="x86_64")
    assert report.kvm_usable is True
    assert (report.accel, report.cpu) == ("tcg", "max")
    assert "TCG was requested" in report.reasons[0]


def test_accel_kvm_explicit_on_usable_host(intel_host: Path) -> None:
    report = probe(intel_host, accel="kvm", qemu=QEMU, arch="x86_64")
    assert report.accel == "kvm"


def test_unknown_accel_is_config_error(intel_host: Path) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        probe(intel_host, accel="bogus", qemu=QEMU, arch="x86_64")


# --- CPU model ------------------------------------------------------------------------


def test_cpu_override_honoured_under_kvm(intel_host: Path) -> None:
    report = probe(intel_host, cpu="Skylake-Server", qemu=QEMU, arch="x86_64")
    assert (report.accel, report.cpu) == ("kvm", "Skylake-Server")
    assert report.nesting_possible is True


def test_cpu_override_without_svm_under_tcg_cannot_nest(pvm_host: Path) -> None:
    report = probe(pvm_host, cpu="qemu64", qemu=QEMU, arch="x86_64")
    assert (report.accel, report.cpu) == ("tcg", "qemu64")
    assert report.nesting_possible is False
    assert report.nesting_fix is not None
    assert "--nested-cpu max" in report.nesting_fix


@pytest.mark.parametrize(
    "cpu, possible",
    [
        ("max", True),
        ("qemu64,+svm", True),
        ("EPYC,svm=on", True),
        ("qemu64,svm", True),
        ("max,-svm", False),
        ("qemu64", False),
        # QEMU's TCG cannot emulate VMX: it warns and drops the flag (checked with QEMU 7.2).
        ("qemu64,+vmx", False),
    ],
)
def test_tcg_nesting_needs_svm(pvm_host: Path, cpu: str, possible: bool) -> None:
    report = probe(pvm_host, cpu=cpu, qemu=QEMU, arch="x86_64")
    assert report.cpu == cpu
    assert report.nesting_possible is possible
    assert (report.nesting_fix is None) is possible


def test_cpu_host_under_tcg_is_config_error(pvm_host: Path) -> None:
    with pytest.raises(ConfigError, match="needs KVM"):
        probe(pvm_host, cpu="host", qemu=QEMU, arch="x86_64")


def test_cpu_that_disables_vmx_under_kvm_cannot_nest(intel_host: Path) -> None:
    report = probe(intel_host, cpu="host,-vmx", qemu=QEMU, arch="x86_64")
    assert report.nesting_possible is False


# --- report shape ---------------------------------------------------------------------


def test_missing_qemu_is_a_reason_not_an_error(pvm_host: Path) -> None:
    report = probe(pvm_host, qemu=None, arch="x86_64")
    assert report.qemu is None
    assert any(
        "qemu-system-x86_64 not found: apt-get install qemu-system-x86" in r
        for r in report.reasons
    )


def test_as_dict_is_json_and_complete(amd_nested_off: Path) -> None:
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    data = json.loads(json.dumps(report.as_dict()))
    assert set(data) == set(HostReport.__dataclass_fields__)
    assert data["qemu"] == {"binary": QEMU.binary, "version": "7.2.22", "sandbox": False}
    assert data["virt_flags"] == ["svm"]
    assert data["nested"] is False
    assert data["reasons"] == report.reasons


def test_summary_lines(pvm_host: Path) -> None:
    lines = probe(pvm_host, qemu=QEMU, arch="x86_64").summary_lines()
    assert 1 <= len(lines) <= 2
    assert lines[0] == (
        "nestedkvm: L1 accel=tcg cpu=max (QEMU 7.2.22 /usr/bin/qemu-system-x86_64); nesting possible"
    )
    assert "kvm_pvm" in lines[1]


def test_summary_lines_name_the_fix(amd_nested_off: Path) -> None:
    line = probe(amd_nested_off, qemu=None, arch="x86_64").summary_lines()[0]
    assert "QEMU not found" in line
    assert "NOT possible" in line
    assert "modprobe kvm_amd nested=1" in line


# --- find_qemu ------------------------------------------------------------------------


def _fake_qemu(directory: Path, name: str, output: str, status: int = 0) -> Path:
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def test_find_qemu_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(
        tmp_path,
        "qemu-system-x86_64",
        "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_qemu("x86_64") == QemuInfo(
        str(tmp_path / "qemu-system-x86_64"), "7.2.22", sandbox=True
    )


def test_a_qemu_built_without_seccomp_runs_without_the_sandbox(tmp_path: Path) -> None:
    binary = tmp_path / "qemu-system-x86_64"
    refuse = "echo \"$0: -sandbox: There is no option group 'sandbox'\" >&2; exit 1"
    binary.write_text(f"#!/bin/sh\n[ \"$1\" = -sandbox ] && {{ {refuse}; }}\necho 'QEMU emulator version 8.2.2'\n",
                      encoding="utf-8")
    binary.chmod(0o755)
    assert find_qemu("x86_64", override=str(binary)) == QemuInfo(str(binary), "8.2.2", sandbox=False)


def test_find_qemu_absent_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_qemu("x86_64") is None


def test_find_qemu_override(tmp_path: Path) -> None:
    binary = _fake_qemu(tmp_path, "my-qemu", "QEMU emulator version 9.1.0")
    assert find_qemu("x86_64", override=str(binary)) == QemuInfo(str(binary), "9.1.0", sandbox=True)


def test_find_qemu_missing_override_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        find_qemu("x86_64", override=str(tmp_path / "nope"))


def test_find_qemu_broken_binary_is_host_error(tmp_path: Path) -> None:
    binary = _fake_qemu(tmp_path, "broken-qemu", "segfault", status=139)
    with pytest.raises(HostError, match="exited 139"):
        find_qemu("x86_64", override=str(binary))


# --- enable_nested --------------------------------------------------------------------


class Recorder:
    """Stands in for subprocess.run: records argv, answers with a fixed status."""

    def __init__(self, returncode: int = 0, on_load: Path | None = None) -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode
        self.on_load = (
            on_load  # nested parameter file the fake "modprobe nested=1" rewrites
        )

    def __call__(
        self, argv: list[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        assert kwargs == {"check": False, "capture_output": True}
        self.calls.append(argv)
        if self.on_load is not None and "nested=1" in argv and self.returncode == 0:
            self.on_load.write_text("1\n")
        return subprocess.CompletedProcess(
            argv, self.returncode, b"", b"modprobe: FATAL: boom\n"
        )


def test_enable_nested_reloads_as_root_when_unused(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    run = Recorder(on_load=amd_nested_off / "sys/module/kvm_amd/parameters/nested")
    said = enable_nested(report, amd_nested_off, run=run)
    assert run.calls == [
        ["modprobe", "-r", "kvm_amd"],
        ["modprobe", "kvm_amd", "nested=1"],
    ]
    assert "nesting is enabled" in said[-1]
    # The tree now says nested=1, so a fresh probe agrees.
    assert probe(amd_nested_off, qemu=QEMU, arch="x86_64").nesting_possible is True


def test_enable_nested_reports_when_reload_did_not_help(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    run = Recorder()  # "succeeds" but the parameter still reads 0
    said = enable_nested(report, amd_nested_off, run=run)
    assert len(run.calls) == 2
    assert "NOT enabled" in said[-1]


def test_enable_nested_stops_when_modprobe_fails(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    run = Recorder(returncode=1)
    said = enable_nested(report, amd_nested_off, run=run)
    assert run.calls == [["modprobe", "-r", "kvm_amd"]]
    assert "failed" in said[-1] and "boom" in said[-1]


def test_enable_nested_survives_missing_modprobe(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")

    def no_modprobe(
        argv: list[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        raise FileNotFoundError(2, "No such file or directory", "modprobe")

    said = enable_nested(report, amd_nested_off, run=no_modprobe)
    assert "failed" in said[-1]


def test_enable_nested_refuses_when_module_in_use(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (amd_nested_off / "sys/module/kvm_amd/refcnt").write_text("1\n")
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    run = Recorder()
    said = enable_nested(report, amd_nested_off, run=run)
    assert run.calls == []
    text = " ".join(said)
    assert "Not done" in text and "1 users hold kvm_amd" in text
    assert "`modprobe -r kvm_amd && modprobe kvm_amd nested=1`" in text


def test_enable_nested_refuses_without_root(
    amd_nested_off: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    report = probe(amd_nested_off, qemu=QEMU, arch="x86_64")
    run = Recorder()
    said = enable_nested(report, amd_nested_off, run=run)
    assert run.calls == []
    text = " ".join(said)
    assert "needs root" in text and "1000" in text
    assert "`modprobe -r kvm_amd && modprobe kvm_amd nested=1`" in text


def test_enable_nested_builtin_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root = make_tree(
        tmp_path,
        vendor_id="GenuineIntel",
        flags=BASE_FLAGS + " vmx",
        modules=("kvm", "kvm_intel"),
        nested={"kvm_intel": "N"},
    )
    run = Recorder()
    said = enable_nested(probe(root, qemu=QEMU, arch="x86_64"), root, run=run)
    assert run.calls == []
    assert "kvm_intel.nested=1" in said[0]


@pytest.mark.parametrize("tree", ["intel_host", "pvm_host"])
def test_enable_nested_nothing_to_do(
    tree: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root: Path = request.getfixturevalue(tree)
    run = Recorder()
    said = enable_nested(probe(root, qemu=QEMU, arch="x86_64"), root, run=run)
    assert run.calls == []
    assert said and said[0].startswith("Nothing to do")


# --- the real host, read-only ---------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and /sys")
def test_probe_real_host_is_consistent() -> None:
    report = probe(qemu=None)
    assert report.accel in ("kvm", "tcg")
    assert report.kvm_usable == (report.accel == "kvm")
    assert report.kvm_device == os.path.exists("/dev/kvm")
    assert report.reasons
