"""Xen as L1's hypervisor: the hypervisor image, Debian's Xen packages unpacked into the cache,
and what dom0's init does to become a Xen host.

Nothing is installed on L0: the packages are fetched with `apt-get download` (or taken from a
directory of .deb files the user filled offline) and unpacked with `dpkg-deb -x` into the
plugin's cache, once per set of package versions, under a file lock. The guests see the cache
read-only at the same path; dom0's init lays the tree's `usr/lib` over its own (a read-only
overlay), so the toolstack finds its libraries and helpers at the paths it was built with.
L2 is an HVM domU that `xl create` starts in dom0 (domu_argv).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock

from ..base.errors import HostError
from ..base.files import write_atomically

Hypervisor = Literal["kvm", "xen"]  # what L1 hosts its guests with
HYPERVISORS: tuple[Hypervisor, ...] = ("kvm", "xen")
# Debian 12's Xen: the hypervisor, xl and the daemons, the device model an HVM domU needs
# (qemu-system-xen: /usr/libexec/xen-qemu-system-i386, its other libraries are qemu-system-x86's),
# and the libraries they load that a Debian host may lack (libc, ncurses and the like every Debian has).
XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils", "qemu-system-xen",
    "libxencall1", "libxendevicemodel1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
    "libxenhypfs1", "libxenmisc4.17", "libxenstore4", "libxentoolcore1", "libxentoollog1", "libyajl2",
)
HYPERVISOR_PACKAGE = XEN_PACKAGES[0]
DEBS_DIR = "xen-debs"  # in the cache: the .deb files, fetched or put there by hand
APT_DOWNLOAD_SECONDS = 300
# A multiboot (version 1) header: this magic, flags and a checksum that sum to 0 (mod 2**32),
# 4-byte aligned within the image's first 8 KiB. QEMU's -kernel boots such an image.
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
GZIP_MAGIC = b"\x1f\x8b"
# Where the tree that dom0 runs the toolstack from keeps the decompressed hypervisor.
TREE_HYPERVISOR = "boot/xen"
# The drivers a dom0 needs for xenstored and xl (modules in Debian's kernel; built in elsewhere).
# A PV dom0's command line travels in Xen's start_info, MAX_GUEST_CMDLINE (1024) bytes with its NUL.
DOM0_CMDLINE_MAX = 1023
# Where dom0's xenconsoled logs each domU's console (a tmpfs of dom0's: /var/log).
DOMU_CONSOLE_DIR = "/var/log/xen/console"
DOM0_MODULES = ("xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd")


def dom0_mib(l1_mib: int) -> int:
    """dom0's memory in a Xen L1 of `l1_mib` MiB: half of it; the rest is for domUs."""
    return l1_mib // 2


@dataclass(frozen=True)
class XenBoot:
    """What L1's QEMU boots when L1 is a Xen host: the hypervisor with its command line, and the
    unpacked tree dom0 runs the toolstack from (dom0 is the guest's own kernel and initramfs)."""

    hypervisor: Path  # a multiboot image, for -kernel
    tools: Path  # the root of the unpacked packages (usr/lib/xen-*/bin/xl, ...)
    args: str = ""  # Xen's own command line (plan.xen_args)


def check_dom0_cmdline(cmdline: str) -> str:
    """`cmdline` if Xen hands all of it to a PV dom0; else HostError (Xen would cut it silently,
    and with it the exports and `nestedkvm.xen=` at its end)."""
    size = len(cmdline.encode())
    if size > DOM0_CMDLINE_MAX:
        raise HostError(f"dom0's kernel command line is {size} bytes, and Xen passes at most {DOM0_CMDLINE_MAX} "
                        "to a PV dom0: it names every export's path; use shorter paths (the project, "
                        "--nested-share, the cache: XDG_CACHE_HOME) or fewer shares")
    return cmdline


def has_multiboot_header(head: bytes) -> bool:
    for offset in range(0, min(len(head), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = (int.from_bytes(head[offset + i:offset + i + 4], "little") for i in (0, 4, 8))
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def image_head(path: Path) -> bytes:
    """The first bytes of the image `path` is or holds (a gzip file is read decompressed)."""
    with path.open("rb") as f:
        head = f.read(MULTIBOOT_SEARCH)
    if not head.startswith(GZIP_MAGIC):
        return head
    try:
        with gzip.open(path, "rb") as f:
            return f.read(MULTIBOOT_SEARCH)
    except (OSError, EOFError, zlib.error):
        return head


def check_image(path: Path) -> Path:
    """`path` if it is a Xen that QEMU can boot (a multiboot image, or one gzipped); else ValueError."""
    if not has_multiboot_header(image_head(path)):
        raise ValueError(f"{path} is not a Xen image: it has no multiboot header in its first "
                         f"{MULTIBOOT_SEARCH // 1024} KiB; pass xen/xen or xen.gz of a Xen build "
                         "(not xen-syms nor xen.efi)")
    return path


def hypervisor_image(path: Path, cache: Path) -> Path:
    """The file for QEMU's -kernel: `path` itself, or its decompressed copy in the cache."""
    with path.open("rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return path
    data = path.read_bytes()
    target = cache / f"xen-image-{hashlib.sha256(data).hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            write_atomically(target, gzip.decompress(data))
    return target


def _debs(directory: Path) -> dict[str, Path]:
    """The .deb files in `directory` by package name (apt-get download names them NAME_VERSION_ARCH.deb)."""
    if not directory.is_dir():
        return {}
    return {deb.name.split("_", 1)[0]: deb for deb in sorted(directory.glob("*.deb"))}


def _version(deb: Path) -> str:
    return urllib.parse.unquote(deb.name.split("_")[1])  # apt writes an epoch's ':' as %3a


def offline_hint(debs_dir: Path) -> str:
    return (f"on a machine that reaches a Debian 12 mirror run `apt-get download {' '.join(XEN_PACKAGES)}`, "
            f"copy the .deb files into {debs_dir} and run again, or pass --nested-xen with your own Xen")


def packages_line(cache: Path) -> str:
    """Where a Xen L1's packages come from, for the host check: nothing is fetched here."""
    debs_dir = cache / DEBS_DIR
    missing = [name for name in XEN_PACKAGES if name not in _debs(debs_dir)]
    if not missing:
        return f"Debian's Xen packages in {debs_dir}"
    if shutil.which("apt-get") is None:
        return f"{len(missing)} of Debian's Xen packages missing and no apt-get: {offline_hint(debs_dir)}"
    return f"{len(missing)} of Debian's Xen packages fetched with apt-get download on first use, into {debs_dir}"


def download(debs_dir: Path, missing: list[str]) -> None:
    """Fetch `missing` with apt-get download into `debs_dir`; HostError naming what did not come."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise HostError(f"Xen's packages {', '.join(missing)} are not in {debs_dir} and apt-get is not "
                        f"installed to fetch them: {offline_hint(debs_dir)}")
    debs_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=debs_dir, prefix=".tmp-"))
    try:
        try:
            done = subprocess.run([apt, "download", *missing], cwd=staging, capture_output=True, text=True,
                                  timeout=APT_DOWNLOAD_SECONDS, check=False)
            why = next((line for line in reversed(done.stderr.splitlines()) if line.startswith("E:")),
                       f"apt-get exited with status {done.returncode}")
        except subprocess.TimeoutExpired:
            why = f"apt-get download ran past {APT_DOWNLOAD_SECONDS} s"
        for deb in staging.glob("*.deb"):
            os.replace(deb, debs_dir / deb.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    still = [name for name in missing if name not in _debs(debs_dir)]
    if still:
        raise HostError(f"cannot fetch Xen's packages {', '.join(still)} with apt-get download ({why}): "
                        f"{offline_hint(debs_dir)}")


def unpacked_packages(cache: Path) -> Path:
    """The root of Debian's Xen packages unpacked in the cache (with the hypervisor decompressed at
    TREE_HYPERVISOR), keyed by the package versions: fetched and unpacked once, under a lock."""
    debs_dir = cache / DEBS_DIR
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "xen.lock")):
        missing = [name for name in XEN_PACKAGES if name not in _debs(debs_dir)]
        if missing:
            download(debs_dir, missing)
        debs = _debs(debs_dir)
        chosen = [debs[name] for name in XEN_PACKAGES]
        key = hashlib.sha256("\n".join(deb.name for deb in chosen).encode()).hexdigest()[:16]
        target = cache / f"xen-{_version(debs[HYPERVISOR_PACKAGE]).split('+')[0]}-{key}"
        if not target.is_dir():
            _unpack(chosen, target)
    return target


def _unpack(debs: list[Path], target: Path) -> None:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise HostError(f"dpkg-deb is not installed, and Xen's packages are unpacked with it: "
                        f"apt-get install dpkg, or pass --nested-xen with your own Xen (found the .deb files "
                        f"in {debs[0].parent})")
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-xen-"))
    try:
        for deb in debs:
            done = subprocess.run([dpkg_deb, "-x", str(deb), str(staging)], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise HostError(f"dpkg-deb cannot unpack {deb} ({done.stderr.strip() or done.returncode}): "
                                "delete it and run again to fetch it anew")
        packed = sorted(staging.glob("boot/xen-*.gz"))
        if not packed:
            raise HostError(f"{HYPERVISOR_PACKAGE} holds no boot/xen-*.gz: delete {debs[0].parent} and run again")
        write_atomically(staging / TREE_HYPERVISOR, gzip.decompress(packed[0].read_bytes()))
        staging.chmod(0o755)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dom0_script() -> str:
    """Shell functions for dom0's stage2 (busybox sh): `xen_dom0 TREE` makes the booted guest a Xen
    host with the toolstack of the unpacked TREE; it says on the console what failed."""
    return f"""xen_dom0() {{
  x=$1
  modprobe -a {' '.join(DOM0_MODULES)} 2>/dev/null  # built in elsewhere
  mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen || return 1
  # The tree's libraries, helpers and device model where the toolstack was built to find them:
  # its usr/lib and usr/libexec over the host's, read-only (nothing of it reaches L0).
  for d in lib libexec; do
    mount -t overlay -o "ro,lowerdir=$x/usr/$d:/usr/$d" overlay /usr/$d || return 1
  done
  mkdir -p /etc/xen && cp -a "$x/etc/xen/." /etc/xen/ || return 1
  [ -e /var/run ] || ln -s /run /var/run
  [ -e /var/lock ] || ln -s /run/lock /var/lock  # xl console locks there
  mkdir -p /var/lib/xen /var/lib/xenstored /run/xen /run/xenstored /run/lock {DOMU_CONSOLE_DIR}
  for d in /usr/lib/xen-[0-9]*/bin; do PATH=$d:$PATH; done
  PATH=$PATH:$x/usr/bin; export PATH
  xenstored --pid-file /run/xenstored.pid || return 1
  xen-init-dom0 >/dev/null || return 1
  # Each domU's console is also written to {DOMU_CONSOLE_DIR}/guest-NAME.log, without `xl console`.
  xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir={DOMU_CONSOLE_DIR} || return 1
}}
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case $arg in
    nestedkvm.xen=*)
      if xen_dom0 "${{arg#*=}}"; then echo "nestedkvm: xen dom0 up" > /dev/console
      else echo "nestedkvm: xen dom0 setup failed" > /dev/console; fi ;;
  esac
done
"""


# No serial= (xl would add a -serial of its own before the device model's arguments, and the
# console's would become ttyS1): the domU's ttyS0 is the console that device_args ends on dom0's port.
DOMU_SETTINGS = ('type="hvm"', 'vga="none"', "vnc=0",
                 # A reboot (a panic with panic=-1 too) ends the domain, as -no-reboot ends a QEMU:
                 # `xl create -F` returns, and the next test gets a fresh L2.
                 'on_poweroff="destroy"', 'on_reboot="destroy"', 'on_crash="destroy"')
XL_EMPTY_CONFIG = "/dev/null"  # every setting is an argument of xl create


def xl_string(value: str) -> str:
    """`value` as an xl.cfg string; ValueError where xl could not read it back."""
    if any(c in value for c in '"\\\n'):
        raise ValueError(f"{value!r} cannot be an xl.cfg string (it holds a quote, a backslash or a newline)")
    return f'"{value}"'


def domain_name(guest: str) -> str:
    """The guest's name for its hypervisor: a KVM guest's QEMU -name, a domU's in dom0's `xl list`."""
    return f"nestedkvm-{guest}"


def domu_argv(name: str, memory_mib: int, vcpus: int, cpuid: str, boot: tuple[Path, Path | None, str],
              device_model_args: list[str]) -> list[str]:
    """`xl create -F` of an HVM domU, its whole config on the command line (one KEY=VALUE each; a
    later one wins): xl returns when the domain is gone. `boot`: the bzImage (QEMU's loader for
    a Xen HVM guest takes no PVH vmlinux), the initramfs and the kernel command line."""
    kernel, initrd, cmdline = boot
    settings = [f"name={xl_string(domain_name(name))}", *DOMU_SETTINGS, f"memory={memory_mib}",
                f"vcpus={vcpus}", f"cpuid={xl_string(cpuid)}", f"kernel={xl_string(str(kernel))}",
                *([f"ramdisk={xl_string(str(initrd))}"] if initrd is not None else []),
                f"cmdline={xl_string(cmdline)}",
                f"device_model_args=[{', '.join(xl_string(arg) for arg in device_model_args)}]"]
    return ["xl", "create", "-F", XL_EMPTY_CONFIG, *settings]
