"""The NoCloud seed: user-data content, and the ISO9660 image read back by independent readers."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_nestedkvm.boot.cloudinit import meta_data, user_data, write_nocloud_seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH5+J/NxwWP9zvdqhxRhJGAd/MQuk39PNCk0f3iyLblk me@host"
needs_isoinfo = pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo (genisoimage) is not installed")


def seed(tmp_path: Path) -> Path:
    return write_nocloud_seed(tmp_path / "seed.iso", public_key=KEY, hostname="l1", instance_id="iid-1")


def expected() -> dict[str, bytes]:
    return {
        "meta-data": meta_data(hostname="l1", instance_id="iid-1").encode(),
        "user-data": user_data(public_key=KEY).encode(),
    }


def isoinfo(path: Path, *args: str) -> bytes:
    return subprocess.run(["isoinfo", "-i", str(path), *args], capture_output=True, check=True).stdout


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


def test_seed_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "seed.iso").write_bytes(b"old")
    path = seed(tmp_path)
    image = path.read_bytes()
    assert len(image) % 2048 == 0 and image[16 * 2048 + 1 : 16 * 2048 + 6] == b"CD001"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    with pytest.raises(ValueError, match="public key"):
        write_nocloud_seed(tmp_path / "seed.iso", public_key="nope", hostname="l1", instance_id="iid-2")
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"] and path.read_bytes() == image


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid (util-linux) is not installed")
def test_blkid_sees_an_iso9660_labelled_cidata(tmp_path: Path) -> None:
    path = seed(tmp_path)
    # -p probes the file itself (no cache, no need for root).
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert (fields["TYPE"], fields["LABEL"]) == ("iso9660", "cidata")


@needs_isoinfo
def test_isoinfo_reads_the_label_cidata(tmp_path: Path) -> None:
    out = isoinfo(seed(tmp_path), "-d").decode()
    assert "Volume id: cidata\n" in out
    assert "Joliet with UCS level 3 found" in out and "Rock Ridge signatures version 1 found" in out


@needs_isoinfo
@pytest.mark.parametrize(
    ("tree", "names"),
    [
        pytest.param(["-J"], {"meta-data": "/meta-data", "user-data": "/user-data"}, id="joliet"),
        pytest.param(["-R"], {"meta-data": "/meta-data", "user-data": "/user-data"}, id="rock-ridge"),
        pytest.param([], {"meta-data": "/META_DATA.;1", "user-data": "/USER_DATA.;1"}, id="iso9660"),
    ],
)
def test_isoinfo_reads_both_files_byte_exact(tmp_path: Path, tree: list[str], names: dict[str, str]) -> None:
    path = seed(tmp_path)
    assert isoinfo(path, *tree, "-f").decode().split() == sorted(names.values())
    assert {name: isoinfo(path, *tree, "-x", names[name]) for name in names} == expected()
