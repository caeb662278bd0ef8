"""The plugin as pytest sees it: options, ini keys, env vars, markers, header, skips.

Every inner run here either uses --nested-levels=0, only asks for `l0`, or is skipped before a
fixture is set up: no test in this file starts QEMU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from fakes import fake_qemu
from test_kvm_suite_options import kut_tree, selftests_tree, xtf_tree

from pytest_nestedkvm.base.host import QEMU_SANDBOX, probe, qemu_build
from pytest_nestedkvm.config.settings import OPTION_BY_NAME, OPTIONS, Option
from pytest_nestedkvm.suites import knownfail

BUILT = list(OPTIONS)

# --- helpers ------------------------------------------------------------------------

# An inner test that writes the session's Settings (repr of each field, and the sources
# mapping) where the outer test can read them.
DUMP_TEST = """
import json

from pytest_nestedkvm.fixtures import POOL_KEY


def test_dump(pytestconfig):
    settings = pytestconfig.stash[POOL_KEY].settings
    data = {name: repr(getattr(settings, name)) for name in settings.__dataclass_fields__ if name != "sources"}
    data["sources"] = dict(settings.sources)
    with open("settings.json", "w") as f:
        json.dump(data, f)
"""

SOURCE_LABEL: dict[str, Callable[[Option], str]] = {
    "cli": lambda o: "command line",
    "env": lambda o: f"env {o.env}",
    "ini": lambda o: f"ini {o.ini}",
}


def _hardware_kvm_loaded() -> bool:
    return any(Path("/sys/module", name).is_dir() for name in ("kvm_intel", "kvm_amd"))


def _kvm_can_run_ordinary_guest() -> bool:
    """Read independently of host.py: /dev/kvm opens read-write and belongs to kvm_intel/kvm_amd."""
    if not _hardware_kvm_loaded():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


ONLY_KVM_PVM = Path("/sys/module/kvm_pvm").is_dir() and not _hardware_kvm_loaded()


def _enable_is_harmless() -> bool:
    """--nested-enable reloads kvm_intel/kvm_amd when nesting is off; never do that from a test."""
    report = probe(accel="auto")
    return not (report.kvm_backend in ("kvm_intel", "kvm_amd") and report.nested is False)


@pytest.fixture(scope="session", autouse=True)
def _preload_lazily_imported_modules() -> None:
    # hypothesis' pytest plugin imports hypothesis at the end of every session, and pytester
    # drops modules first imported during an in-process run: each run would pay ~1.5 s for it.
    with contextlib.suppress(ImportError):
        importlib.import_module("hypothesis")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NESTEDKVM_"):
            monkeypatch.delenv(name)


def write_ini(pytester: pytest.Pytester, values: dict[str, str]) -> None:
    lines = ["[pytest]", *(f"{OPTION_BY_NAME[name].ini} = {value}" for name, value in values.items())]
    pytester.makefile(".ini", pytest="\n".join(lines) + "\n")


def cli_args(values: dict[str, str]) -> list[str]:
    args = []
    for name, value in values.items():
        option = OPTION_BY_NAME[name]
        args.append(option.cli if option.flag else f"{option.cli}={value}")
    return args


def run_dump(pytester: pytest.Pytester, *args: str) -> dict[str, Any]:
    pytester.makepyfile(test_dump=DUMP_TEST)
    result = pytester.runpytest(*args, "test_dump.py")  # by name: a suite option alone collects the suite only
    result.assert_outcomes(passed=1)
    data: dict[str, Any] = json.loads((pytester.path / "settings.json").read_text())
    return data


def header_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if line.startswith("nestedkvm: ")]


def usage_error_line(result: pytest.RunResult) -> str:
    """The single 'ERROR:' line of a usage error; fails unless the output is just that line."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, (result.ret, result.outlines, result.errlines)
    output = [line for line in result.outlines + result.errlines if line.strip()]
    assert "Traceback" not in "\n".join(output)
    assert len(output) == 1, output
    assert output[0].startswith("ERROR: "), output
    return output[0]


# --- values for every option --------------------------------------------------------


@dataclass(frozen=True)
class Case:
    raw: str
    expected: Any


# Three distinct valid raw values per option (for cli, env, ini) and the parsed value each gives.
# Callables get the pytester directory, for options that need an existing file or directory.
ValueTable = dict[str, tuple[Case, Case, Case]]


def make_values(base: Path) -> ValueTable:
    def kernel(name: str) -> Case:
        path = base / name
        path.write_bytes(b"\0" * 0x202 + b"HdrS")  # a bzImage setup header's magic
        return Case(str(path), path.resolve())

    def image(name: str) -> Case:
        path = base / name
        path.write_bytes(b"QFI\xfb" + b"\0" * 508)  # a qcow2 header's magic
        return Case(str(path), path.resolve())

    def known(name: str) -> Case:
        path = base / name
        path.write_text(f"kut:msr  fails in {name}\n")
        return Case(str(path), knownfail.load(path.resolve()))

    def kut(name: str) -> Case:
        return Case(str(kut_tree(base / name)), (base / name).resolve())

    def selftests(name: str) -> Case:
        return Case(str(selftests_tree(base / name)), (base / name).resolve())

    def xtf(name: str) -> Case:
        return Case(str(xtf_tree(base / name)), (base / name).resolve())

    def directory(name: str, create: bool = True) -> Case:
        path = base / name
        if create:
            path.mkdir()
        return Case(str(path), path.resolve())

    def qemu(name: str) -> Case:
        binary = base / name / f"qemu-system-{platform.machine()}"
        binary.parent.mkdir()
        binary.write_text("#!/bin/sh\necho 'QEMU emulator version 8.2.2'\n")
        binary.chmod(0o755)
        return Case(str(binary.parent), (qemu_build(binary.parent),))

    def xen(name: str) -> Case:
        path = base / name  # a multiboot header: magic, flags 0, checksum
        header = b"".join(n.to_bytes(4, "little") for n in (0x1BADB002, 0, 0xE4524FFE))
        path.write_bytes(b"\x7fELF" + bytes(12) + header)
        return Case(str(path), path.resolve())

    def share(name: str) -> Case:
        path = base / name
        path.mkdir(exist_ok=True)
        return Case(str(path), (path.resolve(),))

    return {
        "levels": (Case("3", 3), Case("2", 2), Case("0", 0)),
        # kvm is refused on hosts without a usable KVM, so the three values repeat: the
        # sources mapping tells which one won.
        "accel": (Case("tcg", "tcg"), Case("auto", "auto"), Case("TCG", "tcg")),
        "cpu": (Case("qemu64", "qemu64"), Case("max", "max"), Case(" kvm64 ", "kvm64")),
        "l2_cpu": (Case("qemu64,+svm", "qemu64,+svm"), Case("host", "host"), Case("max ", "max")),
        "qemu": (qemu("q-cli"), qemu("q-env"), qemu("q-ini")),
        "qemu_args": (Case("-device virtio-rng-pci", ("-device", "virtio-rng-pci")), Case("-s", ("-s",)),
                      Case("-append 'a b'", ("-append", "a b"))),
        "l2_qemu_args": (Case("-S", ("-S",)), Case("-m 100", ("-m", "100")), Case("'-x y'", ("-x y",))),
        "kernel": (kernel("k-cli"), kernel("k-env"), kernel("k-ini")),
        "modules": (directory("m-cli"), directory("m-env"), directory("m-ini")),
        "l1_image": (image("i-cli.qcow2"), image("i-env.qcow2"), image("i-ini.qcow2")),
        "l2_image": (image("j-cli.qcow2"), image("j-env.qcow2"), image("j-ini.qcow2")),
        "login": (Case("tester:tester", ("tester", "tester")), Case("root:", ("root", "")),
                  Case("a:b:c", ("a", "b:c"))),
        "append": (Case("console=ttyS0", "console=ttyS0"), Case("quiet", "quiet"), Case("loglevel=7", "loglevel=7")),
        "memory": (Case("1024", (1024,)), Case("512,256", (512, 256)), Case("300", (300,))),
        "smp": (Case("4", (4,)), Case("2,1", (2, 1)), Case("3", (3,))),
        "boot_timeout": (Case("30", 30.0), Case("45.5", 45.5), Case("60", 60.0)),
        "command_timeout": (Case("10", 10.0), Case("20", 20.0), Case("7.5", 7.5)),
        "artifacts": (directory("a-cli", False), directory("a-env", False), directory("a-ini", False)),
        # Not the pytester directory itself: it is the inner run's $HOME, which no share may be.
        "share": (share("s-cli"), Case(f"{share('s-env').raw},{base}/s-env", ((base / "s-env").resolve(),) * 2),
                  Case(f" {share('s-ini').raw} ,", ((base / "s-ini").resolve(),))),
        "console_limit": (Case("1", 1), Case("64", 64), Case("1024", 1024)),
        "output_limit": (Case("1", 1), Case("64", 64), Case("2048", 2048)),
        # Shares that hold the inner test_dump.py::test_dump (crc32 % N + 1), so it still runs.
        "shard": (Case("1/1", (1, 1)), Case("2/2", (2, 2)), Case(" 604/1000 ", (604, 1000))),
        # CLI: the switch itself; env/ini: "0" on the losing side of the precedence checks.
        "enable": (Case("", True), Case("yes", True), Case("on", True)),
        "kut": (kut("kut-cli"), kut("kut-env"), kut("kut-ini")),
        "kut_level": (Case("2", 2), Case("1", 1), Case(" 2 ", 2)),
        "kselftests": (selftests("ksft-cli"), selftests("ksft-env"), selftests("ksft-ini")),
        "kselftests_level": (Case("1", 1), Case("2", 2), Case("1", 1)),
        "known_failures": (known("kf-cli"), known("kf-env"), known("kf-ini")),
        "emulator_reruns": (Case("0", 0), Case("2", 2), Case(" 10 ", 10)),
        "hypervisor": (Case("xen", "xen"), Case("kvm", "kvm"), Case(" XEN ", "xen")),
        "xen": (xen("xen-cli"), xen("xen-env.gz"), xen("xen-ini")),
        "xtf": (xtf("xtf-cli"), xtf("xtf-env"), xtf("xtf-ini")),
    }


# The suite options put guest tests of their own beside test_dump.py: they need guests up to
# their level (2 at most here), and -k keeps them out of the run.
SUITE_OPTIONS = ("kut", "kut_level", "kselftests", "kselftests_level", "known_failures", "xtf")


def levels_args(name: str) -> list[str]:
    if name == "levels":
        return []
    return ["--nested-levels=2", "-k", "dump"] if name in SUITE_OPTIONS else ["--nested-levels=0"]


def companion_args(name: str, base: Path) -> list[str]:
    """What an option needs beside it to be accepted: --nested-login only goes with an L1 disk image,
    --nested-modules with a --nested-kernel, known failures with a suite, --nested-xen with Xen as the hypervisor."""
    if name in ("kut_level", "known_failures"):
        return [f"--nested-kut={kut_tree(base / 'companion-kut')}"]
    if name == "modules":
        kernel = base / "companion-vmlinuz"
        kernel.write_bytes(b"\0" * 0x202 + b"HdrS")
        return [f"--nested-kernel={kernel}"]
    if name == "kselftests_level":
        return [f"--nested-kselftests={selftests_tree(base / 'companion-ksft')}"]
    if name in ("xen", "xtf"):
        return ["--nested-hypervisor=xen"]
    if name != "login":
        return []
    image = base / "login-l1.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 508)
    return [f"--nested-l1-image={image}"]


def option_params() -> Iterator[Any]:
    for option in BUILT:
        marks = []
        if option.name == "enable":
            marks.append(pytest.mark.skipif(not _enable_is_harmless(), reason="would reload kvm_intel/kvm_amd"))
        yield pytest.param(option.name, id=option.name, marks=marks)


def test_value_table_covers_every_option(tmp_path: Path) -> None:
    assert set(make_values(tmp_path)) == {o.name for o in BUILT}


# --- --help -------------------------------------------------------------------------


def test_help_lists_every_option_with_ini_key_and_env_var(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    lines = result.outlines
    start = lines.index("nested KVM guests (pytest-nestedkvm):")
    group: list[str] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        group.append(line)
    # One entry per option: the line that names the flag and its wrapped continuation lines.
    entries: dict[str, str] = {}
    current = None
    for line in group:
        if line.startswith("  --"):
            current = line.split()[0].split("=")[0]
            entries[current] = ""
        assert current is not None, group
        entries[current] += " " + line.strip()
    assert list(entries) == [o.cli for o in OPTIONS]
    for option in OPTIONS:
        text = " ".join(entries[option.cli].split())
        head = option.cli if option.flag else f"{option.cli}={option.metavar}"
        assert text.split()[0] == head, text
        assert text.endswith(f"[ini {option.ini}, env {option.env}]"), text
    # And each ini key in pytest's own list of ini options.
    for option in OPTIONS:
        assert any(re.match(rf"  {option.ini} \(string\):", line) for line in lines), option.ini


# --- each option from each source, and precedence --------------------------------------


@pytest.mark.parametrize("source", ["cli", "env", "ini"])
@pytest.mark.parametrize("name", list(option_params()))
def test_option_is_honoured_from_each_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str, source: str
) -> None:
    option = OPTION_BY_NAME[name]
    case = make_values(pytester.path)[name][("cli", "env", "ini").index(source)]
    args = levels_args(name) + companion_args(name, pytester.path)
    if source == "cli":
        args += cli_args({name: case.raw})
    elif source == "env":
        monkeypatch.setenv(option.env, case.raw)
    else:
        write_ini(pytester, {name: case.raw})
    data = run_dump(pytester, *args)
    assert data[name] == repr(case.expected)
    assert data["sources"][name] == SOURCE_LABEL[source](option)


def test_defaults_when_nothing_is_set(pytester: pytest.Pytester) -> None:
    data = run_dump(pytester)
    assert data["sources"] == {}
    assert data["levels"] == "1"
    assert data["accel"] == "'auto'"
    assert data["enable"] == "False"


@pytest.mark.parametrize("name", list(option_params()))
def test_cli_beats_env_beats_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    option = OPTION_BY_NAME[name]
    cli, env, ini = make_values(pytester.path)[name]
    if option.flag:  # a switch can only say "on": put "off" in the sources it must beat
        env, ini = Case("0", False), Case("0", False)
    base = levels_args(name) + companion_args(name, pytester.path)
    write_ini(pytester, {name: ini.raw})
    monkeypatch.setenv(option.env, env.raw)

    data = run_dump(pytester, *base, *cli_args({name: cli.raw}))
    assert (data[name], data["sources"][name]) == (repr(cli.expected), "command line")

    if option.flag:  # env "off" must beat ini "on"
        env, ini = Case("0", False), Case("1", True)
        write_ini(pytester, {name: ini.raw})
        monkeypatch.setenv(option.env, env.raw)
    data = run_dump(pytester, *base)
    assert (data[name], data["sources"][name]) == (repr(env.expected), f"env {option.env}")


def test_empty_env_var_falls_back_to_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ini(pytester, {"levels": "2"})
    monkeypatch.setenv("NESTEDKVM_LEVELS", "")
    data = run_dump(pytester)
    assert (data["levels"], data["sources"]["levels"]) == ("2", "ini nested_levels")


def test_ini_keys_from_pyproject_toml(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        nested_levels = 0
        nested_memory = "512,256"
        nested_cpu = "qemu64"
        """
    )
    data = run_dump(pytester)
    assert (data["levels"], data["sources"]["levels"]) == ("0", "ini nested_levels")
    assert (data["memory"], data["sources"]["memory"]) == ("(512, 256)", "ini nested_memory")
    assert (data["cpu"], data["sources"]["cpu"]) == ("'qemu64'", "ini nested_cpu")


@pytest.mark.parametrize(
    ("source", "expected"),
    [("cli", 3), ("env", 2), ("ini", 0)],
)
def test_levels_line_in_header_follows_precedence(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, expected: int
) -> None:
    """CLI 3 > env 2 > ini 0, each layer removed in turn; seen through the report header."""
    pytester.makepyfile("def test_nothing(): pass")
    write_ini(pytester, {"levels": "0"})
    args = []
    if source in ("cli", "env"):
        monkeypatch.setenv("NESTEDKVM_LEVELS", "2")
    if source == "cli":
        args.append("--nested-levels=3")
    result = pytester.runpytest("-v", *args)
    result.assert_outcomes(passed=1)
    assert f"nestedkvm: levels {expected}" in header_lines(result)
    assert sum(line.startswith("nestedkvm: levels ") for line in header_lines(result)) == 1


# --- the report header -------------------------------------------------------------


def test_header_shows_plan_and_levels(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-v", "--nested-levels=0")
    lines = header_lines(result)
    accel = "kvm" if _kvm_can_run_ordinary_guest() else "tcg"
    cpu = "host" if accel == "kvm" else "max"
    assert any(line.startswith(f"nestedkvm: L1 accel={accel} cpu={cpu} ") for line in lines), lines
    assert lines[-1] == "nestedkvm: levels 0"


def test_header_follows_accel_and_cpu_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-v", "--nested-levels=2", "--nested-accel=tcg", "--nested-cpu=qemu64")
    lines = header_lines(result)
    assert any(line.startswith("nestedkvm: L1 accel=tcg cpu=qemu64 ") for line in lines), lines
    assert "nestedkvm: levels 2" in lines


def test_header_without_verbose_leaves_the_plan_for_the_first_guest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    assert header_lines(pytester.runpytest("--nested-levels=2")) == []


@pytest.mark.parametrize("args", [["--help"], ["--collect-only"], [], ["-p", "xdist", "-n", "1"]],
                         ids=["help", "collect-only", "no-guest-tests", "xdist"])
def test_a_session_without_guests_starts_no_process_and_writes_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]
) -> None:
    """No QEMU (not even `--version`), no run directory, no key until a test asks for a guest."""
    called = fake_qemu(monkeypatch, tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pytester.makepyfile("def test_nothing(): pass\ndef test_other(): pass")
    monkeypatch.setenv("TMPDIR", str(tmp))
    result = pytester.runpytest_subprocess("--nested-levels=2", *args)
    assert result.ret == pytest.ExitCode.OK, result.outlines
    assert not called.exists(), called.read_text()
    assert list(tmp.iterdir()) == []


def test_a_session_that_uses_the_host_report_runs_qemu_version_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    called = fake_qemu(monkeypatch, tmp_path)
    pytester.makepyfile("def test_a(l0): assert l0.qemu.version == '7.2.0'\ndef test_b(l0): pass")
    result = pytester.runpytest_subprocess("--nested-levels=0")
    result.assert_outcomes(passed=2)
    assert called.read_text() == f"-sandbox {QEMU_SANDBOX} --version\n"  # once: the version and seccomp with it


# --- bad input ----------------------------------------------------------------------


BAD_INPUTS = [
    pytest.param("levels", "-1", "cli", id="levels=-1"),
    pytest.param("levels", "abc", "cli", id="levels=abc"),
    pytest.param("levels", "9", "cli", id="levels=9"),
    pytest.param("levels", "abc", "env", id="levels=abc-env"),
    pytest.param("levels", "abc", "ini", id="levels=abc-ini"),
    pytest.param("accel", "bogus", "cli", id="accel=bogus"),
    pytest.param("accel", "bogus", "env", id="accel=bogus-env"),
    pytest.param("kernel", "/nonexistent", "cli", id="kernel=/nonexistent"),
    pytest.param("kernel", "/nonexistent", "ini", id="kernel=/nonexistent-ini"),
    pytest.param("memory", "100000000", "cli", id="memory>host"),
    pytest.param("memory", "100000000", "env", id="memory>host-env"),
    pytest.param("smp", "0", "cli", id="smp=0"),
    pytest.param("boot_timeout", "-5", "cli", id="boot-timeout=-5"),
    pytest.param("enable", "maybe", "env", id="enable=maybe-env"),
]


@pytest.mark.parametrize(("name", "value", "source"), BAD_INPUTS)
def test_bad_input_is_a_short_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str, value: str, source: str
) -> None:
    option = OPTION_BY_NAME[name]
    pytester.makepyfile("def test_nothing(): pass")
    args = []
    if source == "cli":
        args.append(f"{option.cli}={value}")
    elif source == "env":
        monkeypatch.setenv(option.env, value)
    else:
        write_ini(pytester, {name: value})
    line = usage_error_line(pytester.runpytest_subprocess(*args))
    assert option.cli in line
    assert value in line
    assert f"(from {SOURCE_LABEL[source](option)})" in line


@pytest.mark.skipif(not ONLY_KVM_PVM, reason="this host's /dev/kvm is not provided by kvm_pvm alone")
def test_accel_kvm_on_a_kvm_pvm_host_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    line = usage_error_line(pytester.runpytest_subprocess("--nested-accel=kvm"))
    assert "kvm_pvm" in line
    assert "--nested-accel" in line
    assert "kvm" in line
    assert "(from command line)" in line


def test_cpu_host_under_tcg_is_a_usage_error_naming_its_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU refuses -cpu host without KVM; the error says which setting asked for it."""
    pytester.makepyfile("def test_nothing(): pass")
    monkeypatch.setenv("NESTEDKVM_CPU", "host")
    line = usage_error_line(pytester.runpytest_subprocess("--nested-accel=tcg"))
    assert "--nested-cpu" in line
    assert "host" in line
    assert "(from env NESTEDKVM_CPU)" in line


def test_memory_error_names_the_host_ram(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    line = usage_error_line(pytester.runpytest_subprocess("--nested-memory=100000000"))
    assert re.search(r"the host has only \d+ MiB", line), line


# --- markers ------------------------------------------------------------------------


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    assert result.ret == 0
    result.stdout.re_match_lines([r"^@pytest\.mark\.nested\(level=N\): \S", r"^@pytest\.mark\.nested_fresh: \S"])


def test_strict_markers_accepts_the_plugin_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nested_fresh
        def test_fresh(l0):
            pass

        @pytest.mark.nested(level=1)
        def test_level(l0):
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "--nested-levels=0")
    result.assert_outcomes(passed=1, skipped=1)


def test_strict_markers_still_rejects_unknown_markers(pytester: pytest.Pytester) -> None:
    """Control for the test above: --strict-markers is in effect in these runs."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nestd(level=1)
        def test_typo():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "--nested-levels=0")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*'nestd' not found in `markers` configuration option*"])


# --- skips --------------------------------------------------------------------------


def assert_skipped_with(result: pytest.RunResult, reasons: list[str]) -> None:
    """`-rs` lines end with exactly these reasons, one skip each, in order."""
    lines = [line for line in result.outlines if line.startswith("SKIPPED ")]
    got = [re.sub(r"^SKIPPED \[1\] [^ ]+:\d+: ", "", line) for line in lines]
    assert got == reasons, lines


@pytest.mark.parametrize("marker", ["nested(level=3)", "nested(3)"])
def test_marker_deeper_than_levels_is_skipped_with_the_fix(pytester: pytest.Pytester, marker: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_deep():
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest("-rs", "--nested-levels=2")
    result.assert_outcomes(skipped=1)
    assert_skipped_with(result, ["needs L3, but this session provides up to L2 (run with --nested-levels=3)"])


def test_marker_within_levels_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nested(level=0)
        def test_host_only(l0):
            pass
        """
    )
    pytester.runpytest("-rs", "--nested-levels=0").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("test_body", "level"),
    [
        ("def test_needs_l1(l1):\n    raise AssertionError('must not run')\n", 1),
        ("def test_needs_l2(l2):\n    raise AssertionError('must not run')\n", 2),
        ("def test_needs_l2(nested_guest):\n    nested_guest(2)\n    raise AssertionError('must not run')\n", 2),
    ],
    ids=["l1-fixture", "l2-fixture", "nested_guest-factory"],
)
def test_guest_fixtures_under_levels_0_are_skipped_not_errored(
    pytester: pytest.Pytester, test_body: str, level: int
) -> None:
    pytester.makepyfile(test_body)
    result = pytester.runpytest("-rs", "--nested-levels=0")
    result.assert_outcomes(skipped=1)
    assert_skipped_with(
        result, [f"needs L{level}, but this session provides up to L0 (run with --nested-levels={level})"]
    )


@pytest.mark.parametrize(("options", "deeper", "reason"), [
    (("--nested-l2-image={image}",), 3, "L3 inside a --nested-l2-image is not supported yet: the plugin starts "
     "deeper levels inside its built-in guests and inside a --nested-l1-image only"),
], ids=["l2-image"])
def test_levels_inside_a_disk_image_are_skipped_with_the_reason(
    pytester: pytest.Pytester, options: tuple[str, ...], deeper: int, reason: str
) -> None:
    image = pytester.path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 508)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.nested(level={deeper})
        def test_deeper():
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest("-rs", "--nested-levels=3", *(option.format(image=image) for option in options))
    result.assert_outcomes(skipped=1)
    assert_skipped_with(result, [reason])


def test_l0_works_under_levels_0(pytester: pytest.Pytester) -> None:
    accel = "kvm" if _kvm_can_run_ordinary_guest() else "tcg"
    pytester.makepyfile(
        f"""
        from pytest_nestedkvm.fixtures import POOL_KEY
        from pytest_nestedkvm.base.host import HostReport

        def test_l0(l0, pytestconfig):
            assert isinstance(l0, HostReport)
            assert l0 is pytestconfig.stash[POOL_KEY].report
            assert l0.accel == {accel!r}
            assert l0.reasons
        """
    )
    pytester.runpytest("--nested-levels=0").assert_outcomes(passed=1)


@pytest.mark.skipif(not ONLY_KVM_PVM, reason="this host's /dev/kvm is not provided by kvm_pvm alone")
def test_l0_accel_is_tcg_on_a_kvm_pvm_host(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_l0(l0):
            assert (l0.accel, l0.kvm_backend, l0.kvm_usable) == ("tcg", "kvm_pvm", False)
        """
    )
    pytester.runpytest("--nested-levels=0").assert_outcomes(passed=1)


def test_settings_fields_match_options() -> None:
    """The dump above reads every Settings field named after an option."""
    from pytest_nestedkvm.config.settings import Settings

    derived = {"sources", "l1_smp_default"}  # where values came from; a default computed from the host
    assert {f.name for f in fields(Settings)} - derived == {o.name for o in OPTIONS}
