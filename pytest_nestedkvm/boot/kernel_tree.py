"""A kernel build directory as the built-in guest's kernel, without `make modules_install`.

`--nested-kernel=<linux build dir>` boots the tree's arch/x86/boot/bzImage. Its modules
are laid out in the plugin's cache as `modules_install` would (BASE/lib/modules/RELEASE,
from modules.order and the built .ko files, with modules.builtin and `depmod -b BASE`),
once per build: the directory is keyed by the size and mtime of every input, so a rebuilt
module gets a fresh one. It is made in a temporary directory and renamed into place, so
concurrent pytest-xdist workers and an interrupted session never see half of it.

The guests see the modules at /lib/modules/RELEASE (`guest_modules`), so modprobe works
inside them as it does with an installed kernel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock

from ..base.errors import HostError
from .initramfs import Kernel, cache_dir, find_kernel, kernel_release
from .view import View, unshareable

FORMAT_VERSION = "1"
BZIMAGE = Path("arch/x86/boot/bzImage")
RELEASE_FILE = Path("include/config/kernel.release")  # what `make -s kernelrelease` prints
ORDER_FILE = "modules.order"
BUILTIN_FILES = ("modules.builtin", "modules.builtin.modinfo")  # the second one since 5.2
# depmod lives in sbin, which an ordinary user's PATH often lacks.
SBIN_DIRS = ("/usr/sbin", "/sbin")
# Where modprobe looks, on the host and (at the same resolved path) in every built-in guest.
HOST_MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class BuildTree:
    """What a built kernel tree holds: the image, its release, and its modules in build order."""

    root: Path
    image: Path
    release: str
    modules: tuple[str, ...]  # .ko paths relative to root, as modules.order lists them


def is_tree(path: Path) -> bool:
    return path.is_dir()


def tree_image(kernel: Path) -> Path:
    """The file to boot for a --nested-kernel value: the bzImage of a build tree, else the file itself."""
    return kernel / BZIMAGE if is_tree(kernel) else kernel


def check_image(root: Path) -> Path:
    """A build tree whose bzImage can be booted (the checks of --nested-kernel alone); raises
    ValueError with what is wrong and how to fix it."""
    image = root / BZIMAGE
    if not image.is_file():
        raise ValueError(f"{root} has no {BZIMAGE}: build it there with `make bzImage modules`, or pass a "
                         "kernel image file")
    try:
        release = (root / RELEASE_FILE).read_text().strip()
    except FileNotFoundError:
        raise ValueError(f"{root} has a {BZIMAGE} but no {RELEASE_FILE}: run `make bzImage modules` there") from None
    try:
        built = kernel_release(image)
    except HostError:
        raise ValueError(f"{image} is not a bzImage (no setup header): run `make bzImage` there") from None
    if built != release:
        raise ValueError(f"{image} is release {built} but the tree is now {release}: rebuild it with "
                         "`make bzImage modules`")
    return root


def read_tree(root: Path) -> BuildTree:
    """The tree's image, release and built modules; raises ValueError naming the `make` target
    that is missing."""
    check_image(root)
    order = root / ORDER_FILE
    if not order.is_file():
        raise ValueError(f"{root} has no {ORDER_FILE}: build the modules there with `make modules`, or pass "
                         "--nested-modules DIR")
    modules = tuple(_ko(line) for line in order.read_text().split())
    missing = [m for m in modules if not (root / m).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(modules)} modules in {order} are not built (e.g. "
                         f"{missing[0]}): run `make modules` there")
    release = (root / RELEASE_FILE).read_text().strip()
    return BuildTree(root, root / BZIMAGE, release, modules)


def check_modules(root: Path) -> None:
    """What preparing the tree's modules will need, checked before anything is written."""
    read_tree(root)
    if find_depmod() is None:
        raise ValueError("depmod is not installed (it indexes the tree's modules for the guests): "
                         "apt-get install kmod, or pass --nested-modules DIR")


def _ko(entry: str) -> str:
    """A modules.order line as a .ko path: kernels before 6.2 list foo.ko, later ones foo.o."""
    return entry[:-2] + ".ko" if entry.endswith(".o") else entry


def find_depmod() -> Path | None:
    found = shutil.which("depmod", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))
    return Path(found) if found else None


def boot_kernel(override: Path | None, modules: Path | None, cache: Path | None = None) -> Kernel:
    """The kernel the built-in guests boot: a build tree's (modules prepared in the cache unless
    `modules` is given), else what `find_kernel` picks."""
    if override is None or not is_tree(override):
        return find_kernel(override, modules)
    try:
        tree = read_tree(override) if modules is None else None
    except ValueError as exc:  # checked at configure time; the tree changed since
        raise HostError(str(exc)) from None
    if tree is None:
        return find_kernel(override / BZIMAGE, modules)
    return Kernel(tree.image, tree.release, prepare_modules(tree, cache or cache_dir()))


def modules_key(tree: BuildTree) -> str:
    """Changes whenever an input of the modules directory does: the release, modules.order,
    and the size and mtime of each module and builtin list (cheap: no module is read)."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{tree.release}\0".encode())
    for name in (ORDER_FILE, *BUILTIN_FILES, *tree.modules):
        try:
            st = (tree.root / name).stat()
        except FileNotFoundError:
            digest.update(f"{name}\0-\0".encode())
            continue
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def prepare_modules(tree: BuildTree, cache: Path) -> Path:
    """BASE/lib/modules/RELEASE for `tree` in `cache`, made once per key; returns that directory."""
    parent = cache / "modules"
    base = parent / f"{tree.release}-{modules_key(tree)}"
    target = base / "lib/modules" / tree.release
    if (target / "modules.dep").is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base) + ".lock"):  # one worker does the work, the others wait and reuse it
        if (target / "modules.dep").is_file():
            return target
        work = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
        try:
            _lay_out(tree, work)
            _readable(work)  # deeper levels and an unprivileged QEMU read it through the shared cache
            os.rename(work, base)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def _lay_out(tree: BuildTree, base: Path) -> None:
    """What `make modules_install INSTALL_MOD_PATH=base` installs, then `depmod -b base`."""
    moddir = base / "lib/modules" / tree.release
    for module in tree.modules:
        copy = moddir / "kernel" / module
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree.root / module, copy)  # a copy: a rebuild must not change a keyed directory
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / ORDER_FILE).write_text("".join(f"kernel/{m}\n" for m in tree.modules))
    for name in BUILTIN_FILES:
        if (tree.root / name).is_file():
            shutil.copyfile(tree.root / name, moddir / name)
    depmod = find_depmod()
    if depmod is None:
        raise HostError("depmod is not installed (it indexes the tree's modules for the guests): "
                        "apt-get install kmod, or pass --nested-modules DIR")
    done = subprocess.run([str(depmod), "-b", str(base), tree.release], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise HostError(f"`depmod -b {base} {tree.release}` failed ({done.returncode}): "
                        f"{done.stderr.strip()[-500:]}")


def _readable(root: Path) -> None:
    root.chmod(0o755)  # mkdtemp made it 0700
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames:
            Path(directory, name).chmod(0o755)
        for name in filenames:
            Path(directory, name).chmod(0o644)


def guest_modules(kernel: Kernel, host_modules: Path = HOST_MODULES) -> Path | None:
    """Where the guests' /lib/modules/RELEASE must point, when it is not the host's own
    (a build tree's prepared modules, or --nested-modules); None when the host's serves."""
    modules = kernel.modules_dir.resolve()
    if modules == (host_modules / kernel.release).resolve() or not host_modules.resolve().is_dir():
        return None  # the host's own, or no mount point for the guests' /lib/modules
    return modules if unshareable(modules) is None else None


def with_modules(view: View, kernel: Kernel, host_modules: Path = HOST_MODULES) -> View:
    """`view` with /lib/modules/RELEASE as a link to the kernel's modules directory, on a tmpfs
    over the guests' /lib/modules: modprobe inside the guests finds the modules they booted with.
    Only when that directory is exported (`modules_share` adds it)."""
    modules = guest_modules(kernel, host_modules)
    if modules is None or not any(modules.is_relative_to(e.target) for e in view.exports):
        return view
    root = host_modules.resolve()  # /usr/lib/modules on a merged-/usr host: the guests get its links too
    return replace(view, tmpfs=(*view.tmpfs, root), links=(*view.links, (str(root / kernel.release), str(modules))))


def modules_share(kernel: Kernel) -> Iterable[Path]:
    """The kernel's modules directory, when the guests need it shared (see `with_modules`)."""
    modules = guest_modules(kernel)
    return () if modules is None else (modules,)
