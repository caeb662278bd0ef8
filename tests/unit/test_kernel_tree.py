"""A kernel build tree as the guests' kernel: its modules prepared in the cache with depmod, keyed by
their inputs and written atomically; the guests' /lib/modules; configure-time checks (no QEMU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_trees import RELEASE, TREE_MODULES, build_tree

from pytest_nestedkvm.base.errors import ConfigError, HostError
from pytest_nestedkvm.boot import kernel_tree
from pytest_nestedkvm.boot.initramfs import Kernel, module_closure, module_name
from pytest_nestedkvm.boot.kernel_tree import (
    BuildTree,
    boot_kernel,
    check_modules,
    find_depmod,
    prepare_modules,
    read_tree,
    with_modules,
)
from pytest_nestedkvm.boot.qemu import GuestSpec
from pytest_nestedkvm.boot.view import Export, View
from pytest_nestedkvm.config.settings import Settings

pytestmark = pytest.mark.skipif(find_depmod() is None, reason="depmod not installed: apt-get install kmod")


@pytest.fixture
def tree(tmp_path: Path) -> BuildTree:
    return read_tree(build_tree(tmp_path / "linux"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# -- preparing the modules directory --------------------------------------------------------


def test_modules_are_laid_out_as_modules_install_would_and_indexed(tree: BuildTree, cache: Path) -> None:
    target = prepare_modules(tree, cache)
    assert target.parent == cache / "modules" / f"{RELEASE}-{kernel_tree.modules_key(tree)}" / "lib/modules"
    assert target.name == RELEASE
    for path in TREE_MODULES.values():
        assert (target / "kernel" / path).read_bytes() == (tree.root / path).read_bytes()
    assert (target / "modules.order").read_text().split() == [f"kernel/{p}" for p in TREE_MODULES.values()]
    assert (target / "modules.builtin").read_bytes() == (tree.root / "modules.builtin").read_bytes()
    # depmod read the real symbols: virtio_console needs virtio, which needs virtio_ring.
    dep = dict(line.split(":", 1) for line in (target / "modules.dep").read_text().splitlines())
    assert dep["kernel/drivers/char/virtio_console.ko"].split() == [
        "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"]
    assert (target / "modules.dep.bin").is_file()  # what modprobe reads
    closure = [module_name(str(p)) for p in module_closure(target, ("virtio_console",), ("9p",))]
    assert closure == ["virtio_ring", "virtio", "virtio_console"]  # the initramfs's view of it


def test_prepared_directory_is_readable_by_everyone(tree: BuildTree, cache: Path) -> None:
    target = prepare_modules(tree, cache)
    base = target.parents[2]
    for path in [base, *base.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_modules_order_of_newer_kernels_lists_objects(tmp_path: Path, cache: Path) -> None:
    root = build_tree(tmp_path / "linux")
    (root / "modules.order").write_text("".join(f"{p[:-3]}.o\n" for p in TREE_MODULES.values()))  # 6.2+
    target = prepare_modules(read_tree(root), cache)
    assert (target / "modules.order").read_text().split() == [f"kernel/{p}" for p in TREE_MODULES.values()]


def test_second_use_reuses_the_directory_without_depmod(
    tree: BuildTree, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_modules(tree, cache)
    stamp = (first / "modules.dep").stat().st_mtime_ns
    monkeypatch.setattr(kernel_tree, "find_depmod", lambda: None)  # would fail if it ran again
    assert prepare_modules(read_tree(tree.root), cache) == first
    assert (first / "modules.dep").stat().st_mtime_ns == stamp


def test_a_rebuilt_module_gets_a_fresh_directory(tree: BuildTree, cache: Path) -> None:
    first = prepare_modules(tree, cache)
    rebuilt = tree.root / TREE_MODULES["virtio"]
    data = rebuilt.read_bytes() + b"\0" * 64  # a rebuild: other bytes, another size and mtime
    rebuilt.write_bytes(data)
    second = prepare_modules(read_tree(tree.root), cache)
    assert second != first
    assert (second / "kernel" / TREE_MODULES["virtio"]).read_bytes() == data
    assert (first / "kernel" / TREE_MODULES["virtio"]).read_bytes() != data  # the old one is left as it was


def test_the_same_size_rewritten_later_is_a_rebuild_too(tree: BuildTree, cache: Path) -> None:
    first = prepare_modules(tree, cache)
    module = tree.root / TREE_MODULES["virtio_ring"]
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert prepare_modules(read_tree(tree.root), cache) != first


@pytest.mark.parametrize("name", ["modules.builtin", "modules.builtin.modinfo"])
def test_builtin_lists_are_inputs(tree: BuildTree, cache: Path, name: str) -> None:
    key = kernel_tree.modules_key(tree)
    (tree.root / name).write_text("kernel/fs/ext4/ext4.ko\n")  # created (modinfo) or rewritten (builtin)
    os.utime(tree.root / name, ns=(0, 1))
    assert kernel_tree.modules_key(tree) != key


def test_a_failing_depmod_leaves_nothing_behind(
    tree: BuildTree, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "depmod"
    broken.write_text("#!/bin/sh\necho 'depmod: FATAL: disk on fire' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(kernel_tree, "find_depmod", lambda: broken)
    with pytest.raises(HostError, match=f"depmod -b .* {RELEASE}` failed \\(1\\): depmod: FATAL: disk on fire"):
        prepare_modules(tree, cache)
    assert [name for name in entries(cache / "modules") if not name.endswith(".lock")] == []


def test_an_interrupted_copy_leaves_nothing_behind(
    tree: BuildTree, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies: list[str] = []
    real_copy = shutil.copyfile

    def copy_then_interrupt(src: Path, dst: Path) -> object:
        copies.append(str(src))
        if len(copies) == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_modules(tree, cache)
    assert [name for name in entries(cache / "modules") if not name.endswith(".lock")] == []
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert (prepare_modules(tree, cache) / "modules.dep").is_file()  # the next session starts clean


PREPARE = """
import sys
from pathlib import Path
from pytest_nestedkvm.boot.kernel_tree import prepare_modules, read_tree
print(prepare_modules(read_tree(Path(sys.argv[1])), Path(sys.argv[2])))
"""


def test_concurrent_sessions_share_one_directory(tree: BuildTree, cache: Path) -> None:
    """Like pytest-xdist workers starting together: each gets the same complete directory."""
    runs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(tree.root), str(cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], results
    targets = {Path(out.strip()) for out, _ in results}
    assert len(targets) == 1
    assert (targets.pop() / "modules.dep").is_file()
    assert [name for name in entries(cache / "modules") if not name.endswith(".lock")] == [
        f"{RELEASE}-{kernel_tree.modules_key(tree)}"]


# -- what the guests boot and see -----------------------------------------------------------


def test_boot_kernel_of_a_tree(tree: BuildTree, cache: Path) -> None:
    kernel = boot_kernel(tree.root, None, cache)
    assert kernel == Kernel(tree.root / "arch/x86/boot/bzImage", RELEASE, prepare_modules(tree, cache))


def test_explicit_modules_win_over_the_trees(tree: BuildTree, cache: Path, tmp_path: Path) -> None:
    installed = tmp_path / "mods/lib/modules" / RELEASE
    installed.mkdir(parents=True)
    (installed / "modules.dep").write_text("")
    kernel = boot_kernel(tree.root, installed, cache)
    assert kernel.modules_dir == installed and kernel.release == RELEASE
    assert not (cache / "modules").exists()


def test_boot_kernel_reports_a_tree_that_lost_its_modules_since(tree: BuildTree, cache: Path) -> None:
    (tree.root / TREE_MODULES["virtio"]).unlink()  # `make clean` between configure time and the first guest
    with pytest.raises(HostError, match=r"1 of the 3 modules .* are not built"):
        boot_kernel(tree.root, None, cache)


@pytest.fixture
def host_modules(tmp_path: Path) -> Path:
    """A host's /lib/modules, as a link into usr/ as on a merged-/usr system."""
    (tmp_path / "host/usr/lib/modules").mkdir(parents=True)
    (tmp_path / "host/lib").symlink_to("usr/lib")
    return tmp_path / "host/lib/modules"


def view_of(*shared: Path) -> View:
    return View((Export(Path("/srv/etc"), Path("/etc")), Export(Path("/usr"), Path("/usr")),
                 *(Export(p, p) for p in shared)), (("/lib", "usr/lib"),))


def test_guests_get_the_modules_at_lib_modules(tree: BuildTree, cache: Path, host_modules: Path) -> None:
    kernel = boot_kernel(tree.root, None, cache)
    view = with_modules(view_of(cache.resolve()), kernel, host_modules)
    real = host_modules.resolve()
    assert view.tmpfs == (real,)
    assert view.links[-1] == (f"{real}/{RELEASE}", str(kernel.modules_dir.resolve()))
    assert view.one_level_down().tmpfs == view.tmpfs and view.one_level_down().links == view.links  # L2 too
    args = GuestSpec(level=1, qemu="qemu", accel="tcg", cpu="max", memory_mib=512, smp=1, view=view).view_args()
    mounts = [arg for arg in args if arg.startswith("nestedkvm.mount=")]
    assert mounts.index("nestedkvm.mount=nk1:/usr") < mounts.index(f"nestedkvm.mount=tmpfs:{real}")
    assert args[-1] == f"nestedkvm.link={real}/{RELEASE}:{kernel.modules_dir.resolve()}"  # made after the mounts


def test_guests_keep_the_hosts_lib_modules_for_an_installed_kernel(tmp_path: Path, host_modules: Path) -> None:
    installed = host_modules / RELEASE
    installed.mkdir()
    view = view_of()
    assert with_modules(view, Kernel(tmp_path / "vmlinuz", RELEASE, installed), host_modules) == view


def test_modules_the_guests_cannot_see_are_not_linked(tree: BuildTree, cache: Path, host_modules: Path) -> None:
    view = view_of()  # the cache is not exported
    assert with_modules(view, boot_kernel(tree.root, None, cache), host_modules) == view


# -- configure time -------------------------------------------------------------------------


def test_settings_take_a_build_tree(tree: BuildTree) -> None:
    settings = Settings.from_sources({"kernel": str(tree.root)}, {})
    assert settings.kernel == tree.root.resolve()


def test_memory_floor_of_a_tree_is_its_bzimages(tree: BuildTree) -> None:
    image = tree.root / "arch/x86/boot/bzImage"
    with image.open("r+b") as f:
        f.truncate(8 << 20)  # ceil(4 * 8 + 64) = 96 MiB
    with pytest.raises(ConfigError, match=f"below the 96 MiB kernel {image} needs"):
        Settings.from_sources({"kernel": str(tree.root), "memory": "95"}, {}).check_host_plan(
            accel="kvm", host_cpus=1, default_kernel=lambda: None)


def test_explicit_modules_need_no_built_modules_in_the_tree(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "linux", modules=False)
    mods = tmp_path / "mods"
    mods.mkdir()
    settings = Settings.from_sources({"kernel": str(root), "modules": str(mods)}, {})
    assert (settings.kernel, settings.modules) == (root.resolve(), mods.resolve())


def test_check_modules_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_modules = build_tree(tmp_path / "a", modules=False)
    with pytest.raises(ValueError, match=r"has no modules\.order: build the modules there with `make modules`"):
        check_modules(no_modules)
    unbuilt = build_tree(tmp_path / "b", built=False)
    with pytest.raises(ValueError, match=r"3 of the 3 modules in .* are not built \(e.g. drivers/virtio/virtio_ring"):
        check_modules(unbuilt)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernel_tree, "SBIN_DIRS", ())
    with pytest.raises(ValueError, match=r"depmod is not installed .*: apt-get install kmod"):
        check_modules(build_tree(tmp_path / "c"))


def test_a_stale_bzimage_is_refused(tree: BuildTree) -> None:
    (tree.root / "include/config/kernel.release").write_text("9.9.1-tree\n")  # reconfigured, not rebuilt
    with pytest.raises(ValueError, match=f"is release {RELEASE} but the tree is now 9.9.1-tree"):
        kernel_tree.check_image(tree.root)
