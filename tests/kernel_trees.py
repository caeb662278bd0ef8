"""Fake kernel build trees for unit and plugin tests: a bzImage with a setup header and real
modules of the host's kernel, laid out as `make bzImage modules` leaves them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_nestedkvm.base.errors import HostError
from pytest_nestedkvm.boot.initramfs import find_kernel, module_name, read_module

RELEASE = "9.9.0-tree"
# Real modules (depmod needs their symbol tables): virtio_console needs virtio, which needs virtio_ring.
TREE_MODULES = {
    "virtio_ring": "drivers/virtio/virtio_ring.ko",
    "virtio": "drivers/virtio/virtio.ko",
    "virtio_console": "drivers/char/virtio_console.ko",
}


def bzimage(path: Path, version: str, size: int = 0x10000) -> Path:
    """A file with a bzImage setup header whose version string is `version` (what uname -a shows)."""
    data = bytearray(size)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")  # the string's offset, less 0x200
    text = version.encode() + b"\0"
    data[0x1000:0x1000 + len(text)] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def host_modules() -> dict[str, bytes]:
    """The bytes (decompressed) of TREE_MODULES from the host's kernel; skips without one."""
    try:
        modules_dir = find_kernel().modules_dir
    except HostError as exc:
        pytest.skip(f"no host kernel with modules to copy into a fake tree: {exc}")
    paths = {module_name(line.split(":", 1)[0]): line.split(":", 1)[0]
             for line in (modules_dir / "modules.dep").read_text().splitlines()}
    missing = [name for name in TREE_MODULES if name not in paths]
    if missing:
        pytest.skip(f"the host kernel {modules_dir.name} has {missing} built in, not as modules")
    return {name: read_module(modules_dir / paths[name]) for name in TREE_MODULES}


def build_tree(root: Path, release: str = RELEASE, *, modules: bool = True, built: bool = True) -> Path:
    """A tree after `make bzImage modules`: bzImage, kernel.release, modules.order, modules.builtin,
    and the .ko files (only when `built`); without `modules`, as after `make bzImage` alone."""
    bzimage(root / "arch/x86/boot/bzImage", f"{release} (dev@build) #1 SMP PREEMPT_DYNAMIC")
    (root / "include/config").mkdir(parents=True, exist_ok=True)
    (root / "include/config/kernel.release").write_text(release + "\n")
    if not modules:
        return root
    (root / "modules.order").write_text("".join(f"{path}\n" for path in TREE_MODULES.values()))
    (root / "modules.builtin").write_text("kernel/fs/9p/9p.ko\nkernel/net/9p/9pnet_virtio.ko\n")
    if built:
        for name, data in host_modules().items():
            (root / TREE_MODULES[name]).parent.mkdir(parents=True, exist_ok=True)
            (root / TREE_MODULES[name]).write_bytes(data)
    return root
