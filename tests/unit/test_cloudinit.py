"""The NoCloud seed: user-data content, and the ISO9660 image read back by an independent reader."""

from __future__ import annotations

import shutil
import struct
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_nestedkvm.cloudinit import iso9660, meta_data, user_data, write_nocloud_seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH5+J/NxwWP9zvdqhxRhJGAd/MQuk39PNCk0f3iyLblk me@host"


def read_iso(image: bytes, *, joliet: bool) -> tuple[str, dict[str, bytes]]:
    """(volume id, {name: bytes}) of the root directory of the primary or the Joliet tree.

    Written from ECMA-119 independently of the writer: find the descriptor by type,
    follow its root record, walk the directory records.
    """
    sector = 2048
    wanted = 2 if joliet else 1
    for index in range(16, len(image) // sector):
        descriptor = image[index * sector : (index + 1) * sector]
        assert descriptor[1:6] == b"CD001", f"sector {index} is not a volume descriptor"
        if descriptor[0] == 255:
            raise AssertionError("no such volume descriptor")
        if descriptor[0] == wanted and (not joliet or descriptor[88:91] == b"%/E"):
            break
    encoding = "utf-16-be" if joliet else "ascii"
    assert struct.unpack("<H", descriptor[128:130])[0] == sector
    volume_id = descriptor[40:72].decode(encoding).rstrip()
    root = descriptor[156:190]
    start, size = struct.unpack("<I", root[2:6])[0], struct.unpack("<I", root[10:14])[0]
    # Both-endian fields must agree.
    assert struct.unpack(">I", root[6:10])[0] == start and struct.unpack(">I", root[14:18])[0] == size
    directory = image[start * sector : start * sector + size]
    files: dict[str, bytes] = {}
    offset = 0
    while offset < len(directory) and directory[offset]:
        length = directory[offset]
        record = directory[offset : offset + length]
        extent, data_size = struct.unpack("<I", record[2:6])[0], struct.unpack("<I", record[10:14])[0]
        name = record[33 : 33 + record[32]]
        if not record[25] & 2:  # not a directory
            files[name.decode(encoding)] = image[extent * sector : extent * sector + data_size]
        offset += length
    return volume_id, files


def test_user_data_is_cloud_config_with_the_key_for_root_and_default_user() -> None:
    assert user_data(public_key=KEY + "\n") == (
        "#cloud-config\n"
        "users: [default]\n"
        "disable_root: false\n"
        f'ssh_authorized_keys: ["{KEY}"]\n'
        "ssh_pwauth: false\n"
        "ssh_deletekeys: false\n"
        "ssh_genkeytypes: [ed25519]\n"
        "manage_etc_hosts: localhost\n"
        "package_update: false\n"
        "package_upgrade: false\n"
        "package_reboot_if_required: false\n"
    )


def test_meta_data_quotes_its_values() -> None:
    # JSON strings are YAML scalars: a colon or a quote in a value cannot change the document.
    assert meta_data(hostname="l1", instance_id='iid: "1"') == 'instance-id: "iid: \\"1\\""\nlocal-hostname: "l1"\n'


@pytest.mark.parametrize("key", ["", "not a key", "ssh-ed25519", KEY + "\nssh-rsa AAAA x"])
def test_user_data_rejects_what_is_not_one_public_key(key: str) -> None:
    with pytest.raises(ValueError, match="public key"):
        user_data(public_key=key)


@pytest.mark.parametrize("hostname", ["", "-x", "a b", "x" * 64, "a.b"])
def test_meta_data_rejects_bad_host_names(hostname: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        meta_data(hostname=hostname, instance_id="iid")


def test_seed_holds_both_files_byte_exact_in_both_trees(tmp_path: Path) -> None:
    path = write_nocloud_seed(tmp_path / "seed.iso", public_key=KEY, hostname="l1", instance_id="iid-1")
    image = path.read_bytes()
    expected = {
        "meta-data": meta_data(hostname="l1", instance_id="iid-1").encode(),
        "user-data": user_data(public_key=KEY).encode(),
    }
    assert read_iso(image, joliet=True) == ("cidata", expected)
    # Without Joliet, Linux (map=normal) lower-cases the names and drops ".;1".
    volume_id, files = read_iso(image, joliet=False)
    assert volume_id == "cidata"
    assert {name.lower().removesuffix(".;1"): data for name, data in files.items()} == expected
    assert len(image) % 2048 == 0
    assert struct.unpack("<I", image[16 * 2048 + 80 : 16 * 2048 + 84])[0] * 2048 == len(image)


def test_files_larger_than_a_sector_and_empty_files() -> None:
    big = bytes(range(256)) * 40  # 10 KiB, spans 5 sectors
    image = iso9660("vol", {"b": big, "a": b""}, when=datetime(2024, 1, 2, tzinfo=timezone.utc))
    assert read_iso(image, joliet=True) == ("vol", {"a": b"", "b": big})


def test_too_many_files_for_one_directory_sector() -> None:
    with pytest.raises(ValueError, match="one-sector"):
        iso9660("vol", {f"file-{i:03}": b"" for i in range(100)})


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid (util-linux) is not installed")
def test_blkid_sees_an_iso9660_labelled_cidata(tmp_path: Path) -> None:
    path = write_nocloud_seed(tmp_path / "seed.iso", public_key=KEY, hostname="l1", instance_id="iid-1")
    # -p probes the file itself (no cache, no need for root).
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert (fields["TYPE"], fields["LABEL"]) == ("iso9660", "cidata")


@pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo (genisoimage) is not installed")
def test_isoinfo_lists_the_joliet_names(tmp_path: Path) -> None:
    path = write_nocloud_seed(tmp_path / "seed.iso", public_key=KEY, hostname="l1", instance_id="iid-1")
    listing = subprocess.run(["isoinfo", "-J", "-f", "-i", str(path)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["/meta-data", "/user-data"]
    data = subprocess.run(["isoinfo", "-J", "-x", "/user-data", "-i", str(path)], capture_output=True, check=True)
    assert data.stdout == user_data(public_key=KEY).encode()
