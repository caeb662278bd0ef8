"""Xen as L1's hypervisor without QEMU: the image check, the packages unpacked in the cache, the
options, the plan and the argv of a Xen L1 (the real boot is tests/integration/test_xen.py)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_plan import FILES, host, settings

from pytest_nestedkvm.base.errors import ConfigError, HostError
from pytest_nestedkvm.base.host import QemuInfo
from pytest_nestedkvm.boot import xen
from pytest_nestedkvm.boot.layout import PORT_DIR
from pytest_nestedkvm.boot.qemu import HostEnds, ParentEnds, build_argv
from pytest_nestedkvm.boot.xen import XEN_PACKAGES, XenBoot, check_image, has_multiboot_header, hypervisor_image
from pytest_nestedkvm.config.plan import builtin_spec, skip_reason

TOOLS = Path("/home/nk/.cache/nestedkvm/xen-4.17.7-0123456789abcdef")
XEN_FILES = dataclasses.replace(FILES, xen=XenBoot(hypervisor=TOOLS / "boot/xen", tools=TOOLS))


def multiboot(path: Path, offset: int = 4096, *, flags: int = 3, good: bool = True) -> Path:
    """A file with a multiboot (v1) header at `offset`, its checksum right or wrong."""
    magic = xen.MULTIBOOT_MAGIC
    checksum = (-(magic + flags) + (0 if good else 1)) & 0xFFFFFFFF
    header = b"".join(n.to_bytes(4, "little") for n in (magic, flags, checksum))
    path.write_bytes(b"\x7fELF" + bytes(offset - 4) + header + bytes(64))
    return path


# -- the image ---------------------------------------------------------------------------------


def test_a_multiboot_image_is_taken_plain_or_gzipped(tmp_path: Path) -> None:
    plain = multiboot(tmp_path / "xen")
    packed = tmp_path / "xen.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert check_image(plain) == plain
    assert check_image(packed) == packed


@pytest.mark.parametrize("content", [b"", b"\x7fELF" + bytes(9000), b"\x1f\x8bnot gzip at all"])
def test_anything_else_is_not_a_xen_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "xen-syms"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a Xen image: it has no multiboot header in its first 8 KiB; "
                                         r"pass xen/xen or xen.gz"):
        check_image(path)


def test_a_header_needs_its_checksum_alignment_and_place(tmp_path: Path) -> None:
    assert not has_multiboot_header(multiboot(tmp_path / "a", good=False).read_bytes())
    assert not has_multiboot_header(multiboot(tmp_path / "b", offset=4098).read_bytes())
    assert not has_multiboot_header(multiboot(tmp_path / "c", offset=8192).read_bytes())


def test_a_gzipped_image_is_decompressed_once_into_the_cache(tmp_path: Path) -> None:
    plain = multiboot(tmp_path / "xen")
    packed = tmp_path / "xen.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    cache = tmp_path / "cache"
    image = hypervisor_image(packed, cache)
    assert image.parent == cache and image.read_bytes() == plain.read_bytes()
    assert hypervisor_image(packed, cache) == image
    assert hypervisor_image(plain, cache) == plain  # already what QEMU boots


# -- the packages ------------------------------------------------------------------------------


def fake_deb(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A real .deb (dpkg-deb --build) holding `files`, named as apt-get download names it."""
    tree = directory / f".tree-{package}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
                                         "Maintainer: nobody <nobody@example.org>\nDescription: fake\n")
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    deb = directory / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return deb


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


@needs_dpkg
def test_packages_put_in_the_cache_by_hand_are_unpacked_once_keyed_by_version(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    debs = cache / xen.DEBS_DIR
    debs.mkdir(parents=True)
    image = gzip.compress(multiboot(tmp_path / "xen").read_bytes())
    for package in XEN_PACKAGES:
        files = {"boot/xen-4.17-amd64.gz": image} if package == xen.HYPERVISOR_PACKAGE else {
            f"usr/share/doc/{package}/copyright": b"fake"}
        fake_deb(debs, package, "4.17.7+13-0+deb12u1", files)
    monkeypatch.setenv("PATH", f"{tmp_path / 'no-apt'}:{os.environ['PATH']}")  # apt-get is never asked
    (tmp_path / "no-apt").mkdir()
    (tmp_path / "no-apt/apt-get").write_text("#!/bin/sh\nexit 99\n")
    (tmp_path / "no-apt/apt-get").chmod(0o755)
    tree = xen.unpacked_packages(cache)
    assert tree.name.startswith("xen-4.17.7-")
    assert (tree / xen.TREE_HYPERVISOR).read_bytes() == gzip.decompress(image)
    assert (tree / "usr/share/doc/libyajl2/copyright").read_bytes() == b"fake"
    stamp = (tree / xen.TREE_HYPERVISOR).stat().st_mtime_ns
    assert xen.unpacked_packages(cache) == tree
    assert (tree / xen.TREE_HYPERVISOR).stat().st_mtime_ns == stamp  # not unpacked again
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []


def test_packages_that_cannot_be_fetched_are_named_with_the_offline_way(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package xen-utils-4.17' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(HostError) as caught:
        xen.unpacked_packages(cache)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot fetch Xen's packages {', '.join(XEN_PACKAGES)} with apt-get download "
                              "(E: Unable to locate package xen-utils-4.17): on a machine that reaches a Debian 12 "
                              f"mirror run `apt-get download {' '.join(XEN_PACKAGES)}`, copy the .deb files into "
                              f"{cache / xen.DEBS_DIR} and run again")
    assert list((cache / xen.DEBS_DIR).iterdir()) == []


def test_without_apt_get_the_message_says_where_to_put_the_packages(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostError, match=r"are not in .*xen-debs and apt-get is not installed to fetch them: on a "
                                        r"machine that reaches a Debian 12 mirror"):
        xen.unpacked_packages(tmp_path / "cache")


# -- options, plan, argv -----------------------------------------------------------------------


def test_the_hypervisor_is_kvm_unless_xen_is_asked_for() -> None:
    assert settings().hypervisor == "kvm"
    assert settings(hypervisor="Xen").hypervisor == "xen"
    with pytest.raises(ConfigError, match=r"^--nested-hypervisor='hyperv' \(from command line\): expected one of "
                                          r"kvm, xen$"):
        settings(hypervisor="hyperv")


def test_xen_with_an_l1_image_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(ConfigError, match=r"^--nested-hypervisor=xen \(from command line\): L1 boots Xen with the "
                                          r"built-in guest as dom0, and a --nested-l1-image boots its own system"):
        settings(hypervisor="xen", l1_image=str(image))


def test_a_xen_image_without_xen_as_the_hypervisor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a Xen image is booted only with --nested-hypervisor=xen"):
        settings(xen=str(multiboot(tmp_path / "xen")))
    assert settings(hypervisor="xen", xen=str(multiboot(tmp_path / "xen"))).xen == tmp_path / "xen"


def test_a_xen_l1_boots_xen_with_dom0_and_its_initramfs_as_multiboot_modules() -> None:
    spec = builtin_spec(1, settings(hypervisor="xen"), host(), XEN_FILES)
    assert spec.hypervisor == "xen" and spec.firmware is None
    argv = build_argv(spec, HostEnds(Path("/run/nk")))
    assert argv[argv.index("-kernel") + 1] == str(TOOLS / "boot/xen")
    assert argv[argv.index("-append") + 1] == "console=com1 dom0_mem=1024M,max:1024M"
    kernel, initrd = argv[argv.index("-initrd") + 1].split(",")
    assert kernel.startswith(f"{FILES.kernel} console=hvc0 panic=-1 ")
    assert "console=ttyS0" not in kernel and kernel.endswith(f" nestedkvm.xen={TOOLS}")
    assert "nestedkvm.mount=nk0:/etc" in kernel
    assert initrd == str(FILES.initrd)


def test_smap_is_off_only_under_tcg_of_a_qemu_before_10_and_a_comma_in_a_module_is_doubled() -> None:
    tcg = builtin_spec(1, settings(hypervisor="xen", memory="1536", append="a=1,2"), host("tcg", "max"), XEN_FILES)
    argv = build_argv(tcg, HostEnds(Path("/run/nk")))
    assert argv[argv.index("-append") + 1] == "console=com1 dom0_mem=768M,max:768M smap=0"
    assert " a=1,,2 " in argv[argv.index("-initrd") + 1]
    qemu10 = host("tcg", "max", qemu=QemuInfo(binary="/opt/qemu10/usr/bin/qemu-system-x86_64", version="10.0.2"))
    assert builtin_spec(1, settings(hypervisor="xen"), qemu10, XEN_FILES).xen.args == (  # type: ignore[union-attr]
        "console=com1 dom0_mem=1024M,max:1024M")


def test_kvm_l1_keeps_its_kernel_and_levels_below_a_xen_domu_are_skipped() -> None:
    spec = builtin_spec(1, settings(), host(), XEN_FILES)
    assert spec.hypervisor == "kvm" and spec.xen is None and spec.kernel == FILES.kernel
    assert skip_reason(2, settings(hypervisor="xen", levels="2"), host()) is None
    assert skip_reason(3, settings(hypervisor="xen", levels="3"), host()) == (
        "L3 inside a Xen domU is not supported yet: with --nested-hypervisor=xen the session provides L1 (dom0) "
        "and L2 (an HVM domU)")


# -- L2 as a domU ------------------------------------------------------------------------------

BZIMAGE = Path("/home/nk/.cache/nestedkvm/boot-6.1/vmlinuz-6.1")
DOMU_FILES = dataclasses.replace(XEN_FILES, bzimage=BZIMAGE)


def xl_settings(argv: list[str]) -> dict[str, str]:
    assert argv[:4] == ["xl", "create", "-F", "/dev/null"]  # xl returns when the domain is gone
    return dict(arg.split("=", 1) for arg in argv[4:])


def test_l2_of_a_xen_l1_is_an_hvm_domu_of_the_bzimage_whose_device_model_carries_its_ports() -> None:
    spec = builtin_spec(2, settings(hypervisor="xen", levels="2"), host("tcg", "max"), DOMU_FILES)
    assert spec.domu and spec.kernel == BZIMAGE and spec.memory_mib == 480  # half of L1's 2048 beside dom0 and Xen
    assert spec.runs_as == "a Xen HVM domU, cpuid host,rdtscp=0"
    config = xl_settings(build_argv(spec, ParentEnds()))
    assert {key: config[key] for key in ("name", "type", "memory", "vcpus", "cpuid", "kernel", "on_reboot")} == {
        "name": '"nestedkvm-l2"', "type": '"hvm"', "memory": "480", "vcpus": "1", "cpuid": '"host,rdtscp=0"',
        "kernel": f'"{BZIMAGE}"', "on_reboot": '"destroy"'}  # a panic (panic=-1 reboots) ends the domain
    assert "serial" not in config  # xl's -serial would come first and make the console ttyS1
    assert config["cmdline"].startswith('"console=ttyS0 panic=-1 ') and " nestedkvm.ports=4 " in config["cmdline"]
    model = config["device_model_args"]
    port = f"{PORT_DIR}/port.nestedkvm.l2"
    for expected in (f'"pipe,path={port}.console,id=console", "-serial", "chardev:console"',
                     f'"pipe,path={port}.qmp,id=qmp", "-mon", "chardev=qmp,mode=control"',
                     '"virtserialport,bus=vser2.0,chardev=port1,name=nestedkvm.cmd-out"',
                     '"virtio-9p-pci,fsdev=fs0,mount_tag=nk0"'):
        assert expected in model
    assert "-nic" not in model and "pvpanic" not in model  # no user networking in Debian's qemu-system-xen


def test_on_hardware_the_domu_keeps_the_hosts_cpuid_and_quotes_are_refused() -> None:
    spec = builtin_spec(2, settings(hypervisor="xen", levels="2"), host(), DOMU_FILES)
    assert xl_settings(build_argv(spec, ParentEnds()))["cpuid"] == '"host"'
    with pytest.raises(ValueError, match=r"cannot be an xl.cfg string \(it holds a quote"):
        build_argv(dataclasses.replace(spec, append='say="hi"'), ParentEnds())


def test_a_domu_larger_than_what_xen_has_beside_dom0_and_an_l2_image_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(ConfigError, match=r"^--nested-memory=2048,1024 \(from command line\): L2 \(a Xen domU\) gets "
                                          r"1024 MiB, and L1's Xen has 960 MiB beside dom0's 1024"):
        settings(hypervisor="xen", levels="2", memory="2048,1024")
    with pytest.raises(ConfigError, match=r"L2 in a Xen L1 is the built-in guest as an HVM domU; a "
                                          r"--nested-l2-image there is not supported yet"):
        settings(hypervisor="xen", levels="2", l2_image=str(image))


def test_a_dom0_command_line_xen_would_cut_is_refused() -> None:
    spec = builtin_spec(1, settings(hypervisor="xen", append="x" * 700), host(), XEN_FILES)
    with pytest.raises(HostError, match=r"^dom0's kernel command line is \d+ bytes, and Xen passes at most 1023 to a "
                                        r"PV dom0: it names every export's path; use shorter paths"):
        build_argv(spec, HostEnds(Path("/run/nk")))
