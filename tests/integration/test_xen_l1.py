"""Xen as L1 against real QEMU: Xen boots with the built-in guest as its PV dom0, which answers
commands on the usual channel, runs the toolstack from Debian's packages unpacked in the cache,
and has HVM support to give domUs; L2 is an HVM domU of the built-in guest with the same channel;
a domU's panic costs L2 and a dom0's costs L1; nothing of Xen is installed on L0."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.config.settings import Settings
from pytest_nestedkvm.lab import Lab
from pytest_nestedkvm.machine.guest import Guest

pytestmark = [pytest.mark.nested(level=1)]
DPKG_STATUS = Path("/var/lib/dpkg/status")


def host_state() -> tuple[str, list[str]]:
    """The package database's digest and what /boot holds: the plugin must change neither."""
    status = hashlib.sha256(DPKG_STATUS.read_bytes()).hexdigest() if DPKG_STATUS.exists() else ""
    return status, sorted(str(p) for p in Path("/boot").rglob("*"))


@pytest.fixture(scope="module")
def xen_lab() -> Iterator[Lab]:
    before = host_state()
    with Lab(Settings.from_sources({"hypervisor": "xen", "levels": "2"}, env={})) as lab:
        yield lab
    assert host_state() == before


@pytest.fixture
def dom0(xen_lab: Lab) -> Guest:
    return xen_lab.guest(1)


def test_dom0_answers_commands_and_runs_on_xen(dom0: Guest) -> None:
    assert dom0.hypervisor == "xen"
    assert dom0.succeed("cat /sys/hypervisor/type") == "xen\n"
    assert dom0.succeed("cat /sys/hypervisor/guest_type") == "PV\n"
    assert dom0.succeed("echo from dom0") == "from dom0\n"
    argv = dom0.qemu_argv
    assert argv[argv.index("-kernel") + 1].endswith("/boot/xen")
    assert "(XEN) Xen version 4.17" in dom0.console_log.read_text(errors="replace")


def test_xl_shows_hvm_support_with_the_toolstack_from_the_cache(dom0: Guest) -> None:
    info = dom0.succeed("xl info")
    caps = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("virt_caps"))
    assert "hvm" in caps and "hap" in caps
    assert dom0.succeed("xl list").splitlines()[1].startswith("Domain-0 ")
    assert dom0.succeed("command -v xl") == "/usr/lib/xen-4.17/bin/xl\n"


def test_the_xen_tree_stays_read_only_and_dom0_writes_nothing_to_l0(dom0: Guest) -> None:
    assert dom0.run("touch /usr/lib/xen-4.17/bin/xl").exit_status != 0  # the unpacked tree, read-only
    name = f"nestedkvm-probe-{os.getpid()}"
    dom0.succeed(f"touch /usr/bin/{name} /etc/{name}")  # dom0's root is writable, as a KVM L1's is
    assert not Path(f"/usr/bin/{name}").exists() and not Path(f"/etc/{name}").exists()  # in its memory only


# A PVH domU of the built-in kernel whose init is busybox itself: it prints its usage and exits,
# so the kernel reaching user space ends in "Attempted to kill init". rdtscp=0: under TCG, Xen
# cannot tell RDTSCP's length without SVM's next-RIP (QEMU's SVM lacks it) and crashes the domU.
DOMU_CONFIG = """name = "probe"
type = "pvh"
kernel = "{kernel}"
ramdisk = "{initrd}"
extra = "console=hvc0 panic=-1 rdinit=/bin/busybox"
memory = 256
vcpus = 1
cpuid = "host,rdtscp=0"
on_crash = "preserve"
"""


def test_a_pvh_domu_boots_the_built_in_kernel_to_user_space(xen_lab: Lab, dom0: Guest) -> None:
    spec = xen_lab.spec_for(1)
    dom0.succeed(f"cat > /tmp/probe.cfg <<'EOF'\n{DOMU_CONFIG.format(kernel=spec.kernel, initrd=spec.initrd)}EOF")
    dom0.succeed("xl create /tmp/probe.cfg")
    try:
        log = "/var/log/xen/console/guest-probe.log"
        dom0.wait_until_succeeds(f"grep -q 'Attempted to kill init' {log}", timeout=240)
        assert '"type": "pvh"' in dom0.succeed("xl list -l probe")
        assert "Booting kernel on Xen PVH" in dom0.succeed(f"cat {log}")
    finally:
        dom0.run("xl destroy probe")


@pytest.mark.nested(level=2)
def test_l2_is_an_hvm_domu_on_the_usual_channel_and_sees_its_view(xen_lab: Lab, dom0: Guest) -> None:
    l2 = xen_lab.guest(2)
    assert l2.succeed("echo from the domU") == "from the domU\n"
    assert l2.succeed("cat /sys/hypervisor/type") == "xen\n"
    assert "Hypervisor detected: Xen HVM" in l2.succeed("dmesg | grep 'Hypervisor detected'")
    assert '"type": "hvm"' in dom0.succeed("xl list -l nestedkvm-l2")
    assert l2.qemu_argv[:4] == ["xl", "create", "-F", "/dev/null"] and 'type="hvm"' in l2.qemu_argv
    project = Path(__file__).resolve()  # the project is exported to every level, read-only
    assert l2.succeed(f"head -c 3 {project}") == project.read_text()[:3]
    assert l2.run(f"touch {project.parent}/nestedkvm-probe").exit_status != 0
    assert "nestedkvm: stage2 up" in l2.console_log.read_text(errors="replace")  # its serial port, logged on L0


def test_a_dom0_panic_is_a_crash_and_the_next_guest_is_a_fresh_xen(xen_lab: Lab) -> None:
    guest = xen_lab.guest(1)
    guest.crash()
    assert not guest.alive
    fresh = xen_lab.guest(1)
    assert fresh.succeed("xl list | grep -c Domain-0") == "1\n"


def test_nested_xen_boots_a_gzipped_xen_of_ones_own(xen_lab: Lab) -> None:
    assert xen_lab.boot_files.xen is not None
    packed = next((xen_lab.boot_files.xen.tools / "boot").glob("xen-*.gz"))  # as a build's xen.gz
    with Lab(Settings.from_sources({"hypervisor": "xen", "xen": str(packed)}, env={})) as lab:
        guest = lab.guest(1)
        kernel = guest.qemu_argv[guest.qemu_argv.index("-kernel") + 1]
        assert kernel != str(packed) and Path(kernel).name.startswith("xen-image-")  # decompressed in the cache
        assert "xen_version            : 4.17" in guest.succeed("xl info")


@pytest.mark.nested(level=2)
@pytest.mark.usefixtures("no_qemu_left")
def test_a_domu_panic_and_a_xen_panic_each_cost_one_test(pytester: pytest.Pytester) -> None:
    """In a session: a domU's panic costs its test and L2 only; Xen's own panic (`xl debug-keys N`
    with nmi=fatal: an NMI Xen cannot place is fatal) costs its test and L1, with the (XEN) lines."""
    pytester.makeconftest(
        """
        import dataclasses

        def pytest_nestedkvm_guest_spec(config, level, spec):
            if level == 1:
                return dataclasses.replace(spec, xen=dataclasses.replace(spec.xen, args=spec.xen.args + " nmi=fatal"))
        """
    )
    pytester.makepyfile(
        """
        def test_a_domu_panics(l2):
            l2.run("echo c > /proc/sysrq-trigger", timeout=120)

        def test_b_a_fresh_domu_in_the_same_dom0(l1, l2):
            assert l1.boots == 1 and l2.boots == 2
            assert l1.succeed("xl list | grep -c nestedkvm-l2") == "1\\n"

        def test_c_xen_panics(l1):
            l1.run("xl debug-keys N; sleep 60", timeout=120)

        def test_d_a_fresh_xen(l1):
            assert l1.boots == 2 and "nmi=fatal" in l1.succeed("xl info | grep xen_commandline")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-hypervisor=xen", "--nested-levels=2")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert "L2 kernel panic during this test: " in out and "sysrq triggered crash" in out
    assert "L1 hypervisor panic during this test: (XEN) Panic on CPU 0: FATAL TRAP: vec 2, NMI" in out  # why, too
    assert "(XEN) FATAL TRAP: vec 2, NMI" in out  # the console slice in the report
