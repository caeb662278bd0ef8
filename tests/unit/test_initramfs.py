"""Unit tests for the initramfs builder on fake kernels and fake module trees (no QEMU, no root)."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_nestedkvm.base.errors import HostError
from pytest_nestedkvm.boot.initramfs import (
    KVM_MODULES,
    NINEP_OPTIONS,
    OPTIONAL_MODULES,
    REQUIRED_MODULES,
    Kernel,
    boot_image,
    build_initramfs,
    find_kernel,
    guest_boot_dir,
    init_script,
    kernel_release,
    module_closure,
    module_name,
    read_module,
)
from pytest_nestedkvm.boot.layout import TMPFS_DIRS
from pytest_nestedkvm.boot.qemu import GuestSpec, HostEnds, build_argv
from pytest_nestedkvm.boot.view import Export, View

RELEASE = "6.1.0-99-amd64"

# path -> its dependencies, in the modules.dep format (paths relative to the modules dir).
MODULES: dict[str, list[str]] = {
    "kernel/drivers/virtio/virtio_ring.ko": [],
    "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": [],
    "kernel/drivers/virtio/virtio_pci.ko.xz": [
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
    ],
    "kernel/drivers/char/virtio_console.ko.gz": [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
    ],
    "kernel/fs/netfs/netfs.ko": [],
    "kernel/net/9p/9pnet.ko": ["kernel/fs/netfs/netfs.ko"],
    "kernel/net/9p/9pnet_virtio.ko": [
        "kernel/net/9p/9pnet.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
    ],
    "kernel/fs/9p/9p.ko.xz": ["kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko"],
    "kernel/virt/lib/irqbypass.ko": [],
    "kernel/drivers/crypto/ccp/ccp.ko": [],
    "kernel/arch/x86/kvm/kvm.ko.xz": ["kernel/virt/lib/irqbypass.ko"],
    "kernel/arch/x86/kvm/kvm-amd.ko.xz": ["kernel/arch/x86/kvm/kvm.ko.xz", "kernel/drivers/crypto/ccp/ccp.ko"],
    "kernel/arch/x86/kvm/kvm-intel.ko": ["kernel/arch/x86/kvm/kvm.ko.xz"],
}
BUILTIN = ["kernel/drivers/block/loop.ko", "kernel/fs/ext4/ext4.ko"]


def plain_module(path: str) -> bytes:
    """The uncompressed bytes of a fake module: an ELF magic and its name."""
    return b"\x7fELF\x02\x01\x01\x00" + module_name(path).encode() + b"\x00" * 8


def write_modules(
    modules_dir: Path,
    modules: Mapping[str, Sequence[str]] = MODULES,
    builtin: Sequence[str] = BUILTIN,
) -> Path:
    modules_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, deps in modules.items():
        lines.append(f"{path}: {' '.join(deps)}".rstrip() if deps else f"{path}:")
        target = modules_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        data = plain_module(path)
        if path.endswith(".xz"):
            data = lzma.compress(data, format=lzma.FORMAT_XZ)
        elif path.endswith(".gz"):
            data = gzip.compress(data)
        target.write_bytes(data)
    (modules_dir / "modules.dep").write_text("\n".join(lines) + "\n")
    (modules_dir / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    return modules_dir


def fake_bzimage(version: str | None, payload: bytes = b"", size: int = 0x1000) -> bytes:
    """A setup header with "HdrS" and a kernel_version pointer; `payload` after the header."""
    data = bytearray(size)
    if version is not None:
        data[0x202:0x206] = b"HdrS"
        pointer = 0x180
        data[0x20E:0x210] = pointer.to_bytes(2, "little")
        text = f"{version} (builder@buildhost) #1 SMP PREEMPT_DYNAMIC Debian".encode() + b"\0"
        data[pointer + 0x200 : pointer + 0x200 + len(text)] = text
    return bytes(data) + payload


def assert_dependencies_first(ordered: Sequence[Path], modules_dir: Path) -> None:
    names = [module_name(str(p)) for p in ordered]
    for path in ordered:
        rel = str(path.relative_to(modules_dir))
        for dep in MODULES[rel]:
            assert names.index(module_name(dep)) < names.index(module_name(rel)), (dep, rel, names)


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path / "lib" / "modules" / RELEASE)


# -- module names and the closure ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/arch/x86/kvm/kvm-amd.ko.xz", "kvm_amd"),
        ("kernel/arch/x86/kvm/kvm-intel.ko", "kvm_intel"),
        ("kernel/net/9p/9pnet_virtio.ko.gz", "9pnet_virtio"),
        ("kernel/fs/9p/9p.ko.zst", "9p"),
        ("virtio_pci.ko", "virtio_pci"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_closure_orders_dependencies_first(modules_dir: Path) -> None:
    ordered = module_closure(modules_dir, ("9p", "virtio_pci"))
    names = [module_name(str(p)) for p in ordered]
    assert names == ["netfs", "9pnet", "9p", "virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci"]
    assert all(p.is_file() for p in ordered)
    assert_dependencies_first(ordered, modules_dir)


def test_closure_dedups_shared_dependencies(modules_dir: Path) -> None:
    ordered = module_closure(modules_dir, ("virtio_pci", "virtio_console", "9pnet_virtio", "virtio_pci"))
    names = [module_name(str(p)) for p in ordered]
    assert len(names) == len(set(names))
    assert names.count("virtio") == 1
    assert set(names) == {
        "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci", "virtio_console", "netfs", "9pnet",
        "9pnet_virtio",
    }
    assert_dependencies_first(ordered, modules_dir)


def test_closure_of_kvm_amd(modules_dir: Path) -> None:
    names = [module_name(str(p)) for p in module_closure(modules_dir, ("kvm_amd",))]
    assert names == ["irqbypass", "kvm", "ccp", "kvm_amd"]


def test_closure_skips_absent_optional_modules(modules_dir: Path) -> None:
    ordered = module_closure(modules_dir, ("virtio_net", "pvpanic_pci", "virtio_console"), ("virtio_console",))
    assert [module_name(str(p)) for p in ordered] == ["virtio_ring", "virtio", "virtio_console"]


def test_closure_builtin_required_module_is_satisfied(tmp_path: Path) -> None:
    modules = {k: v for k, v in MODULES.items() if "virtio_console" not in k}
    mdir = write_modules(tmp_path / "m", modules, [*BUILTIN, "kernel/drivers/char/virtio_console.ko"])
    ordered = module_closure(mdir, REQUIRED_MODULES, REQUIRED_MODULES)
    names = [module_name(str(p)) for p in ordered]
    assert "virtio_console" not in names
    assert "virtio_pci" in names and "9p" in names


def test_closure_missing_required_modules_raise(tmp_path: Path) -> None:
    modules = {k: v for k, v in MODULES.items() if "virtio_console" not in k and "/9p.ko" not in k}
    mdir = write_modules(tmp_path / "m", modules)
    with pytest.raises(HostError) as info:
        module_closure(mdir, REQUIRED_MODULES, REQUIRED_MODULES)
    message = str(info.value)
    assert "virtio_console" in message
    assert "9p" in message.replace("9pnet", "")
    assert "virtio_pci," not in message and "virtio_pci " not in message


def test_closure_without_modules_builtin_file(tmp_path: Path) -> None:
    mdir = write_modules(tmp_path / "m")
    (mdir / "modules.builtin").unlink()
    assert [module_name(str(p)) for p in module_closure(mdir, ("kvm",), ("kvm",))] == ["irqbypass", "kvm"]
    with pytest.raises(HostError, match="loop"):
        module_closure(mdir, ("loop",), ("loop",))


def test_read_module_decompresses(modules_dir: Path) -> None:
    for rel in ("kernel/drivers/virtio/virtio_pci.ko.xz", "kernel/drivers/char/virtio_console.ko.gz",
                "kernel/virt/lib/irqbypass.ko"):
        assert read_module(modules_dir / rel) == plain_module(rel)
    assert (modules_dir / "kernel/drivers/virtio/virtio_pci.ko.xz").read_bytes() != plain_module("virtio_pci.ko")


# -- kernel_release and find_kernel ------------------------------------------------------------


def test_kernel_release_from_setup_header(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage("6.8.0-rc3-test+"))
    assert kernel_release(kernel) == "6.8.0-rc3-test+"


def test_kernel_release_header_wins_over_filename(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-1.2.3"
    kernel.write_bytes(fake_bzimage("6.1.0-18-amd64"))
    assert kernel_release(kernel) == "6.1.0-18-amd64"


def test_kernel_release_falls_back_to_filename(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-7-cloud-amd64"
    kernel.write_bytes(fake_bzimage(None))
    assert kernel_release(kernel) == "6.1.0-7-cloud-amd64"


def test_kernel_release_empty_version_falls_back_to_filename(tmp_path: Path) -> None:
    data = bytearray(fake_bzimage(None))
    data[0x202:0x206] = b"HdrS"  # a header whose version pointer leads to an empty string
    kernel = tmp_path / "vmlinuz-5.10.0-1"
    kernel.write_bytes(bytes(data))
    assert kernel_release(kernel) == "5.10.0-1"


def test_kernel_release_rejects_non_kernel(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a kernel\n" * 100)
    with pytest.raises(HostError, match="not a Linux bzImage"):
        kernel_release(notes)


def make_root(root: Path, kernels: Sequence[str], with_modules: Sequence[str]) -> Path:
    for release in kernels:
        (root / "boot").mkdir(parents=True, exist_ok=True)
        (root / "boot" / f"vmlinuz-{release}").write_bytes(fake_bzimage(release))
    for release in with_modules:
        write_modules(root / "lib" / "modules" / release, {"kernel/virt/lib/irqbypass.ko": []}, [])
    (root / "boot").mkdir(parents=True, exist_ok=True)
    return root


def test_find_kernel_picks_newest_with_modules(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64", "6.5.0-1-amd64"],
        ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"],  # 6.5 has no modules
    )
    kernel = find_kernel(root=root)
    assert kernel.release == "6.1.0-10-amd64"  # numerically newer than -9
    assert kernel.path == root / "boot" / "vmlinuz-6.1.0-10-amd64"
    assert kernel.modules_dir == root / "lib" / "modules" / "6.1.0-10-amd64"


def test_find_kernel_prefers_the_running_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(tmp_path, ["5.10.0-30-amd64", "6.1.0-10-amd64"], ["5.10.0-30-amd64", "6.1.0-10-amd64"])
    monkeypatch.setattr(os, "uname", lambda: SimpleNamespace(release="5.10.0-30-amd64"))
    assert find_kernel(root=root).release == "5.10.0-30-amd64"


def test_find_kernel_none_with_modules(tmp_path: Path) -> None:
    root = make_root(tmp_path, ["6.1.0-10-amd64"], ["6.1.0-11-amd64"])
    with pytest.raises(HostError) as info:
        find_kernel(root=root)
    assert "apt-get install linux-image-amd64" in str(info.value)
    assert "--nested-kernel" in str(info.value)


def test_find_kernel_empty_boot(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="linux-image-amd64"):
        find_kernel(root=make_root(tmp_path, [], []))


def test_find_kernel_override(tmp_path: Path) -> None:
    root = make_root(tmp_path, [], ["6.9.0-custom"])
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage("6.9.0-custom"))
    kernel = find_kernel(image, root=root)
    assert kernel == Kernel(image, "6.9.0-custom", root / "lib" / "modules" / "6.9.0-custom")


def test_find_kernel_override_without_modules(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage("6.9.0-custom"))
    with pytest.raises(HostError, match="--nested-modules"):
        find_kernel(image, root=make_root(tmp_path / "r", [], []))
    explicit = write_modules(tmp_path / "out" / "lib" / "modules" / "x")
    assert find_kernel(image, explicit, root=tmp_path / "r").modules_dir == explicit


# -- boot_image --------------------------------------------------------------------------------

PVH_NOTE = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000200)


def fake_vmlinux(note: bytes) -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"text" * 64 + note + b"data" * 64


def make_kernel(tmp_path: Path, payload: bytes) -> Kernel:
    path = tmp_path / "vmlinuz-6.1.0-99-amd64"
    path.write_bytes(fake_bzimage(RELEASE, payload + b"\0" * 128))
    return Kernel(path, RELEASE, tmp_path / "modules")


def test_boot_image_unpacks_pvh_vmlinux_from_xz(tmp_path: Path) -> None:
    vmlinux = fake_vmlinux(PVH_NOTE)
    kernel = make_kernel(tmp_path, lzma.compress(vmlinux, format=lzma.FORMAT_XZ))
    cache = tmp_path / "cache"
    image = boot_image(kernel, cache=cache)
    assert image != kernel.path
    assert image.parent == cache
    assert image.name.startswith(f"vmlinux-{RELEASE}-")
    assert image.read_bytes() == vmlinux
    assert stat.S_IMODE(image.stat().st_mode) == 0o644
    assert boot_image(kernel, cache=cache) == image


def test_boot_image_unpacks_gzip_payload(tmp_path: Path) -> None:
    vmlinux = fake_vmlinux(PVH_NOTE)
    kernel = make_kernel(tmp_path, gzip.compress(vmlinux))
    image = boot_image(kernel, cache=tmp_path / "cache")
    assert image.read_bytes() == vmlinux


def test_boot_image_without_pvh_note_copies_the_bzimage_into_the_cache(tmp_path: Path) -> None:
    # Deeper levels boot from the cache (it is exported to every guest), wherever the bzImage is.
    other_note = struct.pack("<III", 4, 4, 17) + b"Xen\0" + struct.pack("<I", 0)
    kernel = make_kernel(tmp_path, lzma.compress(fake_vmlinux(other_note), format=lzma.FORMAT_XZ))
    cache = tmp_path / "cache"
    image = boot_image(kernel, cache=cache)
    digest = hashlib.sha256(kernel.path.read_bytes()).hexdigest()[:16]
    assert image == cache / f"bzImage-{RELEASE}-{digest}"
    assert image.read_bytes() == kernel.path.read_bytes()
    assert stat.S_IMODE(image.stat().st_mode) == 0o644
    assert not list(cache.glob("vmlinux-*"))
    assert boot_image(kernel, cache=cache) == image


def test_boot_image_without_payload_copies_the_bzimage_into_the_cache(tmp_path: Path) -> None:
    kernel = make_kernel(tmp_path, b"no compressed payload here")
    cache = tmp_path / "cache"
    image = boot_image(kernel, cache=cache)
    assert image.parent == cache and image.name.startswith(f"bzImage-{RELEASE}-")
    assert image.read_bytes() == kernel.path.read_bytes()


def test_boot_image_names_carry_the_digest_of_the_kernel(tmp_path: Path) -> None:
    vmlinux = fake_vmlinux(PVH_NOTE)
    kernel = make_kernel(tmp_path, lzma.compress(vmlinux, format=lzma.FORMAT_XZ))
    cache = tmp_path / "cache"
    digest = hashlib.sha256(kernel.path.read_bytes()).hexdigest()[:16]
    assert boot_image(kernel, cache=cache) == cache / f"vmlinux-{RELEASE}-{digest}"
    # Another kernel with the same release gets its own file.
    (tmp_path / "other").mkdir()
    other = make_kernel(tmp_path / "other", b"no payload")
    image = boot_image(other, cache=cache)
    assert image.name.startswith(f"bzImage-{RELEASE}-") and image.name != f"bzImage-{RELEASE}-{digest}"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        [f"vmlinux-{RELEASE}-{digest}", image.name])


def test_boot_image_of_an_elf_kernel_with_a_pvh_note_is_a_copy_as_the_vmlinux(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(fake_vmlinux(PVH_NOTE))
    kernel = Kernel(path, RELEASE, tmp_path)
    cache = tmp_path / "cache"
    image = boot_image(kernel, cache=cache)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert image == cache / f"vmlinux-{RELEASE}-{digest}"
    assert image.read_bytes() == path.read_bytes()


def test_boot_image_of_an_elf_kernel_without_a_pvh_note_is_kept_under_the_bzimage_name(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(fake_vmlinux(b"no note"))
    image = boot_image(Kernel(path, RELEASE, tmp_path), cache=tmp_path / "cache")
    assert image.parent == tmp_path / "cache" and image.name.startswith(f"bzImage-{RELEASE}-")
    assert image.read_bytes() == path.read_bytes()


# -- build_initramfs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: bytes) -> list[CpioEntry]:
    """A minimal reader of the "newc" cpio format (what the kernel unpacks)."""
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", f"bad magic at {offset}: {header[:6]!r}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + namesize]
        assert name.endswith(b"\0")
        offset = name_start + namesize
        offset += -offset % 4
        data = archive[offset : offset + filesize]
        offset += filesize
        offset += -offset % 4
        if name[:-1] == b"TRAILER!!!":
            assert offset == len(archive)
            return entries
        entries.append(CpioEntry(name[:-1].decode(), mode, (rdevmajor, rdevminor), data))


def loaded_modules(init: str) -> tuple[list[str], list[str]]:
    """(the drivers the init loads in sequence, the kvm modules it loads in the background)."""
    background = re.search(r"^\( (.*) \) &$", init, re.MULTILINE)
    assert background, init
    foreground = [line for line in init.splitlines() if line.startswith("load ")]
    assert len(foreground) == 1, foreground

    def names(text: str) -> list[str]:
        return re.findall(r"\bload ([^\s;]+)", text)

    return names(foreground[0]), names(background.group(1))


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(b"\x7fELF static busybox" + bytes(range(256)))
    return path


@pytest.fixture
def kernel(tmp_path: Path, modules_dir: Path) -> Kernel:
    path = tmp_path / "bzImage"
    path.write_bytes(fake_bzimage(RELEASE))
    return Kernel(path, RELEASE, modules_dir)


def test_build_initramfs_archive(kernel: Kernel, busybox: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    archive = build_initramfs(kernel, busybox=busybox, cache=cache)
    assert archive.parent == cache
    assert archive.name.startswith(f"initramfs-{RELEASE}-") and archive.suffix == ".cpio"
    entries = read_newc(archive.read_bytes())
    by_name = {e.name: e for e in entries}
    assert len(by_name) == len(entries), "duplicate names"

    # Every entry's directory comes before it.
    seen: set[str] = set()
    for entry in entries:
        parent = entry.name.rpartition("/")[0]
        assert not parent or parent in seen, entry.name
        if stat.S_ISDIR(entry.mode):
            seen.add(entry.name)

    init = by_name["init"]
    assert stat.S_ISREG(init.mode) and stat.S_IMODE(init.mode) == 0o755
    script = init.data.decode()
    assert script.startswith("#!/bin/busybox sh\n")
    # The root: a tmpfs with each export mounted at its path, read-only 9p under a writable overlay,
    # and each link made (what the kernel arguments say; test_init_root_* run this part), or one
    # export as the root.
    assert f"mount -t 9p -o {NINEP_OPTIONS} " in script and ",ro," in NINEP_OPTIONS
    assert "mount -t tmpfs -o mode=755 tmpfs /newroot" in script
    assert "nestedkvm.mount=" in script and "nestedkvm.link=" in script
    assert "hostroot" not in script and "remount,ro" not in script

    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode)
    assert console.rdev == (5, 1)

    bb = by_name["bin/busybox"]
    assert stat.S_ISREG(bb.mode) and stat.S_IMODE(bb.mode) == 0o755
    assert bb.data == busybox.read_bytes()

    # The modules: exactly what the init loads, in its load order, decompressed.
    drivers, kvm = loaded_modules(script)
    assert drivers == [
        "virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci", "virtio_console", "netfs", "9pnet",
        "9pnet_virtio", "9p",
    ]
    assert kvm == ["irqbypass", "kvm", "kvm_intel", "ccp", "kvm_amd"]
    modules = [e.name for e in entries if e.name.startswith("modules/") and e.name.endswith(".ko")]
    assert modules == [f"modules/{name}.ko" for name in drivers + kvm]
    rel_by_name = {module_name(rel): rel for rel in MODULES}
    for name in drivers + kvm:
        assert by_name[f"modules/{name}.ko"].data == plain_module(rel_by_name[name])
    assert "load kvm_amd nested=1" in script
    for name in OPTIONAL_MODULES:
        assert f"modules/{name}.ko" not in by_name
    for name in REQUIRED_MODULES + KVM_MODULES:
        assert f"modules/{name}.ko" in by_name


def test_build_initramfs_shared_dependency_loads_sequentially(tmp_path: Path, busybox: Path) -> None:
    modules = dict(MODULES)
    modules["kernel/arch/x86/kvm/kvm.ko.xz"] = ["kernel/virt/lib/irqbypass.ko", "kernel/drivers/virtio/virtio.ko"]
    mdir = write_modules(tmp_path / "m", modules)
    kernel = Kernel(tmp_path / "bzImage", RELEASE, mdir)
    archive = build_initramfs(kernel, busybox=busybox, cache=tmp_path / "cache")
    entries = read_newc(archive.read_bytes())
    script = next(e for e in entries if e.name == "init").data.decode()
    drivers, kvm = loaded_modules(script)
    assert kvm == []
    assert drivers.index("virtio") < drivers.index("kvm") < drivers.index("kvm_amd")
    assert len(drivers) == len(set(drivers))
    modules_in_archive = [e.name[len("modules/") : -3] for e in entries if e.name.startswith("modules/")
                          and e.name.endswith(".ko")]
    assert modules_in_archive == drivers


def test_build_initramfs_is_cached(kernel: Kernel, busybox: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_initramfs(kernel, busybox=busybox, cache=cache)
    os.utime(first, (1_000_000_000, 1_000_000_000))
    second = build_initramfs(kernel, busybox=busybox, cache=cache)
    assert second == first
    assert first.stat().st_mtime == 1_000_000_000


def test_build_initramfs_is_content_addressed(kernel: Kernel, busybox: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_initramfs(kernel, busybox=busybox, cache=cache)
    original = first.read_bytes()
    (kernel.modules_dir / "kernel/drivers/virtio/virtio.ko").write_bytes(b"\x7fELF a rebuilt virtio module")
    second = build_initramfs(kernel, busybox=busybox, cache=cache)
    assert second != first
    assert first.read_bytes() == original
    rebuilt = {e.name: e.data for e in read_newc(second.read_bytes())}
    assert rebuilt["modules/virtio.ko"] == b"\x7fELF a rebuilt virtio module"


def test_build_initramfs_busybox_change_changes_path(kernel: Kernel, busybox: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_initramfs(kernel, busybox=busybox, cache=cache)
    busybox.write_bytes(b"\x7fELF another busybox")
    assert build_initramfs(kernel, busybox=busybox, cache=cache) != first


def test_build_initramfs_missing_required_driver(tmp_path: Path, busybox: Path) -> None:
    modules = {k: v for k, v in MODULES.items() if "9pnet_virtio" not in k}
    kernel = Kernel(tmp_path / "bzImage", RELEASE, write_modules(tmp_path / "m", modules))
    with pytest.raises(HostError, match="9pnet_virtio"):
        build_initramfs(kernel, busybox=busybox, cache=tmp_path / "cache")


# -- the init's root, run in a shell with mount, mkdir, ln and chmod only logged --------------

ROOT_STUBS = """
mount() { echo "mount $*"; }
mkdir() { echo "mkdir $*"; }
ln() { echo "ln $*"; }
chmod() { echo "chmod $*"; }
cat() { echo "$CMDLINE"; }
fail() { echo "FATAL $*"; }
mark() { :; }
"""
BASE_DIRS = [f"mkdir -p /newroot{d}" for d in ("/proc", "/sys", "/dev")]
# The guest's writable dirs as GuestSpec.view_args orders them (shallower first).
TMPFS_ORDER = ("/tmp", "/run", "/mnt", "/var/tmp", "/var/log")


def tmpfs(path: str) -> list[str]:
    return [f"mkdir -p /newroot{path}", f"mount -t tmpfs -o mode=1777 tmpfs /newroot{path}"]


def tmpfs_dirs(*paths: str) -> list[str]:
    return [line for path in paths for line in tmpfs(path)]


def run_init_root(cmdline: str, stubs: str = ROOT_STUBS) -> list[str]:
    """What the part of the init that builds /newroot does, given this kernel command line."""
    script = init_script(["virtio"], ["kvm"])
    part = script[script.index("mkdir -p /newroot /lower /rw\n"):script.index("mkdir -p /dev/pts")]
    shell = [busybox, "sh"] if (busybox := shutil.which("busybox")) else ["sh"]
    result = subprocess.run([*shell, "-c", stubs + part], env={"CMDLINE": cmdline, "PATH": os.defpath},
                            capture_output=True, text=True, check=True, timeout=30)
    assert result.stderr == ""
    return result.stdout.splitlines()


def ninep(tag: str, path: str) -> str:
    return f"mount -t 9p -o {NINEP_OPTIONS} {tag} {path}"


def export(tag: str, path: str) -> list[str]:
    """A writable export at `path` (/etc): its read-only 9p mount out of sight, under an overlay on a tmpfs."""
    return [f"mkdir -p /lower/{tag} /rw/{tag}/upper /rw/{tag}/work", ninep(tag, f"/lower/{tag}"),
            f"mount -t overlay -o lowerdir=/lower/{tag},upperdir=/rw/{tag}/upper,workdir=/rw/{tag}/work overlay {path}"]


# Before any export: where the lower and upper layers live.
LAYERS = ["mkdir -p /newroot /lower /rw", "mount -t tmpfs -o mode=700 tmpfs /rw"]


def init_root_of(spec: GuestSpec) -> list[str]:
    argv = build_argv(spec, HostEnds(Path("/var/lib/nk/run")))
    return run_init_root(argv[argv.index("-append") + 1])


def kernel_spec(**fields: Any) -> GuestSpec:
    return GuestSpec(level=1, qemu="qemu", accel="kvm", cpu="host", memory_mib=1024, smp=1,
                     kernel=Path("/boot/vmlinuz"), **fields)


def test_init_root_mounts_each_export_at_its_path_and_makes_the_links() -> None:
    view = View(exports=(Export(Path("/run/user/0/nk/etc"), Path("/etc")), Export(Path("/usr"), Path("/usr")),
                         Export(Path("/home/nk/project"), Path("/home/nk/project"))),
                links=(("/bin", "usr/bin"), ("/lib64", "usr/lib64")))
    spec = kernel_spec(append="quiet", view=view)
    argv = build_argv(spec, HostEnds(Path("/var/lib/nk/run")))
    # The tags QEMU gets are the ones the init mounts.
    tags = [d.rpartition("mount_tag=")[2] for d in argv if d.startswith("virtio-9p-pci,")]
    assert tags == ["nk0", "nk1", "nk2"]
    assert init_root_of(spec) == [
        *LAYERS,
        "mount -t tmpfs -o mode=755 tmpfs /newroot",
        *BASE_DIRS,
        "mkdir -p /newroot/etc", *export("nk0", "/newroot/etc"),
        "mkdir -p /newroot/usr", *export("nk1", "/newroot/usr"),
        *tmpfs_dirs(*TMPFS_ORDER),
        "mkdir -p /newroot/home/nk/project", ninep("nk2", "/newroot/home/nk/project"),  # the project stays as it is
        "chmod 755 /newroot/run", "mkdir -p -m 1777 /newroot/run/lock",
        # The read-only 9p mounts under the overlays, for a plugin session inside the guest to export.
        "mkdir -p /newroot/run/nestedkvm/lower/etc", "mount --bind /lower/nk0 /newroot/run/nestedkvm/lower/etc",
        "mkdir -p /newroot/run/nestedkvm/lower/usr", "mount --bind /lower/nk1 /newroot/run/nestedkvm/lower/usr",
        "ln -s usr/bin /newroot/bin",
        "ln -s usr/lib64 /newroot/lib64",
    ]


PROJECT = Path("/tmp/ci/project")
SHARED_VAR_VIEW = View(exports=(Export(Path("/srv/var"), Path("/var")), Export(PROJECT, PROJECT)), links=())


@pytest.mark.parametrize(("cmdline", "mounts"), [
    # From the argv: a share under /tmp lands on the guest's /tmp; /var/tmp and /var/log cover a shared /var.
    (None, [("nk0", "/var"), *(("tmpfs", d) for d in ("/tmp", "/run", "/mnt", "/var/tmp", "/var/log")),
            ("nk1", str(PROJECT))]),
    # The init follows the command line's order, not an order of its own.
    ("console=ttyS0 nestedkvm.mount=nk1:/b nestedkvm.mount=tmpfs:/a nestedkvm.mount=nk0:/a/b/c",
     [("nk1", "/b"), ("tmpfs", "/a"), ("nk0", "/a/b/c")]),
], ids=["from-the-argv", "command-line-order"])
def test_init_root_mounts_in_the_order_given(cmdline: str | None, mounts: list[tuple[str, str]]) -> None:
    steps = init_root_of(kernel_spec(view=SHARED_VAR_VIEW)) if cmdline is None else run_init_root(cmdline)
    expected = []
    for tag, path in mounts:
        expected += [*tmpfs(path)] if tag == "tmpfs" else [f"mkdir -p /newroot{path}", ninep(tag, f"/newroot{path}")]
    assert steps == [*LAYERS, "mount -t tmpfs -o mode=755 tmpfs /newroot", *BASE_DIRS, *expected,
                     "chmod 755 /newroot/run", "mkdir -p -m 1777 /newroot/run/lock"]


def test_init_root_without_exports_is_a_tmpfs_with_the_tmpfs_dirs() -> None:
    assert sorted(TMPFS_ORDER) == sorted(TMPFS_DIRS)
    for view in (None, View((), ())):
        assert init_root_of(kernel_spec(view=view)) == [
            *LAYERS, "mount -t tmpfs -o mode=755 tmpfs /newroot", *BASE_DIRS,
            *tmpfs_dirs(*TMPFS_ORDER),
            "chmod 755 /newroot/run", "mkdir -p -m 1777 /newroot/run/lock",
        ]


def test_init_root_of_a_shared_root_is_that_export() -> None:
    # GuestSpec.share_root (deprecated): the one export is the root, read-only (no tmpfs).
    assert init_root_of(kernel_spec(share_root=Path("/"))) == [
        *LAYERS, ninep("nk0", "/newroot"), *BASE_DIRS, *tmpfs_dirs(*TMPFS_ORDER),
        "chmod 755 /newroot/run", "mkdir -p -m 1777 /newroot/run/lock",
    ]


def test_a_kernel_without_overlayfs_keeps_each_export_read_only() -> None:
    # A user's kernel may lack CONFIG_OVERLAY_FS: the 9p mount moves to its place, and the init says so.
    stubs = (ROOT_STUBS + 'mount() { case "$*" in *overlay*) return 1 ;; esac; echo "mount $*"; }\n'
             'say() { echo "say $*"; }\n')
    steps = run_init_root("nestedkvm.mount=nk0:/etc", stubs)
    assert steps[steps.index("mkdir -p /newroot/etc"):steps.index("chmod 755 /newroot/run")] == [
        "mkdir -p /newroot/etc", "mkdir -p /lower/nk0 /rw/nk0/upper /rw/nk0/work", ninep("nk0", "/lower/nk0"),
        "say no overlay for /newroot/etc: it stays read-only", "mount --move /lower/nk0 /newroot/etc",
    ]


def test_the_guests_boot_directory_holds_the_kernel_and_what_the_host_has_beside_it(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{RELEASE}").write_bytes(b"bzImage bytes")
    (boot / f"config-{RELEASE}").write_text("CONFIG_KVM=m\n")
    made = guest_boot_dir(Kernel(boot / f"vmlinuz-{RELEASE}", RELEASE, tmp_path), cache=tmp_path / "cache")
    assert sorted(p.name for p in made.iterdir()) == [f"config-{RELEASE}", f"vmlinuz-{RELEASE}"]  # no System.map here
    assert (made / f"vmlinuz-{RELEASE}").read_bytes() == b"bzImage bytes"
    assert stat.S_IMODE((made / f"config-{RELEASE}").stat().st_mode) == 0o644
    assert guest_boot_dir(Kernel(boot / f"vmlinuz-{RELEASE}", RELEASE, tmp_path), cache=tmp_path / "cache") == made


def test_a_build_trees_boot_directory_takes_its_config_and_system_map(tmp_path: Path) -> None:
    image = tmp_path / "linux" / "arch" / "x86" / "boot" / "bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"built")
    (tmp_path / "linux" / ".config").write_text("CONFIG_KVM_AMD=m\n")
    (tmp_path / "linux" / "System.map").write_text("ffffffff81000000 T _text\n")
    made = guest_boot_dir(Kernel(image, RELEASE, tmp_path), cache=tmp_path / "cache")
    assert (made / f"config-{RELEASE}").read_text() == "CONFIG_KVM_AMD=m\n"
    assert (made / f"System.map-{RELEASE}").read_text().endswith("_text\n")


# Stand-ins for what the init's module loader touches: `cat` (run in a subshell, so it counts in
# a file) answers the clock sources of a kernel whose TSC refinement ends at read REFINED (never,
# when REFINED is empty).
LOADER_STUBS = """
reads() { echo $(($(wc -c < "$COUNT"))); }
cat() {
  printf x >> "$COUNT"
  if [ -n "$REFINED" ] && [ $(reads) -ge "$REFINED" ]; then echo "tsc hpet"; else echo "tsc-early hpet"; fi
}
sleep() { :; }
insmod() { echo "insmod ${1##*/} after $(reads) reads"; }
vendor_ok() { true; }
say() { echo "say $*"; }
"""


def run_loader(refined: str, tmp_path: Path) -> list[str]:
    script = init_script(["virtio"], ["kvm"])
    part = script[script.index("tsc_settled() {"):script.index("( load kvm )")]
    count = tmp_path / "reads"
    count.write_text("")
    shell = [busybox, "sh"] if (busybox := shutil.which("busybox")) else ["sh"]
    result = subprocess.run([*shell, "-c", LOADER_STUBS + part + "load kvm; load kvm_amd nested=1"],
                            env={"REFINED": refined, "COUNT": str(count), "PATH": os.defpath},
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.splitlines()


def test_the_kvm_vendor_module_loads_after_the_tsc_refinement(tmp_path: Path) -> None:
    # kvm.ko takes no TSC rate and loads at once; kvm_amd waits until tsc-early is gone.
    assert run_loader("3", tmp_path) == ["insmod kvm.ko after 0 reads", "insmod kvm_amd.ko after 3 reads"]


def test_a_tsc_that_never_settles_delays_kvm_by_five_seconds_at_most(tmp_path: Path) -> None:
    assert run_loader("", tmp_path) == ["insmod kvm.ko after 0 reads",
                              "say the TSC calibration did not settle within 5 s: KVM loads with the first estimate",
                              "insmod kvm_amd.ko after 100 reads"]
