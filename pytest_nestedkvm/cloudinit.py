"""A cloud-init NoCloud seed, written in-process as a tiny ISO9660 image.

cloud-init's NoCloud datasource reads `meta-data` and `user-data` from a filesystem
labelled `cidata`. Users may lack genisoimage/xorriso/cloud-localds, so the image is
written here: a primary ISO9660 tree (names `META-DATA.;1`, which Linux's default
`map=normal` shows as `meta-data`) plus a Joliet tree with the exact lower-case names
(what Linux, and every other common reader, uses when it is present). Both trees point
at the same file extents (checked: blkid, isoinfo, and cloud-init 22.4 on Debian 12
reading it from a virtio disk and from an IDE CD-ROM; Linux shows the same names with
and without `-o nojoliet`). The user-data authorizes one SSH public key for root and for
the image's default user, turns password logins off and skips slow first-boot work.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

VOLUME_ID = "cidata"
SECTOR = 2048
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_KEY = re.compile(r"(ssh-|ecdsa-|sk-)\S+ \S+( [^\r\n]*)?")


def _yaml(value: str) -> str:
    """A YAML scalar for any string: JSON strings are valid YAML flow scalars."""
    return json.dumps(value)


def meta_data(*, hostname: str, instance_id: str) -> str:
    """NoCloud meta-data. A new instance-id makes cloud-init treat the boot as a first boot."""
    if not _HOSTNAME.fullmatch(hostname):
        raise ValueError(f"not a valid host name: {hostname!r}")
    if not instance_id or "\n" in instance_id:
        raise ValueError(f"not a valid instance id: {instance_id!r}")
    return f"instance-id: {_yaml(instance_id)}\nlocal-hostname: {_yaml(hostname)}\n"


def user_data(*, public_key: str) -> str:
    """#cloud-config that lets `public_key` in as root and as the default user, keys only."""
    public_key = public_key.strip()
    if not _KEY.fullmatch(public_key):
        raise ValueError(f"not an OpenSSH public key line: {public_key[:40]!r}")
    return "\n".join(
        [
            "#cloud-config",
            # The default user (debian, ubuntu, fedora, ...) gets the key; with
            # disable_root false root gets it too, without the "login as ..." stub.
            "users: [default]",
            "disable_root: false",
            f"ssh_authorized_keys: [{_yaml(public_key)}]",
            "ssh_pwauth: false",
            # Keep host keys an image already has, and generate only ed25519 where it has
            # none: RSA key generation takes seconds under TCG.
            "ssh_deletekeys: false",
            "ssh_genkeytypes: [ed25519]",
            # Make the host name resolve (sudo complains otherwise); leave the rest of /etc/hosts.
            "manage_etc_hosts: localhost",
            # Nothing that needs the network or time: the guest is a throwaway test VM.
            "package_update: false",
            "package_upgrade: false",
            "package_reboot_if_required: false",
            "",
        ]
    )


def write_nocloud_seed(path: Path, *, public_key: str, hostname: str, instance_id: str) -> Path:
    """Write a NoCloud seed ISO to `path` (attach it read-only as a raw disk or CD-ROM)."""
    files = {
        "meta-data": meta_data(hostname=hostname, instance_id=instance_id).encode(),
        "user-data": user_data(public_key=public_key).encode(),
    }
    path.write_bytes(iso9660(VOLUME_ID, files))
    return path


def iso9660(volume_id: str, files: Mapping[str, bytes], when: datetime | None = None) -> bytes:
    """A one-directory ISO9660 image with a Joliet tree (each directory must fit one sector).

    Layout in 2048-byte sectors: 0-15 system area, 16 primary descriptor, 17 Joliet
    descriptor, 18 terminator, 19-22 path tables (L and M: primary, then Joliet), 23 and
    24 the primary and Joliet root directories, then each file's data from sector 25 on.
    """
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    extents: dict[str, int] = {}
    total = 25
    for name, data in files.items():
        extents[name] = total
        total += max(1, -(-len(data) // SECTOR))
    image = bytearray(total * SECTOR)

    def put(sector: int, data: bytes) -> None:
        image[sector * SECTOR : sector * SECTOR + len(data)] = data

    for tree, joliet in enumerate((False, True)):
        root, path_l, path_m = 23 + tree, 19 + 2 * tree, 20 + 2 * tree
        put(16 + tree, _descriptor(volume_id, total, root, path_l, path_m, when, joliet=joliet))
        put(path_l, struct.pack("<BBIH2x", 1, 0, root, 1))  # the root's entry: id 0, parent 1
        put(path_m, struct.pack(">BBIH2x", 1, 0, root, 1))
        # "." and "..", then the files sorted by their encoded identifiers.
        records = [
            _record(root, SECTOR, b"\0", when, directory=True),
            _record(root, SECTOR, b"\1", when, directory=True),
        ]
        idents = {n: n.encode("utf-16-be") if joliet else n.upper().encode("ascii") + b".;1" for n in files}
        records += [_record(extents[n], len(files[n]), idents[n], when) for n in sorted(files, key=idents.__getitem__)]
        directory = b"".join(records)
        if len(directory) > SECTOR:
            raise ValueError("too many files for a one-sector directory")
        put(root, directory)
    put(18, b"\xffCD001\x01")  # volume descriptor set terminator
    for name, data in files.items():
        put(extents[name], data)
    return bytes(image)


def _both16(value: int) -> bytes:
    return struct.pack("<H", value) + struct.pack(">H", value)


def _both32(value: int) -> bytes:
    return struct.pack("<I", value) + struct.pack(">I", value)


def _record(extent: int, size: int, name: bytes, when: datetime, *, directory: bool = False) -> bytes:
    """A directory record (ECMA-119 9.1), padded to an even length."""
    date = bytes([when.year - 1900, when.month, when.day, when.hour, when.minute, when.second, 0])
    body = (
        b"\0"  # extended attribute record length
        + _both32(extent)
        + _both32(size)
        + date
        + bytes([2 if directory else 0, 0, 0])  # flags, file unit size, interleave gap
        + _both16(1)  # volume sequence number
        + bytes([len(name)])
        + name
    )
    body += b"\0" * (len(body) % 2)  # the length byte counts the padding too
    return bytes([len(body) + 1]) + body


def _descriptor(
    volume_id: str, total: int, root: int, path_l: int, path_m: int, when: datetime, *, joliet: bool
) -> bytes:
    """The primary volume descriptor, or the Joliet supplementary one (ECMA-119 8.4, 8.5)."""
    out = bytearray(SECTOR)

    def put(at: int, data: bytes) -> None:
        out[at : at + len(data)] = data

    def text(at: int, size: int, value: str = "") -> None:
        # Identifiers are space padded; Joliet ones are UCS-2 big-endian.
        encoded = value.encode("utf-16-be") if joliet else value.encode("ascii")
        put(at, (encoded + (b"\0 " if joliet else b" ") * size)[:size])

    put(0, bytes([2 if joliet else 1]) + b"CD001\x01")
    text(8, 32, "LINUX")  # system identifier
    text(40, 32, volume_id)
    put(80, _both32(total))
    if joliet:
        put(88, b"%/E")  # escape sequence: Joliet, UCS-2 level 3
    put(120, _both16(1) + _both16(1) + _both16(SECTOR))  # set size, sequence number, block size
    put(132, _both32(10))  # path table size: the one root entry
    put(140, struct.pack("<I", path_l))
    put(148, struct.pack(">I", path_m))
    put(156, _record(root, SECTOR, b"\0", when, directory=True))
    for at, size in ((190, 128), (318, 128), (446, 128), (574, 128), (702, 37), (739, 37), (776, 37)):
        text(at, size)  # volume set, publisher, preparer, application, copyright, abstract, bibliography
    stamp = when.strftime("%Y%m%d%H%M%S00").encode() + b"\0"
    put(813, stamp + stamp + b"0" * 16 + b"\0" + b"0" * 16 + b"\0")  # created, modified, expires, effective
    put(881, b"\x01")  # file structure version
    return bytes(out)
