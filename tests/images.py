"""A Debian 12 disk image for the integration tests, built here from Debian's packages.

`debian_image()` returns the path of a qcow2 image that boots through the firmware
(SeaBIOS, GRUB on the MBR, kernel and systemd on ttyS0), gets its address by DHCP
on a virtio NIC, and takes its SSH key from a cloud-init NoCloud seed. It also has
a `tester` account with password `tester` for the serial-console login fallback
(this image is for tests only). The image is built once, under a file lock, into
the user cache directory and named by a hash of this file, so changing the recipe
builds a new one. `python tests/images.py` builds it and prints its path.

The build needs root (debootstrap and chroot) and the host tools debootstrap,
mkfs.ext4, grub-mkimage (grub-pc-bin) and qemu-img (scripts/bootstrap.sh installs
them). It uses no loop devices or mounts: the root tree goes into an ext4 file
with `mkfs.ext4 -d`, and the MBR, GRUB and that file are laid into the disk by hand.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

SUITE = "bookworm"
# minbase plus what boots and serves SSH. python3-cffi-backend is named because
# debootstrap does not resolve the virtual package python3-cryptography needs.
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "openssh-server",
    "cloud-init",
    "python3-cffi-backend",
    "iproute2",
    "sudo",
    # L2 inside this image as L1 runs on the image's own QEMU (and on its KVM).
    "qemu-system-x86",
)
# Units a throwaway test guest does not need; masked so nothing re-enables them.
MASKED_UNITS = (
    # cloud-init's first stage only starts Python (7 s under TCG) to find the seed early;
    # the network stage finds the same NoCloud seed, and sshd waits for that stage anyway.
    "cloud-init-local.service",
    # cloud-init's network stage (and so sshd) would wait for DHCP; the seed is a local
    # disk, and DHCP finishes while cloud-init's Python starts (1.7 s saved).
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    # No tty1 (no display), and modules that load on first use of their /dev node anyway.
    "getty@tty1.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
)
DISK_MIB = 2048  # virtual size; qcow2 stores only what is used
PART_START = 2048  # sectors: the first partition starts at 1 MiB, GRUB's core.img lives before it
ROOT_UUID = "6e657374-6564-4b56-4d00-000000000001"  # fixed, so grub.cfg and fstab can name it
# Every byte on the emulated UART costs: print only warnings and worse (panics, oopses
# and WARNs still show; dmesg has everything) and no systemd status lines unless a unit fails.
KERNEL_ARGS = "ro console=ttyS0,115200n8 loglevel=5 systemd.show_status=error"
TESTER = "tester"  # user and password
# root's password, for --nested-login root:... (a serial console login that may start L2); sshd keeps
# refusing passwords for root (Debian: PermitRootLogin prohibit-password).
ROOT_PASSWORD = "root-on-the-console"

FILES = {
    "etc/hostname": "debian\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    # fsck pass 0: the image is only ever booted with -snapshot, so it is always clean.
    "etc/fstab": f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t0\n",
    # Only NoCloud (a `cidata` disk) and the None fallback: no probing of cloud metadata servers.
    "etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [NoCloud, None]\n",
    # systemd-networkd below does DHCP, so cloud-init need not write network config;
    # a C locale needs no locale-gen run, and keeping the host keys made at build time
    # skips RSA key generation (each seconds under TCG; also when no seed is attached).
    "etc/cloud/cloud.cfg.d/91_nestedkvm.cfg": (
        "network: {config: disabled}\nlocale: C.UTF-8\nssh_deletekeys: false\nssh_genkeytypes: [ed25519]\n"
        # Only the modules a test guest uses. sshd waits for the first list; the others run
        # after SSH is up but compete with the first tests for the CPU. Dropping set-passwords
        # also stops it restarting sshd (refusing connections) seconds after SSH came up.
        "cloud_init_modules: [seed_random, bootcmd, write_files, set_hostname, update_hostname,"
        " update_etc_hosts, users_groups, ssh]\n"
        "cloud_config_modules: [runcmd]\n"
        "cloud_final_modules: [scripts_per_once, scripts_per_boot, scripts_per_instance, scripts_user, final_message]\n"
    ),
    # The tester password is for the serial console only, never for SSH.
    "etc/ssh/sshd_config.d/10-nestedkvm.conf": "PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
    "etc/default/locale": "LANG=C.UTF-8\n",
    # getty units are Type=idle: systemd holds them back up to 5 s while other jobs (here
    # cloud-init's later stages) run. Prompt on the serial console as soon as logins are allowed.
    "etc/systemd/system/serial-getty@ttyS0.service.d/10-nestedkvm.conf": "[Service]\nType=simple\n",
    # DHCPv4 only: QEMU's user network forwards IPv4 ports, and waiting for IPv6
    # router advertisements would only delay "network online".
    "etc/systemd/network/80-dhcp.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\n",
    # The kernel has virtio_blk as a module: a small initramfs with just the disk drivers.
    "etc/initramfs-tools/conf.d/nestedkvm.conf": "MODULES=list\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\nahci\nata_piix\n",
}
# Left out of the image to keep it small.
REMOVED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists")
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
# Named so that an Ubuntu host (whose debootstrap defaults to Ubuntu's keys) verifies Debian's archive.
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class ImageUnavailable(Exception):
    """This machine cannot build the image (not root, a tool missing); the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-nestedkvm" / "images"


def image_path() -> Path:
    """Where the image for this recipe lives (it may not be built yet)."""
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return cache_dir() / f"debian-12-{recipe}.qcow2"


def debian_image() -> Path:
    """The image's path, building it first if this recipe has not been built on this machine."""
    path = image_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    with FileLock(str(lock)):
        if not path.exists():  # another process may have built it while we waited
            check_prerequisites()
            build(path, debian_mirror())
            if "SUDO_UID" in os.environ:  # built with sudo for a user: hand the cache back to that user
                for owned in (path.parent.parent, path.parent, lock, path):
                    os.chown(owned, int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "-1")))
    return path


def debian_mirror(apt: Path = Path("/etc/apt")) -> str:
    """$NESTEDKVM_DEBIAN_MIRROR, else the first source for bookworm in this machine's apt configuration."""
    if mirror := os.environ.get("NESTEDKVM_DEBIAN_MIRROR"):
        return mirror
    for sources in sorted(apt.glob("sources.list.d/*.sources")):  # deb822: stanzas of "Field: value" lines
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields: dict[str, str] = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "deb").split():
                if fields.get("URIs") and fields.get("Enabled", "yes") != "no":
                    return fields["URIs"].split()[0]
    one_line = apt / "sources.list"  # "deb [options] URI suite components"
    text = one_line.read_text() if one_line.exists() else ""
    if found := re.search(rf"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}(\s|$)", text, re.MULTILINE):
        return str(found[1])
    raise ImageUnavailable(
        f"no Debian mirror for {SUITE} in {apt}/sources.list.d/*.sources or {apt}/sources.list: "
        "set NESTEDKVM_DEBIAN_MIRROR to one (a URL like those in sources.list)"
    )


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ImageUnavailable(
            f"building the Debian test image needs root (debootstrap, chroot): run "
            f"`sudo env XDG_CACHE_HOME={cache_dir().parent.parent} {sys.executable} {__file__}` once"
        )
    tools = {
        "debootstrap": "debootstrap",
        "mkfs.ext4": "e2fsprogs",
        "grub-mkimage": "grub-common",
        "qemu-img": "qemu-utils",
    }
    missing = {package for tool, package in tools.items() if shutil.which(tool) is None}
    if not (GRUB_DIR / "boot.img").exists():
        missing.add("grub-pc-bin")
    if not KEYRING.exists():
        missing.add("debian-archive-keyring")
    if missing:
        raise ImageUnavailable(f"building the Debian test image needs: apt-get install {' '.join(sorted(missing))}")


def build(dest: Path, mirror: str) -> None:
    """Build the image into `dest` (atomically: a half-built image never has that name)."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        root = work / "root"
        log(f"debootstrap {SUITE} from {mirror} (1-3 minutes)")
        run(["debootstrap", "--variant=minbase", f"--keyring={KEYRING}", f"--include={','.join(PACKAGES)}",
             SUITE, str(root), mirror])  # fmt: skip
        check_installed(root)
        configure(root)
        log("assembling the disk (mkfs.ext4 -d, GRUB, qemu-img convert)")
        raw = work / "disk.raw"
        assemble(root, work, raw)
        run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
        (work / "disk.qcow2").chmod(0o644)
        os.replace(work / "disk.qcow2", dest)
    finally:
        unmount_below(work)  # debootstrap mounts /proc and /sys in the root while it runs
        shutil.rmtree(work, ignore_errors=True)


def configure(root: Path) -> None:
    """Settings, accounts and units, then a lean initramfs; drop what a test guest never reads."""
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", TESTER)
    chroot(root, "chpasswd", stdin=f"{TESTER}:{TESTER}\nroot:{ROOT_PASSWORD}\n")
    chroot(root, "systemctl", "enable", "systemd-networkd.service")
    chroot(root, "systemctl", "mask", *MASKED_UNITS)
    chroot(root, "update-initramfs", "-u", "-k", "all")
    for name in (*REMOVED, "var/log"):
        for path in (root / name).rglob("*"):  # files only: the directories stay, as packages expect
            if not path.is_dir() or path.is_symlink():
                path.unlink()
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    # GRUB: its modules, and a config that boots the one kernel on the serial console.
    shutil.copytree(GRUB_DIR, root / "boot/grub/i386-pc", ignore=shutil.ignore_patterns("*.img", "*.image"))
    kernel = next((root / "boot").glob("vmlinuz-*")).name
    initrd = next((root / "boot").glob("initrd.img-*")).name
    (root / "boot/grub/grub.cfg").write_text(
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=0\n"
        "menuentry 'Debian 12' {\n"
        f"    linux /boot/{kernel} root=UUID={ROOT_UUID} {KERNEL_ARGS}\n"
        f"    initrd /boot/{initrd}\n"
        "}\n"
    )


def assemble(root: Path, work: Path, raw: Path) -> None:
    """An MBR disk: GRUB's boot.img in sector 0, core.img from sector 1, ext4 from 1 MiB."""
    part = work / "root.ext4"
    part_sectors = DISK_MIB * 2048 - PART_START
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", ROOT_UUID, "-d", str(root), str(part), f"{part_sectors // 2}k"])
    core = work / "core.img"
    # core.img reads the partition with these modules, then loads normal.mod and
    # grub.cfg from the prefix: "(,msdos1)" is partition 1 of the disk the BIOS booted.
    run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core), "-p", "(,msdos1)/boot/grub",
         "biosdisk", "part_msdos", "ext2"])  # fmt: skip
    core_bytes = core.read_bytes()
    if len(core_bytes) > (PART_START - 1) * 512:
        raise RuntimeError(f"GRUB core.img ({len(core_bytes)} bytes) does not fit before the partition")
    with raw.open("wb") as disk:
        disk.truncate(DISK_MIB * 1024 * 1024)
        disk.write(mbr((GRUB_DIR / "boot.img").read_bytes(), PART_START, part_sectors))
        disk.write(core_bytes)  # sector 1 on: boot.img loads it from there by default
        disk.seek(PART_START * 512)
        with part.open("rb") as source:
            while chunk := source.read(1 << 20):
                if chunk.count(0) == len(chunk):
                    disk.seek(len(chunk), os.SEEK_CUR)  # keep the raw file sparse
                else:
                    disk.write(chunk)


def mbr(boot_img: bytes, start: int, sectors: int) -> bytes:
    """GRUB's boot.img with a one-partition table (bootable, Linux) and the same patches as grub-bios-setup."""
    sector = bytearray(boot_img[:512])
    sector[0x5C:0x64] = struct.pack("<Q", 1)  # the sector core.img starts at
    sector[0x66:0x68] = b"\x90\x90"  # booting from a hard disk: trust the BIOS's drive number
    sector[0x1B8:0x1BE] = struct.pack("<I", 0x4E4B564D) + b"\0\0"  # disk signature
    entry = b"\x80" + chs(start) + b"\x83" + chs(start + sectors - 1) + struct.pack("<II", start, sectors)
    sector[0x1BE:0x200] = entry + b"\0" * 48 + b"\x55\xaa"
    return bytes(sector)


def chs(lba: int) -> bytes:
    """Cylinder/head/sector for a 255-head, 63-sector geometry, clamped like fdisk does."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head, sector = divmod(rest, 63)
    return bytes([head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


def check_installed(root: Path) -> None:
    """debootstrap only warns when a package fails to configure: fail the build instead."""
    status = (root / "var/lib/dpkg/status").read_text()
    broken = [
        block.split("\n", 1)[0].removeprefix("Package: ")
        for block in status.split("\n\n")
        if "\nStatus: " in block and "\nStatus: install ok installed" not in block
    ]
    if broken:
        raise RuntimeError(f"debootstrap left packages unconfigured: {', '.join(broken)} (see debootstrap.log)")


def chroot(root: Path, *argv: str, stdin: str | None = None) -> None:
    run(["chroot", str(root), *argv], env=CHROOT_ENV, stdin=stdin)


def run(argv: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed with status {result.returncode}:\n{tail}")


def unmount_below(path: Path) -> None:
    """Lazily unmount whatever is still mounted under `path`, deepest first, before deleting it."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1].replace("\\040", " ") for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"images: [{time.monotonic() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    try:
        image = debian_image()
    except ImageUnavailable as error:
        sys.exit(f"images: {error}")
    log("ready")
    print(image)
