"""The plugin inside its own L1, where KVM is real (kvm_amd, nested=1): the path of every user
with hardware KVM (issue 13). L1 is that user's workstation: the tests run `python -m pytest`
there on files they write, with the project and its Python environment seen through the sealed
view, a cache and run directories on L1's tmpfs, and the host's kernel copied in (L1 has no /boot).
The inner sessions boot their own guests, so these are the slowest tests: they sort last."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator

import pytest

from pytest_nestedkvm import CommandResult, Guest, HostReport
from pytest_nestedkvm.boot.initramfs import find_kernel

WORK = "/tmp/inner"  # on L1's tmpfs: the inner sessions' files, cache and run directories
PYTHON = shlex.quote(sys.executable)
# L1 has 2048 MiB by default: its own guest gets half, that guest's guest a quarter.
INNER_MEMORY = "--nested-memory=1024,384"
UNPRIVILEGED = "nobody"


def inner_pytest(l1: Guest, source: str, *options: str, wrap: str = "", timeout: float = 900) -> CommandResult:
    """Run `pytest` inside L1 on `source` as test_inner.py; `wrap` goes before the interpreter
    (a user switch, an unshare). Returns the result whatever its status."""
    kernel = find_kernel()
    inner_kernel = f"{WORK}/vmlinuz-{kernel.release}"
    if l1.run(f"test -f {inner_kernel}").exit_status != 0:  # a restarted L1 starts without it
        l1.succeed(f"mkdir -p {WORK}/cache && chmod 1777 {WORK} {WORK}/cache")
        l1.put(kernel.path, inner_kernel)
        l1.succeed(f"chmod 644 {inner_kernel}")
    l1.succeed(f"cat > {WORK}/test_inner.py <<'NESTEDKVM_EOF'\n{source}\nNESTEDKVM_EOF\nchmod 644 {WORK}/test_inner.py")
    command = (f"cd {WORK} && {wrap} env XDG_CACHE_HOME={WORK}/cache TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 "
               f"{PYTHON} -m pytest -p no:cacheprovider -q -s -rfEs --nested-kernel={inner_kernel} "
               f"--nested-modules={kernel.modules_dir} {' '.join(options)} test_inner.py 2>&1")
    return l1.run(command, timeout=timeout)


def inner_check(l1: Guest, wrap: str = "") -> dict[str, object]:
    report = json.loads(l1.succeed(f"{wrap} {PYTHON} -m pytest_nestedkvm check --json", timeout=300))
    assert isinstance(report, dict)
    return report


def test_the_host_check_inside_l1_plans_kvm_with_cpu_host(l1: Guest, l0: HostReport) -> None:
    # The project and its Python environment are shared with L1 at their own paths (the sealed view).
    report = inner_check(l1)
    expected_backend = "kvm_amd" if l0.accel == "tcg" else l0.kvm_backend  # TCG emulates AMD SVM
    assert report["kvm_backend"] == expected_backend
    assert report["kvm_usable"] is True and report["nested"] is True
    assert (report["accel"], report["cpu"]) == ("kvm", "host")
    assert report["nesting_possible"] is True
    assert report["qemu"] is not None  # L1's QEMU, from the shared /usr


@pytest.fixture
def kvm_for_group_only(l1: Guest) -> Iterator[str]:
    """/dev/kvm as a distribution's udev rule leaves it (root:kvm 0660); restored afterwards."""
    before = l1.succeed("stat -c '%U:%G %a' /dev/kvm").split()
    l1.succeed("chown root:kvm /dev/kvm && chmod 0660 /dev/kvm")
    yield l1.succeed("getent group kvm | cut -d: -f3").strip()
    l1.succeed(f"chown {before[0]} /dev/kvm && chmod {before[1]} /dev/kvm")


def test_a_user_without_access_to_dev_kvm_falls_back_to_tcg_and_the_kvm_group_gets_kvm(
        l1: Guest, kvm_for_group_only: str) -> None:
    user = f"/usr/bin/setpriv --reuid={UNPRIVILEGED} --regid={UNPRIVILEGED} --clear-groups"
    if l1.run(f"{user} true").exit_status != 0:
        user = f"/usr/bin/setpriv --reuid={UNPRIVILEGED} --regid=nogroup --clear-groups"
    # The checkout may sit where only root can enter (`mktemp -d` makes 0700): CAP_DAC_READ_SEARCH
    # lets the user read the project and its Python, and grants no write, so /dev/kvm stays closed.
    user += " --inh-caps=+dac_read_search --ambient-caps=+dac_read_search"
    outside = inner_check(l1, user)
    assert (outside["accel"], outside["kvm_usable"]) == ("tcg", False)
    assert any("/dev/kvm exists but cannot be opened read-write by uid 65534" in reason
               for reason in outside["reasons"]), outside["reasons"]  # type: ignore[attr-defined]
    assert outside["cpu"] == "max"  # the emulated CPU that still has SVM
    member = inner_check(l1, user.replace("--clear-groups", f"--groups={kvm_for_group_only}"))
    assert (member["accel"], member["cpu"], member["kvm_usable"]) == ("kvm", "host", True)


# Run inside L1 as root, in a mount namespace whose /dev has no kvm: a fake QEMU first on PATH
# would leave a mark if anything ran it.
HIDE_DEV_KVM = ("/usr/bin/unshare --mount --propagation private sh -c 'mount -t tmpfs -o mode=755 none /dev && "
                "mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 && mknod -m 444 /dev/urandom c 1 9 "
                "&& exec \"$0\" \"$@\"'")
FAKE_QEMU = "#!/bin/sh\necho ran > /tmp/inner/qemu-ran\nexit 1\n"


def test_accel_kvm_with_dev_kvm_hidden_is_a_usage_error_and_starts_no_qemu(l1: Guest) -> None:
    l1.succeed(f"mkdir -p {WORK}/fakebin && rm -f {WORK}/qemu-ran && printf '%s' {shlex.quote(FAKE_QEMU)} "
               f"> {WORK}/fakebin/qemu-system-x86_64 && chmod 755 {WORK}/fakebin/qemu-system-x86_64")
    result = inner_pytest(l1, "def test_l1(l1):\n    pass\n", "--nested-accel=kvm",
                          wrap=f"{HIDE_DEV_KVM} env PATH={WORK}/fakebin:/usr/bin:/bin:/usr/sbin:/sbin")
    assert result.exit_status == 4, result.stdout  # pytest's usage error
    lines = [line for line in result.stdout.splitlines() if "--nested-accel=kvm" in line]
    assert lines and "/dev/kvm does not exist" in lines[0], result.stdout
    assert "modprobe kvm_amd" in result.stdout, result.stdout  # the fix: the CPU shows svm
    assert "Traceback" not in result.stdout
    assert l1.run(f"test -e {WORK}/qemu-ran").exit_status != 0, "a QEMU was started"


INNER_L1 = """
def test_inner_l1_runs_on_kvm(l1):
    assert l1.succeed("echo inner") == "inner\\n"
    assert l1.qmp().query_kvm() == {"enabled": True, "present": True}
    argv = l1.qemu_argv
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    print("INNER L1 ready in", l1.boot_seconds, "s with", argv[argv.index("-smp") + 1], "vCPUs")
"""


def test_an_inner_session_in_l1_runs_its_own_l1_on_kvm(l1: Guest, l0: HostReport) -> None:
    """A pytest session inside L1 (a KVM host) boots its L1 with -accel kvm -cpu host, default vCPUs:
    one where L1's SVM is TCG's (see Settings.smp_for), two on hardware."""
    result = inner_pytest(l1, INNER_L1, INNER_MEMORY)
    assert "1 passed" in result.stdout, result.stdout
    vcpus = 1 if l0.accel == "tcg" else 2
    assert f"with {vcpus} vCPUs" in result.stdout, result.stdout


INNER_CRASH = """
def test_a_panics_its_l1(l1):
    l1.succeed("touch /tmp/mark")
    l1.crash()

def test_b_runs_on_a_fresh_kvm_l1(l1):
    assert l1.run("test -e /tmp/mark").exit_status == 1
    assert l1.qmp().query_kvm() == {"enabled": True, "present": True}
"""


def test_a_panic_of_the_inner_kvm_l1_costs_one_inner_test(l1: Guest) -> None:
    result = inner_pytest(l1, INNER_CRASH, INNER_MEMORY)
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    assert "FAILED test_inner.py::test_a_panics_its_l1" in result.stdout
    assert "Kernel panic" in result.stdout or "panicked" in result.stdout, result.stdout


INNER_L2 = """
def test_inner_l2_runs_on_kvm_in_the_inner_l1(l2):
    assert l2.succeed("echo deep") == "deep\\n"
    assert l2.qmp().query_kvm() == {"enabled": True, "present": True}
    argv = l2.qemu_argv
    assert argv[argv.index("-accel") + 1] == "kvm"
    print("INNER L2 ready in", l2.boot_seconds, "s")
"""
RELOAD = "modprobe -r kvm_amd && modprobe kvm_amd nested={}"


@pytest.fixture
def kvm_amd_without_nesting(l1: Guest) -> Iterator[None]:
    """kvm_amd reloaded inside L1 with nested=0; nested=1 again afterwards, whatever happened."""
    l1.succeed(RELOAD.format(0))
    assert l1.succeed("cat /sys/module/kvm_amd/parameters/nested").strip() == "0"
    yield
    if not l1.alive:
        return  # the test failed with L1 down: the next test boots a fresh L1, whose init loads nested=1
    if l1.run("cat /sys/module/kvm_amd/parameters/nested").stdout.strip() != "1":
        l1.succeed(RELOAD.format(1))


# A fresh L1: an L2 that earlier tests left running in it holds kvm_amd, which then cannot be unloaded.
@pytest.mark.nested_fresh
def test_nested_off_in_l1_skips_the_inner_l2_with_the_fix_and_nested_enable_runs_it(
        l1: Guest, kvm_amd_without_nesting: None) -> None:
    """Three QEMUs deep once nesting is back: L1 (here), the inner L1 on L1's KVM, its L2 on the inner KVM."""
    skipped = inner_pytest(l1, INNER_L2, INNER_MEMORY, "--nested-levels=2")
    assert "1 skipped" in skipped.stdout, skipped.stdout
    assert "modprobe -r kvm_amd && modprobe kvm_amd nested=1" in skipped.stdout, skipped.stdout
    assert "--nested-enable" in skipped.stdout
    enabled = inner_pytest(l1, INNER_L2, INNER_MEMORY, "--nested-levels=2", "--nested-enable", timeout=1800)
    assert "1 passed" in enabled.stdout, enabled.stdout
    assert "INNER L2 ready in" in enabled.stdout
    assert l1.succeed("cat /sys/module/kvm_amd/parameters/nested").strip() == "1"
