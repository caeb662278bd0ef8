"""A real distribution image as L1 and as L2: Debian 12 built here from Debian's packages (tests/images.py).

Booted by its own GRUB under TCG, its SSH key given through the NoCloud seed the plugin
writes, commands over SSH; the serial-console login fallback; the image never changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import images  # tests/images.py (pyproject: pythonpath)
import pytest

pytestmark = pytest.mark.usefixtures("no_qemu_left")


@pytest.fixture(scope="module")
def debian_image() -> Path:
    try:
        return Path(images.debian_image())
    except images.ImageUnavailable as exc:
        pytest.skip(str(exc))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_debian_image_as_l1_over_ssh_and_pristine_after_a_crash(pytester: pytest.Pytester, debian_image: Path) -> None:
    before = sha256(debian_image)
    pytester.makepyfile(
        """
        import os, stat

        def test_it_is_the_image_with_its_own_kernel(l1):
            assert 'ID=debian' in l1.succeed("cat /etc/os-release")
            assert l1.succeed("uname -r").strip().endswith("-cloud-amd64")
            assert l1.succeed("id -u") == "0\\n"

        def test_exact_results_over_the_ssh_channel(l1):
            result = l1.run("printf 'a\\\\0b\\\\n'; echo oops >&2; exit 7")
            assert (result.exit_status, result.stdout, result.stderr) == (7, "a\\0b\\n", "oops\\n")
            assert l1.fail("false") == ""

        def test_ssh_and_sftp(l1, tmp_path):
            _, out, _ = l1.ssh.exec_command("hostname", timeout=120)
            assert out.read() == b"nestedkvm-l1\\n"
            source = tmp_path / "tool"
            source.write_bytes(os.urandom(1 << 20))
            source.chmod(0o700)
            l1.put(source, "/root/tool")
            l1.get("/root/tool", tmp_path / "back")
            assert (tmp_path / "back").read_bytes() == source.read_bytes()
            assert stat.S_IMODE((tmp_path / "back").stat().st_mode) == 0o700

        def test_write_to_the_disk_then_panic(l1):
            l1.succeed("echo changed > /etc/nestedkvm-mark && sync")
            l1.crash()

        def test_the_next_l1_boots_the_pristine_image(l1):
            l1.fail("test -e /etc/nestedkvm-mark")
            l1.fail("test -e /root/tool")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-l1-image={debian_image}")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*L1 kernel panic during this test*"])
    assert sha256(debian_image) == before, "the image file changed"


def test_serial_console_login_when_there_is_no_cloud_init(pytester: pytest.Pytester, debian_image: Path) -> None:
    pytester.makepyfile(
        """
        def test_commands_run_as_the_login_user_on_the_console(l1):
            assert l1.succeed("id -un") == "tester\\n"
            assert l1.succeed("readlink /proc/$$/fd/1") == "/dev/ttyS0\\n"
            result = l1.run("printf 'x\\\\r\\\\ny'; echo e >&2; exit 4")
            assert (result.exit_status, result.stdout, result.stderr) == (4, "x\\r\\ny", "e\\n")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--nested-l1-image={debian_image}", f"--nested-login={images.TESTER}:{images.TESTER}"
    )
    result.assert_outcomes(passed=1)


def test_an_image_that_does_not_take_the_key_is_a_clear_boot_error(
    pytester: pytest.Pytester, debian_image: Path
) -> None:
    # Drop the NoCloud seed: cloud-init finds no key to authorize, as in an image without cloud-init.
    pytester.makeconftest(
        """
        import dataclasses

        def pytest_nestedkvm_guest_spec(config, level, spec):
            return dataclasses.replace(spec, disks=spec.disks[:1])
        """
    )
    pytester.makepyfile("def test_uses_l1(l1):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-l1-image={debian_image}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*BootError: l1: the guest rejected the session key for 'root'*",
        "*pass --nested-login USER:PASSWORD to log in on its serial console instead*",
    ])


@pytest.mark.nested(level=2)
def test_debian_image_as_l2_booted_by_l1_on_its_kvm(pytester: pytest.Pytester, debian_image: Path) -> None:
    before = sha256(debian_image)
    pytester.makepyfile(
        """
        def test_l2_is_the_image_on_l1s_kvm(l1, l2):
            assert 'ID=debian' in l2.succeed("cat /etc/os-release")
            assert l2.succeed("uname -r").strip().endswith("-cloud-amd64")
            assert l2.qmp().query_kvm() == {"enabled": True, "present": True}
            # L1 holds the image and L2's seed as its virtio disks; L2 reached over SSH through L1
            assert l1.succeed("cat /sys/block/vda/size /sys/block/vdb/size").split()[0] == str(2048 * 2048)
            _, out, _ = l2.ssh.exec_command("hostname", timeout=120)
            assert out.read() == b"nestedkvm-l2\\n"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-levels=2",
                                           f"--nested-l2-image={debian_image}")
    result.assert_outcomes(passed=1)
    assert sha256(debian_image) == before, "the image file changed"


@pytest.mark.nested(level=2)
def test_an_l2_qemu_that_dies_after_its_qmp_greeting_is_an_error_not_a_hang(
    pytester: pytest.Pytester, debian_image: Path
) -> None:
    # TCG cannot run `-cpu host`: QEMU greets on QMP, then exits; the stream through L1 never closes.
    pytester.makeconftest(
        """
        import dataclasses

        def pytest_nestedkvm_guest_spec(config, level, spec):
            return dataclasses.replace(spec, accel="tcg") if level == 2 else None
        """
    )
    pytester.makepyfile("def test_uses_l2(l2):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-levels=2",
                                           f"--nested-l2-image={debian_image}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*BootError: l2 died while booting: l2 QEMU exited with status 1*",
                                 "*CPU model 'host' requires KVM*"])


CRASH_AND_PRISTINE = '''
def test_a_leaves_a_mark_in_l2(l2, l1):
    l2.succeed("echo dirty > /tmp/mark")
    l1.succeed("echo kept > /tmp/l1-mark")

def test_b_crashes_l2(l2):
    l2.crash()

def test_c_l2_comes_back_pristine_in_the_same_l1(l2, l1):
    l2.fail("test -e /tmp/mark")
    assert l2.succeed("echo back") == "back\\n"
    l1.succeed("test -e /tmp/l1-mark")  # the image kept running
    assert l2.qmp().query_kvm() == {"enabled": True, "present": True}

'''
SSH_INTO_L2 = '''
def test_d_ssh_into_l2_through_the_image(l2):
    _, out, _ = l2.ssh.exec_command("id -u", timeout=120)
    assert out.read() == b"0\\n"
'''


@pytest.mark.nested(level=2)
def test_l2_and_l3_inside_the_debian_image_pass_the_tests_of_the_built_in_l1(
    pytester: pytest.Pytester, debian_image: Path
) -> None:
    before = sha256(debian_image)
    pytester.makepyfile(test_nested=(Path(__file__).parent / "test_nested.py").read_text(),
                        test_z_crash=CRASH_AND_PRISTINE + SSH_INTO_L2)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "--nested-levels=3",
                                           f"--nested-l1-image={debian_image}")
    result.assert_outcomes(passed=12, failed=1)  # the crash fails its test; L3 runs inside L2 inside the image
    result.stdout.fnmatch_lines(["*L2 QEMU the image's own (qemu-system-x86_64 on its PATH)*",
                                 "*L2 kernel panic during this test*"])
    assert len([line for line in result.outlines if line.startswith("nestedkvm: L1 ready in")]) == 1
    assert sha256(debian_image) == before, "the image file changed"


@pytest.mark.nested(level=2)
def test_l2_inside_an_image_reached_by_a_serial_console_login(pytester: pytest.Pytester, debian_image: Path) -> None:
    """No cloud-init, so no SSH: L2's boot files travel on a virtio port, its streams as with SSH."""
    before = sha256(debian_image)
    pytester.makepyfile(test_z_crash=CRASH_AND_PRISTINE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "--nested-levels=2",
                                           f"--nested-l1-image={debian_image}",
                                           f"--nested-login=root:{images.ROOT_PASSWORD}")
    result.assert_outcomes(passed=2, failed=1)  # the crash fails its test
    result.stdout.fnmatch_lines(["*L2 kernel panic during this test*"])
    assert len([line for line in result.outlines if line.startswith("nestedkvm: L1 ready in")]) == 1
    assert sha256(debian_image) == before, "the image file changed"


# An image without QEMU: L2's QEMU named where the image has none. An image whose kernel has no KVM:
# kvm_amd/kvm_intel unloaded in L1 and kept from loading again, before L2 is asked for.
NO_KVM = ("for m in kvm_amd kvm_intel kvm; do modprobe -r $m 2>/dev/null; done; "
          "printf 'install %s /bin/false\\n' kvm kvm_amd kvm_intel > /etc/modprobe.d/no-kvm.conf; test ! -e /dev/kvm")


@pytest.mark.nested(level=2)
@pytest.mark.parametrize(("hook", "in_l1", "fix"), [
    ('dataclasses.replace(spec, qemu="/opt/no-such-qemu/qemu-system-x86_64") if level == 2 else None', "true",
     "the --nested-l1-image has no /opt/no-such-qemu/qemu-system-x86_64 to run L2 with: install QEMU into the image"),
    ("None", NO_KVM, "the --nested-l1-image has no /dev/kvm for L2: it needs a kernel with KVM"),
], ids=["no-qemu", "no-kvm"])
def test_an_image_that_cannot_run_l2_skips_it_with_the_fix(
    pytester: pytest.Pytester, debian_image: Path, hook: str, in_l1: str, fix: str
) -> None:
    pytester.makeconftest(f"import dataclasses\n\ndef pytest_nestedkvm_guest_spec(config, level, spec):\n"
                          f"    return {hook}\n")
    pytester.makepyfile(f"def test_l1(l1):\n    l1.succeed({in_l1!r})\n\n"
                        "def test_l2(l2):\n    raise AssertionError('must not run')\n\n"
                        "def test_l2_again(l2):\n    raise AssertionError('must not run either')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "--nested-levels=2",
                                           f"--nested-l1-image={debian_image}")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED [[]2[]] *{fix}*"])  # both L2 tests, each asked again
