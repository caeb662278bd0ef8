"""Bad inputs refused at configure time: one usage-error line that names the option, the value,
where it came from, what is wrong and the fix; no QEMU started and nothing on disk changed.

Also: a failure to save artifacts never hides the test's own result, and --nested-login's
password may come from the environment or an ini file instead of the command line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import pytest
from fakes import fake_qemu
from kernel_trees import RELEASE, build_tree

from pytest_nestedkvm.base.errors import ConfigError, HostError
from pytest_nestedkvm.boot.initramfs import find_kernel
from pytest_nestedkvm.config.settings import OPTION_BY_NAME, Settings

HOST_CORES = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NESTEDKVM_"):
            monkeypatch.delenv(name)


def fake_bzimage(path: Path, mib: float) -> Path:
    """A file of `mib` MiB with a bzImage setup header's magic ("HdrS" at 0x202)."""
    with path.open("wb") as f:
        f.seek(0x202)
        f.write(b"HdrS")
        f.truncate(int(mib * (1 << 20)))
    return path


def qcow2(path: Path) -> Path:
    path.write_bytes(b"QFI\xfb" + b"\0" * 508)
    return path


HARNESS = ("runpytest-", "stdout", "stderr")  # what pytester itself writes around a subprocess run


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if not p.relative_to(root).parts[0].startswith(HARNESS)}


def refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> str:
    """The single usage-error line of a run with `args`, after checking that it started no QEMU
    and left the project and the temporary directory as they were."""
    called = fake_qemu(monkeypatch, tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    pytester.makepyfile("def test_nothing(): pass")
    before = snapshot(pytester.path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, (result.ret, result.outlines, result.errlines)
    output = [line for line in result.outlines + result.errlines if line.strip()]
    assert len(output) == 1 and output[0].startswith("ERROR: "), output
    assert not called.exists(), called.read_text()
    assert list(tmp.iterdir()) == []
    assert snapshot(pytester.path) == before
    return output[0]


def write_ini(pytester: pytest.Pytester, values: dict[str, str]) -> None:
    lines = ["[pytest]", *(f"{OPTION_BY_NAME[name].ini} = {value}" for name, value in values.items())]
    pytester.makefile(".ini", pytest="\n".join(lines) + "\n")


# --- 1. --nested-artifacts -------------------------------------------------------------


def test_artifacts_naming_an_existing_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    existing = tmp_path / "results.xml"
    existing.write_text("keep me")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-artifacts={existing}")
    assert line == (f"ERROR: --nested-artifacts='{existing}' (from command line): {existing} is a file, "
                    "not a directory: name a directory (it is made when a test fails)")
    assert existing.read_text() == "keep me"


def test_artifacts_below_a_file_from_env(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    existing = tmp_path / "results.xml"
    existing.write_text("keep me")
    monkeypatch.setenv("NESTEDKVM_ARTIFACTS", f"{existing}/arts")
    line = refused(pytester, monkeypatch, tmp_path)
    assert line == (f"ERROR: --nested-artifacts='{existing}/arts' (from env NESTEDKVM_ARTIFACTS): {existing} is a "
                    f"file, so no directory can be made at {existing}/arts: name a directory")


ARTIFACTS_FAIL_TEST = """
from pathlib import Path

from pytest_nestedkvm.session import SESSION_KEY


class FakePool:
    guests = {1: object()}  # save() fails before it reads a guest
    boot_failures = []

    def close(self):
        pass


def test_fails(pytestconfig):
    session = pytestconfig.stash[SESSION_KEY]
    session.lab.__dict__["pool"] = FakePool()
    Path(ARTIFACTS).write_text("in the way")  # the directory cannot be made any more
    assert 1 == 2, "the test's own failure"
"""


def test_artifacts_that_cannot_be_saved_never_hide_the_tests_result(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    called = fake_qemu(monkeypatch, tmp_path)
    artifacts = tmp_path / "arts"
    pytester.makepyfile(test_fails=ARTIFACTS_FAIL_TEST.replace("ARTIFACTS", repr(str(artifacts))))
    result = pytester.runpytest_subprocess(f"--nested-artifacts={artifacts}")
    result.assert_outcomes(failed=1)
    output = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in output
    assert "AssertionError: the test's own failure" in output
    result.stdout.fnmatch_lines([
        "*- nestedkvm artifacts -*",
        f"artifacts could not be saved in {artifacts}/test_fails.py_test_fails: *Not a directory*",
    ])
    assert not called.exists()


# --- 2 and 3. memory: the kernel's floor, and defaults below a smaller parent -----------


def test_memory_below_the_kernels_floor(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", 8)  # ceil(4 * 8 + 64) = 96
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={kernel}", "--nested-memory=95")
    assert line == (f"ERROR: --nested-memory=95 (from command line): L1 gets 95 MiB, below the 96 MiB kernel {kernel} "
                    "needs (8.0 MiB, about 4x that unpacked, + 64 MiB to run): give every level at least 96 MiB")


def test_memory_floor_applies_to_every_built_in_level(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", 16)  # ceil(4 * 16 + 64) = 128
    write_ini(pytester, {"memory": "512,100", "levels": "2"})
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={kernel}")
    assert line.startswith("ERROR: --nested-memory=512,100 (from ini nested_memory): L2 gets 100 MiB, below the "
                           "128 MiB kernel"), line
    assert line.endswith("give every level at least 128 MiB"), line


def test_memory_floor_with_the_kernel_from_boot(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    try:
        kernel = find_kernel().path
    except HostError as exc:
        pytest.skip(f"no default kernel on this host: {exc}")
    floor = math.ceil(4 * kernel.stat().st_size / (1 << 20) + 64)
    monkeypatch.setenv("NESTEDKVM_MEMORY", str(floor - 1))
    line = refused(pytester, monkeypatch, tmp_path)
    assert line.startswith(f"ERROR: --nested-memory={floor - 1} (from env NESTEDKVM_MEMORY): L1 gets {floor - 1} "
                           f"MiB, below the {floor} MiB kernel {kernel} needs"), line


def test_a_default_below_the_floor_names_both_levels(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", 8)  # floor 96; L2's default: 150 // 2 = 75
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={kernel}", "--nested-memory=150",
                   "--nested-levels=2")
    assert line == (f"ERROR: --nested-memory=150 (from command line): L2 would get 75 MiB by default (half of L1's "
                    f"150 MiB), below the 96 MiB kernel {kernel} needs (8.0 MiB, about 4x that unpacked, + 64 MiB "
                    "to run): give L1 at least 192 MiB, or set L2's yourself (e.g. --nested-memory=150,96)")


DUMP_MEMORY = """
import json

from pytest_nestedkvm.session import SESSION_KEY


def test_dump(pytestconfig):
    settings = pytestconfig.stash[SESSION_KEY].settings
    with open("memory.json", "w") as f:
        json.dump([settings.memory_for(level) for level in range(1, 5)], f)
"""


@pytest.mark.parametrize(("memory", "expected"), [
    ("512", [512, 256, 128, 64]),
    ("1536", [1536, 768, 384, 192]),
    ("4096", [4096, 1024, 512, 256]),
    ("", [2048, 1024, 512, 256]),
])
def test_default_memory_of_a_deeper_level_is_at_most_half_its_parents(
    pytester: pytest.Pytester, memory: str, expected: list[int]
) -> None:
    pytester.makepyfile(test_dump=DUMP_MEMORY)
    result = pytester.runpytest("--nested-levels=2", *([f"--nested-memory={memory}"] if memory else []))
    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "memory.json").read_text()) == expected


def test_memory_floor_skips_levels_that_boot_a_disk_image(tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", 8)  # floor 96
    image = qcow2(tmp_path / "disk.qcow2")
    for cli in ({"l1_image": str(image), "memory": "80"},
                {"l2_image": str(image), "memory": "200,80", "levels": "2", "kernel": str(kernel)}):
        Settings.from_sources(cli, {}).check_host_plan(accel="kvm", host_cpus=1, default_kernel=lambda: None)
    with pytest.raises(ConfigError, match="L1 gets 80 MiB"):  # L1 still boots the built-in guest
        Settings.from_sources({"l2_image": str(image), "memory": "80,70", "levels": "2", "kernel": str(kernel)},
                              {}).check_host_plan(accel="kvm", host_cpus=1, default_kernel=lambda: None)


def test_memory_floor_uses_the_default_kernel_only_when_needed(tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "vmlinuz-6.1", 8)
    asked: list[int] = []

    def default_kernel() -> Path | None:
        asked.append(1)
        return kernel

    with pytest.raises(ConfigError, match=f"below the 96 MiB kernel {kernel} needs"):
        Settings.from_sources({"memory": "90"}, {}).check_host_plan(
            accel="kvm", host_cpus=1, default_kernel=default_kernel)
    Settings.from_sources({"memory": "90", "levels": "0"}, {}).check_host_plan(
        accel="kvm", host_cpus=1, default_kernel=default_kernel)
    Settings.from_sources({"memory": "90"}, {}).check_host_plan(  # no kernel found: reported when a guest is used
        accel="kvm", host_cpus=1, default_kernel=lambda: None)
    assert asked == [1]


# --- 4. timeouts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["boot_timeout", "command_timeout"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e-300", "0.001", "1e9", "86401"])
def test_absurd_timeouts(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    option = OPTION_BY_NAME[name]
    line = refused(pytester, monkeypatch, tmp_path, f"{option.cli}={value}")
    assert line == (f"ERROR: {option.cli}='{value}' (from command line): must be from 1 to 86400 seconds (one day): "
                    "give e.g. 600")


@pytest.mark.parametrize("value", ["1", "86400", "2.5"])
def test_timeouts_from_a_second_to_a_day_are_accepted(value: str) -> None:
    settings = Settings.from_sources({"boot_timeout": value, "command_timeout": value}, {})
    assert settings.boot_timeout == settings.command_timeout == float(value)


# --- 5. --nested-login without --nested-l1-image ------------------------------------------


@pytest.mark.parametrize("source", ["cli", "env", "ini"])
def test_login_without_an_l1_image(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    args = []
    if source == "cli":
        args.append("--nested-login=tester:secret")
    elif source == "env":
        monkeypatch.setenv("NESTEDKVM_LOGIN", "tester:secret")
    else:
        write_ini(pytester, {"login": "tester:secret"})
    where = {"cli": "command line", "env": "env NESTEDKVM_LOGIN", "ini": "ini nested_login"}[source]
    line = refused(pytester, monkeypatch, tmp_path, *args)
    assert line == (f"ERROR: --nested-login=tester:*** (from {where}): a serial-console login is only used for a "
                    "--nested-l1-image, and none is set: pass --nested-l1-image PATH too, or drop --nested-login")
    assert "secret" not in line


# --- 6. --nested-kernel that is not a kernel ---------------------------------------------


@pytest.mark.parametrize(("content", "found"), [
    (b"hello world\nsecond line\n", "text ('hello world second line')"),
    (bytes(range(200, 256)) * 40, "binary data starting c8 c9 ca cb cc cd ce cf"),
    (b"", "an empty file"),
    (b"\x1f\x8b\x08\x00" + b"\0" * 100, "gzip data (an initramfs?)"),
    (b"070701" + b"0" * 200, "a cpio archive (an initramfs?)"),
], ids=["text", "binary", "empty", "gzip", "cpio"])
def test_kernel_that_is_not_a_kernel_image(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes, found: str
) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(content)
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={kernel}")
    assert line == (f"ERROR: --nested-kernel='{kernel}' (from command line): {kernel} is not a kernel image: it is "
                    f"{found}, with no bzImage header (\"HdrS\" at 0x202) nor ELF magic; pass arch/x86/boot/bzImage "
                    "(or a /boot/vmlinuz-*)")


def test_a_bzimage_or_an_elf_vmlinux_is_accepted(tmp_path: Path) -> None:
    bzimage = fake_bzimage(tmp_path / "bzImage", 1)
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 100)
    for kernel in (bzimage, vmlinux):
        assert Settings.from_sources({"kernel": str(kernel)}, {}).kernel == kernel.resolve()


# --- 7. vCPUs -----------------------------------------------------------------------------


def test_l1_vcpus_above_the_host_cores_under_tcg(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    smp = HOST_CORES + 1
    monkeypatch.setenv("NESTEDKVM_SMP", str(smp))
    line = refused(pytester, monkeypatch, tmp_path, "--nested-accel=tcg")
    assert line == (f"ERROR: --nested-smp={smp} (from env NESTEDKVM_SMP): L1 gets {smp} vCPUs under TCG, but this "
                    f"process may use only {HOST_CORES} host cores and each TCG vCPU keeps one busy: "
                    f"use --nested-smp={HOST_CORES} or fewer")


def test_l1_vcpus_above_the_host_cores_only_matter_under_tcg_with_a_guest() -> None:
    settings = Settings.from_sources({"smp": "64"}, {})
    settings.check_host_plan(accel="kvm", host_cpus=2, default_kernel=lambda: None)
    Settings.from_sources({"smp": "64", "levels": "0"}, {}).check_host_plan(
        accel="tcg", host_cpus=2, default_kernel=lambda: None)
    with pytest.raises(ConfigError, match="L1 gets 64 vCPUs under TCG"):
        settings.check_host_plan(accel="tcg", host_cpus=2, default_kernel=lambda: None)


def test_a_level_with_more_vcpus_than_its_parent(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    line = refused(pytester, monkeypatch, tmp_path, "--nested-smp=1,2", "--nested-levels=2")
    assert line == ("ERROR: --nested-smp=1,2 (from command line): L2 gets 2 vCPUs but its parent L1 has only 1; "
                    "give each level at most as many vCPUs as the level that runs it")


# --- 8. the login's password from the environment or an ini file ---------------------------


DUMP_LOGIN = """
import json

from pytest_nestedkvm.session import SESSION_KEY


def test_dump(pytestconfig):
    settings = pytestconfig.stash[SESSION_KEY].settings
    with open("login.json", "w") as f:
        json.dump({"login": settings.login, "source": settings.describe_source("login")}, f)
"""


@pytest.mark.parametrize("source", ["env", "ini"])
def test_login_password_from_env_or_ini_stays_off_the_command_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    called = fake_qemu(monkeypatch, tmp_path)
    image = qcow2(tmp_path / "l1.qcow2")
    if source == "env":
        monkeypatch.setenv("NESTEDKVM_LOGIN", "tester:s3cret")
    else:
        write_ini(pytester, {"login": "tester:s3cret"})
    pytester.makepyfile(test_dump=DUMP_LOGIN)
    args = [f"--nested-l1-image={image}"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "login.json").read_text())
    assert data == {"login": ["tester", "s3cret"],
                    "source": "env NESTEDKVM_LOGIN" if source == "env" else "ini nested_login"}
    assert not any("s3cret" in arg for arg in args)
    assert not called.exists()


# --- 9. --nested-kernel naming a kernel build directory -------------------------------------


def test_kernel_tree_without_a_bzimage(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)  # configured, `make` not run yet
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={tree}")
    assert line == (f"ERROR: --nested-kernel='{tree}' (from command line): {tree} has no arch/x86/boot/bzImage: "
                    "build it there with `make bzImage modules`, or pass a kernel image file")


def test_kernel_tree_without_modules_order(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = build_tree(tmp_path / "linux", modules=False)  # after `make bzImage` alone
    monkeypatch.setenv("NESTEDKVM_KERNEL", str(tree))
    line = refused(pytester, monkeypatch, tmp_path)
    assert line == (f"ERROR: --nested-kernel={tree} (from env NESTEDKVM_KERNEL): {tree} has no modules.order: "
                    "build the modules there with `make modules`, or pass --nested-modules DIR")


def test_kernel_tree_with_modules_not_built(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = build_tree(tmp_path / "linux", built=False)  # modules.order listed, no .ko files
    write_ini(pytester, {"kernel": str(tree)})
    line = refused(pytester, monkeypatch, tmp_path)
    assert line == (f"ERROR: --nested-kernel={tree} (from ini nested_kernel): 3 of the 3 modules in "
                    f"{tree}/modules.order are not built (e.g. drivers/virtio/virtio_ring.ko): run `make modules` "
                    "there")


def test_kernel_tree_with_a_stale_bzimage(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = build_tree(tmp_path / "linux", built=False)
    (tree / "include/config/kernel.release").write_text("9.9.1-tree\n")  # LOCALVERSION changed, not rebuilt
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={tree}")
    assert line == (f"ERROR: --nested-kernel='{tree}' (from command line): {tree}/arch/x86/boot/bzImage is release "
                    "9.9.0-tree but the tree is now 9.9.1-tree: rebuild it with `make bzImage modules`")


def test_kernel_tree_without_depmod(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = build_tree(tmp_path / "linux")
    pytester.makeconftest("from pytest_nestedkvm import kernel_tree\nkernel_tree.SBIN_DIRS = ()\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # nothing but the fake QEMU added by refused()
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={tree}")
    assert line == (f"ERROR: --nested-kernel={tree} (from command line): depmod is not installed (it indexes the "
                    "tree's modules for the guests): apt-get install kmod, or pass --nested-modules DIR")


DUMP_KERNEL = """
import json, os
from pathlib import Path

from pytest_nestedkvm.boot.initramfs import cache_dir
from pytest_nestedkvm.session import SESSION_KEY


def test_dump(pytestconfig):
    session = pytestconfig.stash[SESSION_KEY]
    written_before = cache_dir().exists()
    kernel = session.lab.kernel  # the first use prepares the tree's modules
    with open("kernel.json", "w") as f:
        json.dump({"setting": str(session.settings.kernel), "path": str(kernel.path), "release": kernel.release,
                   "modules": str(kernel.modules_dir), "written_before": written_before}, f)
"""


def test_kernel_tree_is_taken_at_configure_time_and_prepared_on_first_use(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    called = fake_qemu(monkeypatch, tmp_path)
    tree = build_tree(tmp_path / "linux")
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    pytester.makepyfile(test_dump=DUMP_KERNEL)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kernel={tree}", "--nested-levels=2")
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "kernel.json").read_text())
    assert data["written_before"] is False  # configure time checked the tree and wrote nothing
    assert (data["setting"], data["path"]) == (str(tree), f"{tree}/arch/x86/boot/bzImage")
    assert data["release"] == RELEASE
    modules = Path(data["modules"])
    assert modules.is_relative_to(cache / "pytest-nestedkvm/modules") and modules.name == RELEASE
    assert (modules / "modules.dep").is_file()
    assert not called.exists()


# --- the project itself -----------------------------------------------------------------


def test_a_project_that_holds_the_key_store_of_home_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pytester runs pytest with $HOME at its rootdir, as a CI account runs it in its home (/var/lib/ci).
    (pytester.path / ".ssh").mkdir()
    (pytester.path / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    line = refused(pytester, monkeypatch, tmp_path)
    assert line == (f"ERROR: pytest's rootdir {pytester.path}: it holds or lies in {pytester.path / '.ssh'}, a secret "
                    "location of this host: run pytest from a project directory (or give --rootdir one)")


def test_the_root_as_rootdir_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    line = refused(pytester, monkeypatch, tmp_path, "--rootdir=/")
    assert line == ("ERROR: pytest's rootdir /: it is a secret location of this host: run pytest from a project "
                    "directory (or give --rootdir one)")


# --- disk images read only themselves ---------------------------------------------------


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize("option", ["--nested-l1-image", "--nested-l2-image"])
def test_an_image_whose_backing_file_is_a_host_file_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, option: str
) -> None:
    image = tmp_path / "images" / "evil.qcow2"
    image.parent.mkdir()
    qemu_img("create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(image))
    line = refused(pytester, monkeypatch, tmp_path, f"{option}={image}", "--nested-levels=2")
    assert line.endswith(f"{image} reads /etc/hostname (its backing file), which is not in the image's own "
                         f"directory {image.parent} nor in a --nested-share path: the guest would see it; put it "
                         "there, share its directory, or make a standalone image (qemu-img convert -O qcow2)")


def test_an_image_whose_data_file_lies_elsewhere_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    image = tmp_path / "images" / "split.qcow2"
    image.parent.mkdir()
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(image), "1M")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-l1-image={image}")
    assert f"{image} reads {tmp_path / 'data.raw'} (its data file), which is not in the image's own" in line


def test_an_image_with_its_backing_file_beside_it_is_accepted(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    assert Settings.from_sources({"l1_image": str(overlay)}).l1_image == overlay


def test_an_image_whose_backing_file_lies_in_a_share_is_accepted_and_elsewhere_not(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    (tmp_path / "project").mkdir()
    base, overlay = tmp_path / "bases" / "base.qcow2", tmp_path / "project" / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    shared = Settings.from_sources({"l1_image": str(overlay), "share": str(tmp_path / "bases")}, env={})
    assert shared.l1_image == overlay
    with pytest.raises(ConfigError, match=r"reads .*base\.qcow2 \(its backing file\)") as caught:
        Settings.from_sources({"l1_image": str(overlay)}, env={})
    assert caught.value.option == "l1_image"


# --- options that would do nothing in the combination given ---------------------------------


@pytest.mark.parametrize("case", ["l2 image with l1 image", "kernel with l1 image", "modules without kernel",
                                  "known failures without a suite"])
def test_options_that_would_do_nothing_together_are_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    kernel = fake_bzimage(tmp_path / "vmlinuz-6.1", 8)
    modules = tmp_path / "modules"
    modules.mkdir()
    known = tmp_path / "known.txt"
    known.write_text("kut:msr  no such MSR under TCG\n")
    args, start = {
        "l2 image with l1 image": (
            (f"--nested-l1-image={image}", f"--nested-l2-image={image}", "--nested-levels=2"),
            f"--nested-l2-image={image} (from command line): L2 runs inside L1, and inside a --nested-l1-image L2 is"),
        "kernel with l1 image": (
            (f"--nested-l1-image={image}", f"--nested-kernel={kernel}"),
            f"--nested-kernel={kernel} (from command line): a --nested-l1-image boots its own kernel"),
        "modules without kernel": (
            (f"--nested-modules={modules}",),
            f"--nested-modules={modules} (from command line): the modules are for a --nested-kernel, and none"),
        "known failures without a suite": (
            (f"--nested-known-failures={known}",),
            f"--nested-known-failures={known} (from command line): known failures are of --nested-kut, "
            "--nested-kselftests and --nested-xtf, and none is set"),
    }[case]
    line = refused(pytester, monkeypatch, tmp_path, *args)
    assert line.startswith(f"ERROR: {start}"), line


# --- the user's QEMU -------------------------------------------------------------------------


def test_a_qemu_build_directory_without_a_binary_is_refused(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    build = tmp_path / "qemu-build"
    build.mkdir()
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-qemu={build}")
    assert line == (f"ERROR: --nested-qemu='{build}' (from command line): {build} is a directory without "
                    f"qemu-system-{platform.machine()}: build QEMU there (make), or pass the binary")


def test_a_qemu_too_old_for_the_plugin_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    old = tmp_path / "old-qemu"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 5.2.0'\n")
    old.chmod(0o755)
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-qemu={old}")
    assert line == (f"ERROR: --nested-qemu='{old}' (from command line): {old} is QEMU 5.2.0; the plugin needs 6.0 "
                    "or newer")


# --- Xen as L1 (issue 22) -----------------------------------------------------------------


def test_xen_with_an_l1_image_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    line = refused(pytester, monkeypatch, tmp_path, "--nested-hypervisor=xen", f"--nested-l1-image={image}")
    assert line == ("ERROR: --nested-hypervisor=xen (from command line): L1 boots Xen with the built-in guest as "
                    "dom0, and a --nested-l1-image boots its own system: drop --nested-l1-image or use "
                    "--nested-hypervisor=kvm")


def test_a_xen_that_is_not_a_xen_image_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    not_xen = fake_bzimage(tmp_path / "bzImage", 1)
    monkeypatch.setenv("NESTEDKVM_HYPERVISOR", "xen")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-xen={not_xen}")
    assert line == (f"ERROR: --nested-xen='{not_xen}' (from command line): {not_xen} is not a Xen image: it has no "
                    "multiboot header in its first 8 KiB; pass xen/xen or xen.gz of a Xen build (not xen-syms nor "
                    "xen.efi)")


def test_an_unknown_hypervisor_from_ini_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    write_ini(pytester, {"hypervisor": "bhyve"})
    line = refused(pytester, monkeypatch, tmp_path)
    assert line == "ERROR: --nested-hypervisor='bhyve' (from ini nested_hypervisor): expected one of kvm, xen"


def test_a_dom0_below_the_kernels_floor_is_refused(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", 8)  # floor 96: L1 boots, its half for dom0 does not
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kernel={kernel}", "--nested-memory=150",
                   "--nested-hypervisor=xen")
    assert line == (f"ERROR: --nested-memory=150 (from command line): with --nested-hypervisor=xen dom0 gets 75 MiB "
                    f"of L1's 150 MiB, below the 96 MiB kernel {kernel} needs (8.0 MiB, about 4x that unpacked, "
                    "+ 64 MiB to run): give L1 at least 192 MiB")
