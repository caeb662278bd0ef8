"""The guests run the kernel this session was pointed at, and KVM with nesting works on it.

A kernel CI job builds its tree and passes it with `--nested-kernel` (the
build directory, or a bzImage with `--nested-modules`; see README.md); without
it the plugin boots the host's kernel. Either way these tests read which kernel
the plugin picked (the plugin's own lookup, not a hard-coded version) and check
that L1 and L2 run exactly that build, with KVM, nested=1 and modprobe working
on its modules, and a working /dev/kvm (the kvm_api suite's program runs a VM
of its own in each).

    make -j$(nproc) && pytest --nested-kernel=. --nested-levels=2 path/to/example_suites/custom_kernel
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pytest_nestedkvm.boot.initramfs import Kernel
from pytest_nestedkvm.machine.guest import Guest
from pytest_nestedkvm.session import SESSION_KEY

KVM_HELLO = Path(__file__).resolve().parent.parent / "kvm_api" / "kvm_hello.py"


@pytest.fixture(scope="session")
def kernel(pytestconfig: pytest.Config) -> Kernel:
    """The kernel the plugin boots: --nested-kernel (a build tree or an image, with
    --nested-modules), else the host's; `modules_dir` is what the guests load from."""
    return pytestconfig.stash[SESSION_KEY].lab.kernel


def build_string(image: Path) -> str | None:
    """The version string in a bzImage's setup header, e.g. '6.1.0-56-amd64 (user@host) #1 SMP ...'.

    Read here from the file itself, independently of the plugin (boot protocol:
    "HdrS" at 0x202, the string's offset - 0x200 at 0x20e). None for other formats.
    """
    with image.open("rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b"HdrS":
        return None
    offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    return head[offset:offset + 256].split(b"\0", 1)[0].decode("ascii", "replace")


def check_runs_kernel(guest: Guest, kernel: Kernel) -> None:
    assert guest.succeed("uname -r").strip() == kernel.release
    built = build_string(kernel.path)
    if built is not None:
        # Two builds of one tree share `uname -r`; `uname -v` (#build-number, date) tells them apart.
        assert built.startswith(kernel.release + " ")
        assert built.endswith(" " + guest.succeed("uname -v").strip())


def check_kvm_works(guest: Guest, kernel: Kernel) -> None:
    modules = guest.succeed("cut -d' ' -f1 /proc/modules").split()
    vendor = "kvm_amd" if "kvm_amd" in modules else "kvm_intel"
    assert "kvm" in modules and vendor in modules  # loaded from the modules given with the kernel
    assert guest.succeed(f"cat /sys/module/{vendor}/parameters/nested").strip() in ("1", "Y")
    # modprobe's tools find those modules too: /lib/modules/<release> in the guest is the kernel's own.
    assert guest.succeed(f"/sbin/modinfo -F vermagic {vendor}").split()[0] == kernel.release
    guest.put(KVM_HELLO, "/tmp/kvm_hello.py")  # a checkout under /tmp would be hidden by the guest's tmpfs
    out = guest.succeed(shlex.join(["python3", "-B", "/tmp/kvm_hello.py", "0x10"]))
    assert out.splitlines()[-1] == "kvm_hello: OK"


def test_l1_runs_the_kernel_under_test(l1: Guest, kernel: Kernel) -> None:
    print(f"kernel {kernel.path} ({kernel.release}), modules {kernel.modules_dir}")
    check_runs_kernel(l1, kernel)


def test_l1_has_kvm_with_nesting_on_that_kernel(l1: Guest, kernel: Kernel) -> None:
    check_kvm_works(l1, kernel)


@pytest.mark.nested(level=2)
def test_l2_runs_the_same_kernel_on_l1s_kvm(l2: Guest, kernel: Kernel) -> None:
    check_runs_kernel(l2, kernel)
    assert l2.qmp().query_kvm()["enabled"]  # the kernel under test, as L1, hosts L2 with KVM


@pytest.mark.nested(level=2)
def test_l2_has_kvm_too(l2: Guest, kernel: Kernel) -> None:
    check_kvm_works(l2, kernel)
