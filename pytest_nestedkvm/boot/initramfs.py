"""The built-in guest's boot initramfs: busybox, a module closure and an init.

The init mounts the sealed view (view.py: each allowed host directory its own read-only
virtio-9p export, at its own path), puts tmpfs where a guest
must write, builds a complete /dev, loads kvm with nested=1 and starts a root
shell on each virtio-serial command port. The archive is content-addressed and
built once per content, under a file lock, in the user cache directory (not
/tmp: the guest hides /tmp behind a tmpfs, and deeper levels boot from this file).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..base.errors import HostError
from ..base.files import write_atomically
from ..base.host import HARDWARE_BACKENDS, KVM_MODULE_BY_FLAG
from .layout import BOOT_MARKS, LOWER_DIR, PORT_DIR, REPLY_ROLE, SHELL_PORTS, WRITABLE_EXPORTS
from .xen import dom0_script

FORMAT_VERSION = "1"
# Drivers the guest cannot boot without, and ones it uses when the kernel has them.
REQUIRED_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p")
OPTIONAL_MODULES = ("virtio_net", "pvpanic_pci", "virtio_blk", "overlay")  # virtio_blk: an L2 image as /dev/vda;
# overlay: the writable /etc (without it, /etc stays read-only like the other exports)
# Loaded in parallel with the drivers above (kvm.ko alone takes ~0.4 s to load under TCG).
KVM_MODULES = HARDWARE_BACKENDS
MODULE_PARAMS = {name: "nested=1" for name in KVM_MODULES}
# cache=loose: the exports are read-only and static for the session, and caching it
# makes each exec several times cheaper under TCG.
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose"
# The guest's shell: static busybox ash from tmpfs. Under TCG a dynamically linked
# exec costs 40-130 ms (measured), while busybox runs its applets (cat, grep, ...)
# without exec; programs busybox lacks still come from the exported system directories on PATH.
BUSYBOX = f"{PORT_DIR}/busybox"
AGENT_SHELL = f"{BUSYBOX} sh"
# The guest scheduler's wakeup granularity (see stage2_script).
WAKEUP_GRANULARITY_NS = 15_000_000


@dataclass(frozen=True)
class Kernel:
    path: Path
    release: str
    modules_dir: Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-nestedkvm"


def kernel_release(path: Path) -> str:
    """Read the version string a bzImage carries in its setup header."""
    with path.open("rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] == b"HdrS":
        offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
        version = head[offset : offset + 256].split(b"\0", 1)[0].decode("ascii", "replace")
        if version:
            return version.split()[0]
    match = re.match(r"vmlinuz-(.+)$", path.name)
    if match:
        return match.group(1)
    raise HostError(f"{path} is not a Linux bzImage (no setup header): pass a kernel built for x86 "
                    "(arch/x86/boot/bzImage) with --nested-kernel")


def find_kernel(override: Path | None = None, modules: Path | None = None, root: Path = Path("/")) -> Kernel:
    """The kernel to boot: the given one, else the running one, else the newest with modules."""
    if override is not None:
        release = kernel_release(override)
        modules_dir = modules or root / "lib/modules" / release
        if not (modules_dir / "modules.dep").is_file():
            raise HostError(f"no modules for kernel {override} (looked for {modules_dir}/modules.dep): "
                            "pass --nested-modules DIR (e.g. the INSTALL_MOD_PATH of `make modules_install`)")
        return Kernel(override, release, modules_dir)
    candidates = [root / "boot" / f"vmlinuz-{os.uname().release}"]
    candidates += sorted((root / "boot").glob("vmlinuz-*"), key=_version_key, reverse=True)
    for path in candidates:
        release = path.name.removeprefix("vmlinuz-")
        modules_dir = root / "lib/modules" / release
        if path.is_file() and (modules_dir / "modules.dep").is_file():
            if not os.access(path, os.R_OK):
                raise HostError(f"{path} is not readable by this user: run as root, or "
                                f"`sudo chmod a+r {path}`, or pass --nested-kernel")
            return Kernel(path, release, modules_dir)
    raise HostError("no kernel in /boot has a matching /lib/modules/<version>: "
                    "apt-get install linux-image-amd64, or pass --nested-kernel and --nested-modules")


def _version_key(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path.name)]


# Payload magics inside a bzImage, and how to unpack each.
_PAYLOADS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip"), (b"BZh", "bzip2"),
)
# An ELF note "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): the kernel has a PVH entry point.
_PVH_NOTE = re.compile(rb"\x04\x00\x00\x00.{4}\x12\x00\x00\x00Xen\x00", re.DOTALL)


def boot_image(kernel: Kernel, cache: Path | None = None) -> Path:
    """The file to pass to -kernel: an uncompressed vmlinux when the kernel can boot via PVH.

    QEMU starts a PVH vmlinux directly; under TCG this skips ~3 s of the bzImage
    decompressing itself (measured: first console line at 0.4 s instead of 3.8 s).
    Falls back to a copy of the bzImage when it cannot be unpacked or lacks a PVH entry.
    Either way the file is in the cache, which every guest sees (deeper levels boot from it).
    """
    data = kernel.path.read_bytes()
    cache = cache or cache_dir()
    digest = hashlib.sha256(data).hexdigest()[:16]
    for name in (f"vmlinux-{kernel.release}-{digest}", f"bzImage-{kernel.release}-{digest}"):
        if (cache / name).exists():
            return cache / name
    vmlinux = data if data[:4] == b"\x7fELF" else _unpack_payload(data)
    pvh = vmlinux is not None and _PVH_NOTE.search(vmlinux) is not None
    target = cache / (f"vmlinux-{kernel.release}-{digest}" if pvh else f"bzImage-{kernel.release}-{digest}")
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            write_atomically(target, vmlinux if pvh and vmlinux is not None else data)
    return target


def guest_boot_dir(kernel: Kernel, cache: Path | None = None) -> Path:
    """A directory the guests see as their /boot: the kernel they run as vmlinuz-RELEASE (the
    bzImage, which a hypervisor inside the guest can boot), with its config-RELEASE and
    System.map-RELEASE where the host has them (beside the kernel in /boot, or in its build tree).
    In the cache, once per kernel content, like the boot image."""
    data = kernel.path.read_bytes()
    cache = cache or cache_dir()
    target = cache / f"boot-{kernel.release}-{hashlib.sha256(data).hexdigest()[:16]}"
    if target.is_dir():
        return target
    tree = kernel.path.parents[3] if kernel.path.parts[-4:-1] == ("arch", "x86", "boot") else None
    found = {f"vmlinuz-{kernel.release}": kernel.path}
    for name, in_tree in ((f"config-{kernel.release}", ".config"), (f"System.map-{kernel.release}", "System.map")):
        candidate = next((c for c in (kernel.path.parent / name, tree / in_tree if tree else None)
                          if c is not None and os.access(c, os.R_OK)), None)
        if candidate is not None:
            found[name] = candidate
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-boot-"))
            for name, source in found.items():
                shutil.copyfile(source, staging / name)
                os.chmod(staging / name, 0o644)  # deeper levels read them through the cache's export
            staging.chmod(0o755)
            os.replace(staging, target)
    return target


def _unpack_payload(data: bytes) -> bytes | None:
    for magic, kind in _PAYLOADS:
        start = data.find(magic, 0x200)
        if start < 0:
            continue
        try:
            if kind == "xz":
                out = lzma.LZMADecompressor().decompress(data[start:])
            elif kind == "gzip":
                out = zlib_decompress_stream(data[start:])
            elif kind == "bzip2":
                out = bz2.BZ2Decompressor().decompress(data[start:])
            else:
                zstd = shutil.which("zstd")
                if zstd is None:
                    return None
                out = subprocess.run([zstd, "-dc"], input=data[start:], capture_output=True).stdout
        except (lzma.LZMAError, OSError, EOFError, ValueError):
            continue
        if out[:4] == b"\x7fELF":
            return out
    return None


def zlib_decompress_stream(data: bytes) -> bytes:
    """gunzip one member, ignoring what trails it (a bzImage carries more after the payload)."""
    return zlib.decompressobj(wbits=31).decompress(data)


def module_closure(modules_dir: Path, wanted: tuple[str, ...], required: tuple[str, ...] = ()) -> list[Path]:
    """Module files for `wanted` plus their dependencies, each after what it needs.

    Names in `required` must exist as a module or be built in; others are skipped
    when absent.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, needs = line.partition(":")
        deps[module_name(path)] = (path, needs.split())
    builtin = _builtin_names(modules_dir)
    missing = [name for name in required if name not in deps and name not in builtin]
    if missing:
        raise HostError(f"kernel {modules_dir.name} lacks the drivers {', '.join(missing)} "
                        "(neither modules nor built in): enable CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_CONSOLE, "
                        "CONFIG_NET_9P_VIRTIO and CONFIG_9P_FS")
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in deps:
            return
        seen.add(name)
        path, needs = deps[name]
        for need in needs:
            visit(module_name(need))
        ordered.append(modules_dir / path)

    for name in wanted:
        visit(name)
    return ordered


def module_name(path: str) -> str:
    """kernel/arch/x86/kvm/kvm-amd.ko.xz -> kvm_amd (the name the kernel uses)."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _builtin_names(modules_dir: Path) -> set[str]:
    builtin = modules_dir / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {module_name(line) for line in builtin.read_text().split()}


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod loads plain ELF only."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise HostError(f"{path} is zstd-compressed and `zstd` is not installed: apt-get install zstd")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def find_busybox() -> Path:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file():
            path = Path(candidate)
            if b"libc.so" in path.read_bytes()[:65536]:
                continue  # a dynamic busybox cannot run before the root is mounted
            return path
    raise HostError("busybox (static) not found: apt-get install busybox-static")


def init_script(drivers: list[str], kvm: list[str]) -> str:
    """The guest's /init (busybox sh): mount, load drivers, switch to the root the exports make up.

    `drivers` load in order; `kvm` loads in order too, concurrently with them.
    """
    def loads(names: list[str]) -> str:
        return "; ".join(f"load {name} {MODULE_PARAMS.get(name, '')}".rstrip() for name in names) or ":"

    vendor_cases = "\n".join(f"    {module}) grep -qw {flag} /proc/cpuinfo ;;"
                             for flag, module in KVM_MODULE_BY_FLAG.items())
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Boot phases by guest uptime (a shell builtin read, no process): benchmarks/boot_split.py.
mark() {{ read up _ < /proc/uptime; marks="$marks$1=$up "; }}
mark init
say() {{ echo "nestedkvm: $*" > /dev/console; }}
fail() {{ say "FATAL: $*"; echo c > /proc/sysrq-trigger; }}
vendor_ok() {{
  case $1 in
{vendor_cases}
    *) true ;;
  esac
}}
# KVM takes the host's TSC rate once, when kvm_amd/kvm_intel loads. Under TCG the kernel's first
# TSC estimate can be 0.1 % off its refined one (a second later); 6.1's KVM then gives each vCPU
# no TSC multiplier at all ("user requested TSC rate below hardware speed"), and the guests'
# TSC-deadline timers drift out of reach: L2 loses its timer while it boots. So the vendor
# module waits (at most 5 s) until tsc-early is gone: refined, given up, or never needed.
tsc_settled() {{
  n=0
  while [ $n -lt 100 ]; do
    case " $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource) " in
      *" tsc-early "*) sleep 0.05; n=$((n + 1)) ;;
      *) return ;;
    esac
  done
  say "the TSC calibration did not settle within 5 s: KVM loads with the first estimate"
}}
load() {{
  name=$1; shift
  vendor_ok $name || return 0
  case $name in {"|".join(HARDWARE_BACKENDS)}) tsc_settled ;; esac
  insmod /modules/$name.ko "$@" || say "insmod $name failed"
}}
( {loads(kvm)} ) &
{loads(drivers)}
mark drivers
# The root: a writable tmpfs with the host's exports at their own paths (nestedkvm.mount=TAG:PATH,
# one per read-only 9p export; see view.py), or one export as the whole root (TAG:/). The
# WRITABLE_EXPORTS are the lower layer of an overlay whose upper layer is a tmpfs: the guest
# writes there into its own memory, and nothing reaches the host (the 9p mount underneath is
# read-only, and so is QEMU's export; the guest sees it again at LOWER_DIR, see layout.py).
mkdir -p /newroot /lower /rw
mount -t tmpfs -o mode=700 tmpfs /rw
ninep() {{ mount -t 9p -o {NINEP_OPTIONS} "$1" "$2" || fail "cannot mount the export $1 at $2 over 9p"; }}
export_at() {{
  case "$2" in
    {"|".join(f"/newroot{path}" for path in WRITABLE_EXPORTS)}) ;;
    *) ninep "$1" "$2"; return ;;
  esac
  mkdir -p "/lower/$1" "/rw/$1/upper" "/rw/$1/work"
  ninep "$1" "/lower/$1"
  if mount -t overlay -o "lowerdir=/lower/$1,upperdir=/rw/$1/upper,workdir=/rw/$1/work" overlay "$2" 2>/dev/null; then
    lowers="$lowers $1:${{2#/newroot}}"; return
  fi
  say "no overlay for $2: it stays read-only"
  mount --move "/lower/$1" "$2"
}}
mounts=; links=; lowers=
for arg in $(cat /proc/cmdline); do
  case $arg in
    nestedkvm.mount=*:/) rootfs=${{arg#*=}}; rootfs=${{rootfs%:/}}; export_at $rootfs /newroot ;;
    nestedkvm.mount=*) mounts="$mounts ${{arg#*=}}" ;;
    nestedkvm.link=*) links="$links ${{arg#*=}}" ;;
  esac
done
[ -n "$rootfs" ] || mount -t tmpfs -o mode=755 tmpfs /newroot
for d in /proc /sys /dev; do mkdir -p /newroot$d 2>/dev/null; done
# In the order given, shallower paths first: a tmpfs where the guest writes, else an export.
for m in $mounts; do
  tag=${{m%%:*}}; at=/newroot${{m#*:}}
  mkdir -p "$at" 2>/dev/null
  if [ "$tag" = tmpfs ]; then mount -t tmpfs -o mode=1777 tmpfs "$at"; else export_at "$tag" "$at"; fi
done
chmod 755 /newroot/run
mkdir -p -m 1777 /newroot/run/lock
for l in $lowers; do
  at=/newroot{LOWER_DIR}${{l#*:}}; mkdir -p "$at" && mount --bind "/lower/${{l%%:*}}" "$at"
done
for l in $links; do ln -s "${{l#*:}}" "/newroot${{l%%:*}}"; done
mark mounts
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /newroot{PORT_DIR}
# virtio ports, and then their names, arrive asynchronously after the driver loads:
# wait (up to 10 s) until all nestedkvm.ports= of them are there.
want=2
for arg in $(cat /proc/cmdline); do case $arg in nestedkvm.ports=*) want=${{arg#*=}} ;; esac; done
n=0
while [ $n -lt 200 ]; do
  found=0
  for p in /sys/class/virtio-ports/*; do
    name=
    [ -e "$p/name" ] && read name < "$p/name"
    [ -n "$name" ] || continue
    ln -sf /dev/${{p##*/}} /newroot{PORT_DIR}/port.$name
    found=$((found + 1))
  done
  [ $found -ge $want ] && break
  sleep 0.05; n=$((n + 1))
done
mark ports
cp /stage2 /bin/busybox /newroot{PORT_DIR}/
wait  # for the kvm modules
mark kvm
echo "$marks" > /newroot{BOOT_MARKS}
for m in proc sys dev; do mount --move /$m /newroot/$m; done
exec switch_root /newroot {AGENT_SHELL} /run/nestedkvm/stage2
"""


def stage2_script() -> str:
    """PID 1 on the guest's root (the sealed view): a shell on each command port, respawned on EOF."""
    return f"""#!{AGENT_SHELL}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TERM=dumb LANG=C.UTF-8
echo 1 > /proc/sys/kernel/sysrq
echo 7 > /proc/sys/kernel/printk  # deeper levels boot with loglevel=5 (see qemu.py); from now on, all of it
mount -t debugfs debugfs /sys/kernel/debug  # KVM's own statistics live there too
# Emulated, a context switch costs ~50 us (each CR3 load flushes TCG's soft TLB; nested
# too): a reader woken and run on every line written into a pipe made `awk | sort` 13-18x
# slower on one vCPU. {WAKEUP_GRANULARITY_NS} is tuned's throughput-performance value; kernels
# with EEVDF (6.6+) have no such file.
g=/sys/kernel/debug/sched/wakeup_granularity_ns
[ -w $g ] && echo {WAKEUP_GRANULARITY_NS} > $g
# A Xen dom0 (nestedkvm.xen=TREE) starts its host's services before the first command.
{dom0_script()}cd /
for pair in {' '.join(f"{SHELL_PORTS[ask]}:{SHELL_PORTS[reply]}" for ask, reply in REPLY_ROLE.items())}; do
  ask={PORT_DIR}/port.${{pair%%:*}} reply={PORT_DIR}/port.${{pair#*:}}
  [ -e $ask ] && [ -e $reply ] || {{ echo "nestedkvm: no virtio ports $pair" > /dev/console; continue; }}
  # Commands in on one port, read-only; replies out on the other, write-only (layout.REPLY_ROLE).
  (while :; do {AGENT_SHELL} <$ask >$reply 2>/dev/console; sleep 0.2; done) &
done
read up _ < /proc/uptime; echo "stage2=$up" >> {BOOT_MARKS}
echo "nestedkvm: stage2 up" > /dev/console
while :; do wait; sleep 60; done
"""


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _cpio_newc(entries: list[_Entry]) -> bytes:
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad()
        out.extend(entry.data)
        pad()
    return bytes(out)


def build_initramfs(kernel: Kernel, busybox: Path | None = None, cache: Path | None = None) -> Path:
    """Return the cached initramfs for `kernel`, building it once if needed."""
    busybox = busybox or find_busybox()
    drivers = module_closure(kernel.modules_dir, REQUIRED_MODULES + OPTIONAL_MODULES, REQUIRED_MODULES)
    kvm = module_closure(kernel.modules_dir, KVM_MODULES)
    if set(kvm) & set(drivers):  # shared dependencies: load one after the other instead
        drivers, kvm = drivers + [m for m in kvm if m not in drivers], []
    module_files = drivers + kvm
    names = [module_name(str(p)) for p in drivers], [module_name(str(p)) for p in kvm]
    files = [_Entry("init", 0o100755, init_script(*names).encode()),
             _Entry("stage2", 0o100755, stage2_script().encode()),
             _Entry("bin/busybox", 0o100755, busybox.read_bytes())]
    files += [_Entry(f"modules/{module_name(str(p))}.ko", 0o100644, read_module(p)) for p in module_files]
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for entry in files:
        digest.update(entry.name.encode() + b"\0" + hashlib.sha256(entry.data).digest())
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"initramfs-{kernel.release}-{digest.hexdigest()[:16]}.cpio"
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        dirs = [_Entry(d, 0o040755) for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
        write_atomically(target, _cpio_newc([*dirs, _Entry("dev/console", 0o020600, rdev=(5, 1)), *files]))
    return target
