"""Unit tests for the initramfs builder on fake kernels and fake module trees (no QEMU, no root)."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_nestedkvm.errors import HostError
from pytest_nestedkvm.initramfs import (
    KVM_MODULES,
    OPTIONAL_MODULES,
    REQUIRED_MODULES,
    Kernel,
    boot_image,
    build_initramfs,
    find_kernel,
    kernel_release,
    module_closure,
    module_name,
    read_module,
)

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


def test_boot_image_without_pvh_note_returns_bzimage(tmp_path: Path) -> None:
    other_note = struct.pack("<III", 4, 4, 17) + b"Xen\0" + struct.pack("<I", 0)
    kernel = make_kernel(tmp_path, lzma.compress(fake_vmlinux(other_note), format=lzma.FORMAT_XZ))
    cache = tmp_path / "cache"
    assert boot_image(kernel, cache=cache) == kernel.path
    assert not cache.exists() or not list(cache.glob("vmlinux-*"))


def test_boot_image_without_payload_returns_bzimage(tmp_path: Path) -> None:
    kernel = make_kernel(tmp_path, b"no compressed payload here")
    assert boot_image(kernel, cache=tmp_path / "cache") == kernel.path


def test_boot_image_of_an_elf_kernel_is_itself(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(fake_vmlinux(PVH_NOTE))
    kernel = Kernel(path, RELEASE, tmp_path)
    assert boot_image(kernel, cache=tmp_path / "cache") == path


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
    assert "mount -t 9p" in script
    assert "hostroot /newroot" in script
    assert "exec switch_root /newroot" in script

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
