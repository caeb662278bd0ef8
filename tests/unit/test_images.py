"""The pure parts of the Debian test image recipe (tests/images.py): naming, mirror, MBR, dpkg check."""

from __future__ import annotations

import struct
from pathlib import Path

import images  # tests/images.py (pyproject: pythonpath)
import pytest


def test_image_is_named_by_the_recipe_in_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = images.image_path()
    assert path.parent == tmp_path / "pytest-nestedkvm" / "images"
    assert path.name.startswith("debian-12-") and path.suffix == ".qcow2"
    assert path == images.image_path()


def test_mbr_keeps_grub_boot_code_and_describes_one_bootable_linux_partition() -> None:
    boot_img = bytes(range(256)) * 2
    sector = images.mbr(boot_img, 2048, 4 * 1024 * 1024 - 2048)
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert sector[:0x5C] == boot_img[:0x5C]  # code before the patched fields is GRUB's
    assert struct.unpack("<Q", sector[0x5C:0x64])[0] == 1  # core.img at sector 1
    assert sector[0x66:0x68] == b"\x90\x90"
    assert sector[0x68:0x1B8] == boot_img[0x68:0x1B8]
    entry = sector[0x1BE:0x1CE]
    assert entry[0] == 0x80 and entry[4] == 0x83
    assert struct.unpack("<II", entry[8:16]) == (2048, 4 * 1024 * 1024 - 2048)
    assert sector[0x1CE:0x1FE] == bytes(48)


def test_chs_matches_fdisk_geometry_and_clamps() -> None:
    assert images.chs(2048) == bytes([32, 33, 0])  # cylinder 0, head 32, sector 33
    assert images.chs(10**9) == b"\xfe\xff\xff"


def test_a_package_debootstrap_left_unconfigured_fails_the_build(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: sudo\nStatus: install ok installed\n\n"
        "Package: cloud-init\nStatus: install ok unpacked\n\n"
        "Package: python3-oauthlib\nStatus: install ok half-configured\n"
    )
    with pytest.raises(RuntimeError, match=r"unconfigured: cloud-init, python3-oauthlib"):
        images.check_installed(tmp_path)


def test_mirror_comes_from_the_environment_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NESTEDKVM_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert images.debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_comes_from_the_first_deb822_stanza_for_bookworm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NESTEDKVM_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\n# a comment\nURIs: http://one.example/debian http://two.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (tmp_path / "sources.list").write_text("deb http://list.example/debian bookworm main\n")
    assert images.debian_mirror(tmp_path) == "http://one.example/debian"


def test_mirror_comes_from_a_one_line_sources_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NESTEDKVM_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://updates.example/debian bookworm-updates main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n"
    )
    assert images.debian_mirror(tmp_path) == "http://list.example/debian"


def test_no_mirror_anywhere_says_to_set_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NESTEDKVM_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text("deb http://old.example/debian bullseye main\n")
    with pytest.raises(images.ImageUnavailable, match="NESTEDKVM_DEBIAN_MIRROR"):
        images.debian_mirror(tmp_path)
