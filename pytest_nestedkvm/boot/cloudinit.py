"""A cloud-init NoCloud seed, written in-process as a tiny ISO9660 image.

cloud-init's NoCloud datasource reads `meta-data` and `user-data` from a filesystem
labelled `cidata`. Users may lack genisoimage/xorriso/cloud-localds, so the image is
made with pycdlib (pure Python, no external tool; it keeps ISO9660's layout rules out of
this project). Like `cloud-localds`, it has a primary ISO9660 tree (names `META_DATA.;1`,
since `-` is not an ISO9660 d-character) with Rock Ridge names, plus a Joliet tree: Linux
shows the exact names `meta-data` and `user-data` through either extension. The user-data
authorizes one SSH public key for root and for the image's default user, turns password
logins off and skips slow first-boot work.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

import pycdlib

VOLUME_ID = "cidata"
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
    """Write a NoCloud seed ISO to `path` (attach it read-only as a raw disk or CD-ROM).

    The image goes to a temporary file next to `path` and is renamed over it, so `path`
    never holds a half-written seed.
    """
    files = {
        "meta-data": meta_data(hostname=hostname, instance_id=instance_id).encode(),
        "user-data": user_data(public_key=public_key).encode(),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    for name, data in files.items():
        iso_name = "/" + name.upper().replace("-", "_") + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the seed from a QEMU run as another user
            iso.write_fp(out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    finally:
        iso.close()
    return path
