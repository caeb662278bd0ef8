"""Unit tests for Settings: source precedence, per-option parsers and their error messages."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from pytest_nestedkvm.base.errors import ConfigError
from pytest_nestedkvm.boot import view
from pytest_nestedkvm.config.settings import MAX_LEVELS, OPTION_BY_NAME, OPTIONS, Option, Settings

# An empty environment: nothing from the real process environment leaks into a test.
NO_ENV: dict[str, str] = {}


def build(
    cli: dict[str, str | None] | None = None,
    env: dict[str, str] | None = None,
    ini: dict[str, str | None] | None = None,
    host_memory_mib: int | None = None,
) -> Settings:
    return Settings.from_sources(cli or {}, env if env is not None else NO_ENV, ini, host_memory_mib=host_memory_mib)


def config_error(
    cli: dict[str, str | None] | None = None,
    env: dict[str, str] | None = None,
    ini: dict[str, str | None] | None = None,
    host_memory_mib: int | None = None,
) -> str:
    with pytest.raises(ConfigError) as info:
        build(cli, env, ini, host_memory_mib)
    return str(info.value)


# -- Option naming ---------------------------------------------------------------------------


def test_option_names_for_a_simple_option() -> None:
    option = Option("levels", "help", parse=str.strip)
    assert option.cli == "--nested-levels"
    assert option.ini == "nested_levels"
    assert option.env == "NESTEDKVM_LEVELS"
    assert option.dest == "nested_levels"


def test_option_names_for_an_underscored_option() -> None:
    option = OPTION_BY_NAME["boot_timeout"]
    assert option.cli == "--nested-boot-timeout"
    assert option.ini == "nested_boot_timeout"
    assert option.env == "NESTEDKVM_BOOT_TIMEOUT"


def test_documented_options_are_all_declared() -> None:
    flags = {o.cli for o in OPTIONS}
    documented = {
        "--nested-levels", "--nested-accel", "--nested-cpu", "--nested-kernel", "--nested-append",
        "--nested-memory", "--nested-smp", "--nested-l1-image", "--nested-l2-image",
        "--nested-boot-timeout", "--nested-artifacts", "--nested-enable",
    }
    assert documented <= flags
    assert [o.name for o in OPTIONS if o.flag] == ["enable"]


# -- defaults and precedence -----------------------------------------------------------------


def test_defaults_when_nothing_is_set() -> None:
    settings = build()
    assert settings == Settings()
    assert settings.levels == 1
    assert settings.accel == "auto"
    assert settings.kernel is None
    assert settings.command_timeout is None  # the pool scales it with accelerator and depth
    assert settings.enable is False
    assert settings.describe_source("levels") == "default"


@pytest.mark.parametrize(
    ("name", "cli", "env", "ini", "attr", "expected"),
    [
        ("levels", "3", "2", "1", "levels", 3),
        ("accel", "tcg", "kvm", "auto", "accel", "tcg"),
        ("memory", "1024,512", "2048", "4096", "memory", (1024, 512)),
        ("smp", "4", "2", "1", "smp", (4,)),
        ("boot_timeout", "7.5", "30", "60", "boot_timeout", 7.5),
        ("cpu", "EPYC", "max", "host", "cpu", "EPYC"),
    ],
)
def test_command_line_beats_env_and_ini(
    name: str, cli: str, env: str, ini: str, attr: str, expected: object
) -> None:
    option = OPTION_BY_NAME[name]
    settings = build({name: cli}, {option.env: env}, {name: ini})
    assert getattr(settings, attr) == expected
    assert settings.describe_source(name) == "command line"


@pytest.mark.parametrize(
    ("name", "env", "ini", "attr", "expected"),
    [
        ("levels", "2", "1", "levels", 2),
        ("accel", "KVM", "tcg", "accel", "kvm"),
        ("memory", "1536", "4096", "memory", (1536,)),
        ("command_timeout", "5", "60", "command_timeout", 5.0),
        ("enable", "yes", "false", "enable", True),
    ],
)
def test_env_beats_ini(name: str, env: str, ini: str, attr: str, expected: object) -> None:
    option = OPTION_BY_NAME[name]
    settings = build({name: None}, {option.env: env}, {name: ini})
    assert getattr(settings, attr) == expected
    assert settings.describe_source(name) == f"env {option.env}"


@pytest.mark.parametrize(
    ("name", "ini", "attr", "expected"),
    [
        ("levels", "4", "levels", 4),
        ("accel", "tcg", "accel", "tcg"),
        ("smp", "2,1,1", "smp", (2, 1, 1)),
        ("append", "  quiet loglevel=3 ", "append", "quiet loglevel=3"),
        ("enable", "on", "enable", True),
    ],
)
def test_ini_beats_default(name: str, ini: str, attr: str, expected: object) -> None:
    settings = build({name: None}, {}, {name: ini})
    assert getattr(settings, attr) == expected
    assert settings.describe_source(name) == f"ini {OPTION_BY_NAME[name].ini}"


def test_empty_env_and_ini_values_count_as_unset() -> None:
    settings = build({"levels": None}, {"NESTEDKVM_LEVELS": ""}, {"levels": "", "accel": "tcg"})
    assert settings.levels == 1
    assert settings.describe_source("levels") == "default"
    assert settings.accel == "tcg"


def test_empty_env_falls_through_to_ini() -> None:
    settings = build({}, {"NESTEDKVM_LEVELS": ""}, {"levels": "3"})
    assert settings.levels == 3
    assert settings.describe_source("levels") == "ini nested_levels"


def test_each_option_picks_its_own_source() -> None:
    settings = build({"levels": "2"}, {"NESTEDKVM_ACCEL": "tcg"}, {"smp": "2,1", "levels": "4", "accel": "kvm"})
    assert (settings.levels, settings.accel, settings.smp) == (2, "tcg", (2, 1))
    assert settings.sources == {"levels": "command line", "accel": "env NESTEDKVM_ACCEL", "smp": "ini nested_smp"}


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NESTEDKVM_LEVELS", "3")
    settings = Settings.from_sources({}, None, {"levels": "1"})
    assert settings.levels == 3
    assert settings.describe_source("levels") == "env NESTEDKVM_LEVELS"


def test_cli_flag_enable() -> None:
    assert build({"enable": "1"}, {"NESTEDKVM_ENABLE": "0"}).enable is True
    assert build({}, {"NESTEDKVM_ENABLE": "off"}).enable is False


def test_file_and_directory_options_resolve(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS")  # a bzImage setup header's magic
    modules = tmp_path / "mods"
    modules.mkdir()
    settings = build({"kernel": str(kernel), "modules": str(modules)})
    assert settings.kernel == kernel.resolve()
    assert settings.modules == modules.resolve()


# -- rejections and their messages -----------------------------------------------------------


def test_a_kernel_with_an_l1_image_is_the_kernel_of_the_built_in_guest_inside_it(tmp_path: Path) -> None:
    kernel, image = tmp_path / "bzImage", tmp_path / "a.qcow2"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS")
    image.write_bytes(b"QFI\xfb\0\0\0\3" + b"\0" * 1000)
    settings = build({"kernel": str(kernel), "l1_image": str(image), "levels": "2"})
    assert (settings.kernel, list(settings.built_in_levels())) == (kernel.resolve(), [2])
    assert "boots its own kernel" in config_error({"kernel": str(kernel), "l1_image": str(image)})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("-1", "must be at least 0"),
        ("1.5", "whole number"),
        ("two", "whole number"),
        (str(MAX_LEVELS + 1), f"at most {MAX_LEVELS}"),
    ],
)
def test_levels_rejected_from_command_line(raw: str, reason: str) -> None:
    message = config_error({"levels": raw})
    assert "--nested-levels" in message
    assert repr(raw) in message
    assert "command line" in message
    assert reason in message


def test_levels_boundaries_accepted() -> None:
    assert build({"levels": "0"}).levels == 0
    assert build({"levels": str(MAX_LEVELS)}).levels == MAX_LEVELS
    assert build({"levels": " 2 "}).levels == 2


def test_levels_rejected_from_env_names_the_variable() -> None:
    message = config_error(env={"NESTEDKVM_LEVELS": "9"}, ini={"levels": "1"})
    assert "--nested-levels" in message
    assert "'9'" in message
    assert "env NESTEDKVM_LEVELS" in message


def test_levels_rejected_from_ini_names_the_key() -> None:
    message = config_error(ini={"levels": "-3"})
    assert "--nested-levels" in message
    assert "'-3'" in message
    assert "ini nested_levels" in message


def test_bad_cli_value_wins_over_good_env() -> None:
    message = config_error({"levels": "x"}, {"NESTEDKVM_LEVELS": "2"})
    assert "command line" in message
    assert "'x'" in message


@pytest.mark.parametrize("raw", ["bogus", "kvm,tcg", "hvf"])
def test_accel_rejected(raw: str) -> None:
    message = config_error(env={"NESTEDKVM_ACCEL": raw})
    assert "--nested-accel" in message
    assert repr(raw) in message
    assert "env NESTEDKVM_ACCEL" in message
    assert "auto, kvm, tcg" in message


@pytest.mark.parametrize("raw", ["2048,", ",1024", "2048,,512", ""])
def test_memory_list_with_empty_item_rejected(raw: str) -> None:
    message = config_error({"memory": raw})
    assert "--nested-memory" in message
    assert repr(raw) in message
    assert "command line" in message
    assert "one number per level" in message


@pytest.mark.parametrize("raw", ["1G", "2048,abc", "32"])
def test_memory_items_must_be_numbers_of_at_least_64(raw: str) -> None:
    message = config_error(ini={"memory": raw})
    assert "--nested-memory" in message
    assert repr(raw) in message
    assert "ini nested_memory" in message


def test_memory_list_with_spaces_parses() -> None:
    assert build({"memory": "2048, 1024 ,512"}).memory == (2048, 1024, 512)


def test_memory_larger_than_host_rejected() -> None:
    message = config_error(env={"NESTEDKVM_MEMORY": "8192,1024"}, host_memory_mib=4096)
    assert "--nested-memory" in message
    assert "8192" in message
    assert "4096" in message
    assert "env NESTEDKVM_MEMORY" in message


def test_memory_equal_to_host_accepted() -> None:
    assert build({"memory": "4096"}, host_memory_mib=4096).memory == (4096,)


def test_memory_not_checked_without_host_size() -> None:
    assert build({"memory": "999999"}).memory == (999999,)


@pytest.mark.parametrize("raw", ["1024,1024", "2048,1024,2048"])
def test_inner_level_memory_must_be_smaller_than_parent(raw: str) -> None:
    message = config_error(ini={"memory": raw}, host_memory_mib=65536)
    assert "--nested-memory" in message
    inner_level = 2 if raw == "1024,1024" else 3
    assert f"L{inner_level}" in message
    assert raw in message or raw.split(",")[inner_level - 1] in message
    # The message also says where the value came from, like every other ConfigError.
    assert "ini nested_memory" in message


def test_inner_level_memory_checked_without_host_size() -> None:
    # The parent/child rule does not depend on the host's memory size.
    message = config_error({"memory": "1024,2048"})
    assert "--nested-memory" in message
    assert "L2" in message
    assert "2048" in message


def test_inner_level_memory_smaller_accepted() -> None:
    assert build({"memory": "2048,1024,512"}, host_memory_mib=4096).memory == (2048, 1024, 512)


@pytest.mark.parametrize("name", ["boot_timeout", "command_timeout"])
@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan"])
def test_seconds_rejected(name: str, raw: str) -> None:
    option = OPTION_BY_NAME[name]
    message = config_error({name: raw})
    assert option.cli in message
    assert repr(raw) in message
    assert "command line" in message


def test_boot_timeout_zero_message() -> None:
    message = config_error(env={"NESTEDKVM_BOOT_TIMEOUT": "0"})
    assert message.startswith("--nested-boot-timeout='0' (from env NESTEDKVM_BOOT_TIMEOUT)")
    assert "must be from 1 to 86400 seconds" in message


def test_smp_zero_rejected() -> None:
    message = config_error({"smp": "2,0"})
    assert "--nested-smp" in message
    assert "'2,0'" in message


def test_kernel_missing_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kernel"
    message = config_error({"kernel": str(missing)})
    assert "--nested-kernel" in message
    assert repr(str(missing)) in message
    assert "command line" in message
    assert "does not exist" in message


def test_directory_that_is_not_a_built_kernel_tree_rejected(tmp_path: Path) -> None:
    message = config_error(ini={"kernel": str(tmp_path)})
    assert "--nested-kernel" in message
    assert repr(str(tmp_path)) in message
    assert "ini nested_kernel" in message
    assert "has no arch/x86/boot/bzImage: build it there with `make bzImage modules`" in message


def test_image_missing_rejected_from_env(tmp_path: Path) -> None:
    missing = str(tmp_path / "l2.qcow2")
    message = config_error(env={"NESTEDKVM_L2_IMAGE": missing})
    assert "--nested-l2-image" in message
    assert "env NESTEDKVM_L2_IMAGE" in message


def test_modules_must_be_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    message = config_error({"modules": str(afile)})
    assert "--nested-modules" in message
    assert "is not a directory" in message


@pytest.mark.parametrize("raw", ["maybe", "2"])
def test_enable_flag_rejects_non_boolean(raw: str) -> None:
    message = config_error(ini={"enable": raw})
    assert "--nested-enable" in message
    assert "ini nested_enable" in message


# -- per-level memory and smp ----------------------------------------------------------------


def test_memory_for_defaults_halve_with_depth() -> None:
    settings = Settings()
    assert [settings.memory_for(level) for level in (1, 2, 3, 4, 5)] == [2048, 1024, 512, 256, 128]


def test_smp_for_defaults() -> None:
    settings = Settings()
    assert [settings.smp_for(level) for level in (1, 2, 3, 4)] == [2, 1, 1, 1]
    assert [settings.smp_for(level, emulated=True) for level in (1, 2)] == [1, 1]


def test_memory_for_overrides_then_falls_back_to_defaults() -> None:
    settings = build({"memory": "3000,1500"})
    assert [settings.memory_for(level) for level in (1, 2, 3, 4)] == [3000, 1500, 512, 256]


def test_smp_for_overrides_then_falls_back_to_defaults() -> None:
    settings = build(env={"NESTEDKVM_SMP": "4,2"})
    assert [settings.smp_for(level) for level in (1, 2, 3)] == [4, 2, 1]


def test_cpu_for_l1_follows_the_host_plan_and_deeper_levels_take_host_or_l2_cpu() -> None:
    assert build().cpu_for(1, "max") == "max"
    assert build().cpu_for(2, "max") == "host"
    settings = build({"l2_cpu": "qemu64,+svm"})
    assert [settings.cpu_for(level, "max") for level in (1, 2, 3)] == ["max", "qemu64,+svm", "qemu64,+svm"]


def test_qemu_args_split_like_a_shell_per_level() -> None:
    settings = build({"qemu_args": "-device virtio-rng-pci -append 'a b'", "l2_qemu_args": "-S"})
    assert settings.qemu_args_for(1) == ("-device", "virtio-rng-pci", "-append", "a b")
    assert settings.qemu_args_for(2) == settings.qemu_args_for(3) == ("-S",)


def test_qemu_args_with_an_open_quote_rejected() -> None:
    message = config_error(env={"NESTEDKVM_QEMU_ARGS": "-device 'virtio-rng-pci"})
    assert message == ("--nested-qemu-args=\"-device 'virtio-rng-pci\" (from env NESTEDKVM_QEMU_ARGS): cannot split "
                       "into arguments (No closing quotation): check the quotes")


# -- disk images and the serial login ---------------------------------------------------------


def test_l1_image_accepts_qcow2_and_raw_disks_with_a_boot_sector(tmp_path: Path) -> None:
    qcow2, raw = tmp_path / "a.qcow2", tmp_path / "b.img"
    qcow2.write_bytes(b"QFI\xfb\0\0\0\3" + b"\0" * 1000)
    raw.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 512)
    assert build({"l1_image": str(qcow2)}).l1_image == qcow2.resolve()
    assert build({"l1_image": str(raw)}).l1_image == raw.resolve()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.write_bytes(b"#!/bin/sh\necho not a disk\n"), "is not a bootable disk image (neither qcow2 nor"),
        (lambda p: p.write_bytes(b"\0" * 4096), "is not a bootable disk image"),
    ],
    ids=["missing", "directory", "script", "zeros"],
)
def test_l1_image_rejections_say_what_is_wrong(tmp_path: Path, make: Any, reason: str) -> None:
    path = tmp_path / "l1.qcow2"
    make(path)
    message = config_error({"l1_image": str(path)})
    assert message.startswith(f"--nested-l1-image={str(path)!r} (from command line): ")
    assert reason in message


@pytest.mark.parametrize("raw", ["tester", ":secret", ""])
def test_login_needs_user_and_password(raw: str) -> None:
    message = config_error(env={"NESTEDKVM_LOGIN": raw} if raw else {}, ini={"login": raw or "x"})
    assert "--nested-login" in message and "expected USER:PASSWORD" in message


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"),
    [(2, None, 2), (2, "2", 1), (2, "4", 1), (16, "4", 2), (None, "2", 2), (8, "", 2)],
)
def test_l1_vcpus_by_default_do_not_oversubscribe_the_cores_of_xdist_workers(
    cpus: int | None, workers: str | None, expected: int
) -> None:
    env = {} if workers is None else {"PYTEST_XDIST_WORKER_COUNT": workers}
    settings = Settings.from_sources({}, env, host_cpus=cpus)
    assert settings.smp_for(1) == expected
    assert settings.smp_for(2) == 1
    assert Settings.from_sources({"smp": "2"}, env, host_cpus=cpus).smp_for(1) == 2  # an explicit value wins


# -- share ---------------------------------------------------------------------------------------


def test_share_defaults_to_nothing() -> None:
    assert build().share == ()


def test_share_accepts_existing_directories(tmp_path: Path) -> None:
    data, more = tmp_path / "data", tmp_path / "more"
    data.mkdir()
    more.mkdir()
    (tmp_path / "link").symlink_to(data)
    settings = Settings.from_sources({"share": f"{data}, {tmp_path / 'link'},,{more}"}, env={})
    assert settings.share == (data, data, more)  # resolved; empty items ignored
    assert build(env={"NESTEDKVM_SHARE": str(more)}).share == (more,)


def share_error(raw: str) -> str:
    message = config_error({"share": raw})
    assert message.startswith(f"--nested-share={raw!r} (from command line): "), message
    return message


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "is not a directory"),
        (lambda p: p.write_text("x"), "is not a directory"),
    ],
    ids=["missing", "file"],
)
def test_share_must_be_a_directory(tmp_path: Path, make: Any, reason: str) -> None:
    good = tmp_path / "good"
    good.mkdir()
    path = tmp_path / "shared"
    make(path)
    message = share_error(f"{good},{path}")
    assert f"{path} {reason}" in message


@pytest.mark.parametrize("name", ["with space", "with:colon", "with\ttab"])
def test_share_refuses_what_the_kernel_command_line_cannot_carry(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.mkdir()
    assert f"{path}: its path holds whitespace, '\"', ':' or ','" in share_error(str(path))


@pytest.mark.parametrize("path", ["/etc", "/", tempfile.gettempdir()])
def test_share_refuses_the_hosts_own_state(path: str) -> None:
    assert f"{path}: it is a secret location of this host" in share_error(path)


@pytest.mark.parametrize(("path", "secret"), [("/etc/ssl", "/etc"), ("/proc/self", "/proc"), ("/sys/kernel", "/sys")])
def test_share_refuses_what_lies_in_the_hosts_own_state(path: str, secret: str) -> None:
    expected = f": it holds or lies in {secret}, a secret location of this host: share another directory"
    assert expected in share_error(path)


def test_share_accepts_a_project_under_the_temp_dir(tmp_path: Path) -> None:
    # The temp dir (where tmp_path lies by default) is secret as a whole (run dirs, keys), but a
    # checkout inside it is fine.
    project = tmp_path / "project"
    project.mkdir()
    assert build({"share": str(project)}).share == (project,)


def test_share_refuses_a_home_holding_a_key_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "nk"
    (home / ".ssh").mkdir(parents=True)
    (home / "project").mkdir()
    monkeypatch.setattr(view, "people_homes", lambda: [home])
    assert f"{home}: it is a secret location of this host" in share_error(str(home))
    assert f"{home / '.ssh'}: it is a secret location of this host" in share_error(str(home / ".ssh"))
    assert build({"share": str(home / "project")}).share == (home / "project",)


# -- console_limit -------------------------------------------------------------------------------


def test_console_limit_defaults_to_64_mib_and_takes_whole_mib() -> None:
    assert build().console_limit == 64
    assert build({"console_limit": "512"}).console_limit == 512
    assert build(env={"NESTEDKVM_CONSOLE_LIMIT": "1"}).console_limit == 1


@pytest.mark.parametrize(("raw", "reason"),
                         [("0", "must be between 1 and 1048576"), ("1.5", "expected a whole number")])
def test_console_limit_refuses_what_is_not_a_positive_whole_number(raw: str, reason: str) -> None:
    assert reason in config_error({"console_limit": raw})


# -- loose ends: numbers in ASCII digits, a login's password never echoed, xdist's own variable ----


@pytest.mark.parametrize(("name", "raw"), [("levels", "٣"), ("memory", "١٠٢٤"), ("smp", "²"), ("shard", "1/٣"),
                                           ("boot_timeout", "٣٠"), ("command_timeout", "1_0"), ("levels", "1_0")])
def test_numbers_are_ascii_digits(name: str, raw: str) -> None:
    message = config_error({name: raw})
    assert message.startswith(f"--nested-{name.replace('_', '-')}={raw!r} (from command line): expected"), message


@pytest.mark.parametrize("raw", [" :secret-password", "secret-password"])
def test_a_malformed_login_never_shows_the_password(raw: str) -> None:
    message = config_error({}, env={"NESTEDKVM_LOGIN": raw})
    assert "secret-password" not in message
    assert message.startswith("--nested-login='<hidden: it may hold a password>' (from env NESTEDKVM_LOGIN): ")


@pytest.mark.parametrize(("raw", "smp"), [("garbage", 2), ("", 2), ("٢", 2), ("2", 1)])
def test_a_bad_xdist_worker_count_counts_as_one_worker(raw: str, smp: int) -> None:
    settings = Settings.from_sources({}, {"PYTEST_XDIST_WORKER_COUNT": raw}, host_cpus=2)
    assert settings.l1_smp_default == smp
