"""The plugin inside its own L1, where KVM is real (kvm_amd, nested=1): the path of every user
with hardware KVM (issue 13)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from pytest_nestedkvm import Guest, HostReport
from pytest_nestedkvm.initramfs import find_kernel


def test_the_host_check_inside_l1_plans_kvm_with_cpu_host(l1: Guest, l0: HostReport) -> None:
    # The project and its Python environment are shared with L1 at their own paths (the sealed view).
    out = l1.succeed(f"{shlex.quote(sys.executable)} -m pytest_nestedkvm check --json", timeout=300)
    report = json.loads(out)
    expected_backend = "kvm_amd" if l0.accel == "tcg" else l0.kvm_backend  # TCG emulates AMD SVM
    assert report["kvm_backend"] == expected_backend
    assert report["kvm_usable"] is True and report["nested"] is True
    assert (report["accel"], report["cpu"]) == ("kvm", "host")
    assert report["nesting_possible"] is True
    assert report["qemu"] is not None  # L1's QEMU, from the shared /usr


INNER_TEST = """
def test_inner_l1_runs_on_kvm(l1):
    assert l1.succeed("echo inner") == "inner\\n"
    assert l1.qmp().query_kvm() == {"enabled": True, "present": True}
    argv = l1.qemu_argv
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    print("INNER L1 ready in", l1.boot_seconds, "s with", argv[argv.index("-smp") + 1], "vCPUs")
"""


def test_an_inner_session_in_l1_runs_its_own_l1_on_kvm(l1: Guest, tmp_path: Path) -> None:
    """A pytest session inside L1 (a KVM host) boots its L1 with -accel kvm -cpu host, default vCPUs."""
    kernel = find_kernel()
    work = "/tmp/inner"  # L1's tmpfs: the inner session writes its run dir, cache and files there
    l1.succeed(f"mkdir -p {work}/cache")
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    l1.put(tmp_path / "test_inner.py", f"{work}/test_inner.py")
    l1.put(kernel.path, f"{work}/vmlinuz-{kernel.release}")  # L1 sees no /boot
    out = l1.succeed(
        f"cd {work} && XDG_CACHE_HOME={work}/cache TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 "
        f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -q -s "
        f"--nested-kernel={work}/vmlinuz-{kernel.release} --nested-modules={kernel.modules_dir} "
        "--nested-memory=1024 test_inner.py 2>&1",  # L1 has 2048 MiB: its guest gets half
        timeout=600,
    )
    assert "1 passed" in out, out
    assert "INNER L1 ready in" in out
