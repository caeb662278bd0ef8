"""The plugin inside its own L1, where KVM is real (kvm_amd, nested=1): the path of every user
with hardware KVM. (Issue 13; the inner pytest sessions are still to come.)"""

from __future__ import annotations

import json
import shlex
import sys

from pytest_nestedkvm import Guest, HostReport


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
