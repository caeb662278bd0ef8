"""`--nested-kernel=<build dir>` on a real kernel tree (Debian's linux-source-6.1 with
scripts/kernel/nestedkvm.config, built by scripts/build_suites.sh and cached): an inner session
boots the tree's bzImage as L1 and L2 with the modules the build left in the tree, prepared by
the plugin, and modprobe inside L1 reloads kvm_amd/kvm_intel from them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 3 * 3600  # a first build on 2 cores takes about 20 minutes; cached, it is instant

pytestmark = [pytest.mark.nested(level=2), pytest.mark.usefixtures("no_qemu_left")]


@pytest.fixture(scope="module")
def tree() -> Path:
    """The built tree; skipped, with the script's reason, where linux-source-6.1 is not installed."""
    done = subprocess.run([str(REPO / "scripts/build_suites.sh"), "kernel"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT)
    if done.returncode == 2:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


INNER = """
import pytest

RELEASE = {release!r}


def vendor_module(guest):
    return guest.succeed("grep -qw svm /proc/cpuinfo && echo kvm_amd || echo kvm_intel").strip()


def check_modules(guest, module):
    assert guest.succeed("uname -r").strip() == RELEASE
    assert module in guest.succeed("cut -d' ' -f1 /proc/modules").split()  # loaded by the initramfs
    assert guest.succeed(f"cat /sys/module/{{module}}/parameters/nested").strip() in ("1", "Y")
    # The guest's /lib/modules/<release> is the tree's modules as the plugin prepared them.
    filename = guest.succeed(f"/sbin/modinfo -F filename {{module}}").strip()
    assert filename == f"/lib/modules/{{RELEASE}}/kernel/arch/x86/kvm/{{module.replace('_', '-')}}.ko"
    assert guest.succeed(f"/sbin/modinfo -F vermagic {{module}}").split()[0] == RELEASE


def test_l1_boots_the_tree_and_modprobe_reloads_kvm_from_its_modules(l1):
    module = vendor_module(l1)
    check_modules(l1, module)
    # What --nested-enable does on a host whose module has nested off: unload, load with nested=1.
    # modprobe resolves kvm (and what kvm needs) through the depmod index of the prepared directory.
    l1.succeed(f"/sbin/modprobe -r {{module}} && ! grep -q '^kvm ' /proc/modules && /sbin/modprobe {{module}} nested=1")
    assert l1.succeed(f"cat /sys/module/{{module}}/parameters/nested").strip() in ("1", "Y")


def test_l2_boots_the_tree_on_l1s_reloaded_kvm(l2):
    check_modules(l2, vendor_module(l2))
    assert l2.qmp().query_kvm()["enabled"]
"""


def test_kernel_build_dir_boots_l1_and_l2_with_its_own_modules(pytester: pytest.Pytester, tree: Path) -> None:
    release = (tree / "include/config/kernel.release").read_text().strip()
    pytester.makepyfile(test_inner=INNER.format(release=release))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", f"--nested-kernel={tree}",
                                           "--nested-levels=2")
    result.assert_outcomes(passed=2)
