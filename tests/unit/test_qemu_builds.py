"""--nested-qemu: what counts as a QEMU of the user's, and which level gets which (fake binaries)."""

from __future__ import annotations

import platform
import shutil
import stat
from pathlib import Path

import pytest

from pytest_nestedkvm.base.errors import ConfigError
from pytest_nestedkvm.base.host import qemu_build
from pytest_nestedkvm.config.settings import Settings, missing_library

NAME = f"qemu-system-{platform.machine()}"


def fake(path: Path, version: str = "8.2.2", status: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\nexit {status}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_build_directory_gives_its_binary_and_its_firmware(tmp_path: Path) -> None:
    binary = fake(tmp_path / "build" / NAME)
    (tmp_path / "build" / "pc-bios").mkdir()
    build = qemu_build(tmp_path / "build")
    assert (build.binary, build.firmware, build.info.version) == (binary, tmp_path / "build" / "pc-bios", "8.2.2")
    assert qemu_build(binary).firmware == tmp_path / "build" / "pc-bios"  # the binary itself: the same tree


@pytest.mark.parametrize(("make", "why"), [
    (lambda p: p / "missing", "does not exist: pass a qemu-system binary or a QEMU build directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", f"is a directory without {NAME}: build QEMU there (make)"),
    (lambda p: (p / "plain").write_text("") or p / "plain", "is not executable: chmod +x it"),
    (lambda p: fake(p / "broken", status=1), "is not a QEMU that works here"),
    (lambda p: fake(p / "old", version="5.2.0"), "is QEMU 5.2.0; the plugin needs 6.0 or newer"),
])
def test_what_is_not_a_usable_qemu_says_why(tmp_path: Path, make: object, why: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        qemu_build(path)


def test_each_level_gets_its_entry_and_deeper_levels_the_last(tmp_path: Path) -> None:
    one, two = fake(tmp_path / "a" / NAME), fake(tmp_path / "b" / NAME)
    settings = Settings.from_sources({"qemu": f"{one},{two}", "levels": "3"}, env={})
    assert [str(settings.qemu_for(level)) for level in (1, 2, 3)] == [str(one), str(two), str(two)]
    assert settings.qemu_shares() == (two.parent,)  # only the QEMUs that run inside a guest are shared
    assert Settings.from_sources({}, env={}).qemu_for(2) is None  # L0's on PATH, at every level


def test_inside_an_l1_image_only_a_second_entry_replaces_the_images_own_qemu(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    one, two = fake(tmp_path / "a" / NAME), fake(tmp_path / "b" / NAME)
    (tmp_path / "a" / "pc-bios").mkdir()
    alone = Settings.from_sources({"qemu": str(one), "levels": "3", "l1_image": str(image)}, env={})
    assert [alone.qemu_for(level) for level in (2, 3)] == [None, None]  # L1's own build is not in the image
    assert alone.qemu_args_for(2) == ()  # nor its firmware
    both = Settings.from_sources({"qemu": f"{one},{two}", "levels": "3", "l1_image": str(image)}, env={})
    assert [str(both.qemu_for(level)) for level in (2, 3)] == [str(two), str(two)]  # run at that path in the image
    assert both.qemu_shares() == ()  # nothing of L0 is shared with an image


def test_a_build_trees_firmware_goes_to_its_own_level_only(tmp_path: Path) -> None:
    plain, built = fake(tmp_path / "plain" / NAME), fake(tmp_path / "tree" / NAME)
    (tmp_path / "tree" / "pc-bios").mkdir()
    settings = Settings.from_sources({"qemu": f"{plain},{built}", "levels": "2", "l2_qemu_args": "-s"}, env={})
    assert settings.qemu_args_for(1) == ()
    assert settings.qemu_args_for(2) == ("-L", str(tmp_path / "tree" / "pc-bios"), "-s")


def test_a_bad_entry_is_a_config_error_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--nested-qemu=.*: .*does not exist") as caught:
        Settings.from_sources({"qemu": str(tmp_path / "nope")}, env={})
    assert caught.value.option == "qemu"


def test_an_inner_qemu_whose_library_guests_cannot_see_is_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    inner = fake(tmp_path / "inner" / NAME)
    ldd = fake(tmp_path / "bin" / "ldd")
    ldd.write_text("#!/bin/sh\necho '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)'\n"
                   "echo '\tlibspice.so.1 => /opt/spice/lib/libspice.so.1 (0x2)'\n")
    monkeypatch.setenv("PATH", f"{ldd.parent}:/usr/bin:/bin")
    build = qemu_build(inner)
    assert missing_library(build, ()) == ("its library libspice.so.1 is /opt/spice/lib/libspice.so.1, which guests "
                                         "do not see: share its directory with --nested-share, or build QEMU "
                                         "against the system's libraries")
    with pytest.raises(ConfigError, match=r"runs inside L1 and deeper, but its library libspice\.so\.1"):
        Settings.from_sources({"qemu": str(inner), "levels": "2"}, env={})
    assert Settings.from_sources({"qemu": str(inner), "levels": "1"}, env={}).qemu_for(1) == build  # L1 only: on L0


def test_a_library_that_is_not_found_at_all_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ldd = fake(tmp_path / "bin" / "ldd")
    ldd.write_text("#!/bin/sh\necho '\tlibfdt.so.1 => not found'\n")
    monkeypatch.setenv("PATH", f"{ldd.parent}:/usr/bin:/bin")
    build = qemu_build(fake(tmp_path / NAME))
    assert missing_library(build, ()) == ("its library libfdt.so.1 is not found on this host either: install it "
                                         "or fix the build")


def test_the_real_qemu_needs_nothing_beyond_the_system_directories() -> None:
    real = shutil.which(NAME)
    if real is None:
        pytest.skip(f"{NAME} is not installed")
    assert missing_library(qemu_build(Path(real)), ()) is None
