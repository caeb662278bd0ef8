"""--nested-kut, --nested-kselftests and --nested-known-failures without QEMU: bad input refused at
configure time in one line (test_bad_inputs.refused checks that no QEMU ran and nothing was written),
and collection: node ids, groups as markers under --strict-markers, -k, -m, known failures as xfail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import fake_qemu
from test_bad_inputs import refused  # the same one-line, nothing-started, nothing-written check

CFG = """\
[msr]
file = msr.flat

[vmx]
file = vmx.flat
qemu_params = -cpu max,+vmx
groups = vmx nested_exception

[tsx-ctrl]
file = tsx-ctrl.flat
groups = tsx-ctrl
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NESTEDKVM_"):
            monkeypatch.delenv(name)


def kut_tree(path: Path, *, cfg: str | None = CFG, flats: tuple[str, ...] = ("msr.flat", "vmx.flat"),
             configured: bool = True) -> Path:
    (path / "x86").mkdir(parents=True)
    if cfg is not None:
        (path / "x86" / "unittests.cfg").write_text(cfg)
    if configured:
        (path / "config.mak").write_text("ARCH=x86_64\nTEST_DIR=x86\nTEST_SUBDIR=x86\n")
    for flat in flats:
        (path / "x86" / flat).write_bytes(b"\0")
    return path


def selftests_tree(path: Path, programs: tuple[str, ...] = ("x86_64/vmx_tsc_adjust_test",)) -> Path:
    for name in programs:
        program = path / name
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_bytes(b"\x7fELF" + b"\0" * 12 + (2).to_bytes(2, "little") + b"\0" * 46)
        program.chmod(0o755)
    (path / "settings").parent.mkdir(parents=True, exist_ok=True)
    (path / "settings").write_text("timeout=120\n")
    return path


# --- bad input -----------------------------------------------------------------------------------


def test_kut_directory_that_is_no_kut_tree(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = kut_tree(tmp_path / "kut", cfg=None)
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kut={tree}")
    assert line == (f"ERROR: --nested-kut='{tree}' (from command line): {tree} is not a kvm-unit-tests tree "
                    "(no x86/unittests.cfg): pass the top directory of a kvm-unit-tests checkout")


def test_kut_tree_not_built(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tree = kut_tree(tmp_path / "kut", flats=())
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kut={tree}")
    assert line.endswith(f"{tree} is not built (no built x86/*.flat): run ./configure && make in it")


def test_kut_tree_not_configured(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tree = kut_tree(tmp_path / "kut", configured=False)
    monkeypatch.setenv("NESTEDKVM_KUT", str(tree))
    line = refused(pytester, monkeypatch, tmp_path)
    assert line.startswith(f"ERROR: --nested-kut='{tree}' (from env NESTEDKVM_KUT): ")
    assert line.endswith("(no config.mak): run ./configure && make in it")


def test_selftests_directory_without_binaries(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = tmp_path / "kvm"
    (tree / "x86_64").mkdir(parents=True)
    (tree / "x86_64" / "vmx_tsc_adjust_test.c").write_text("int main(void) { return 0; }\n")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kselftests={tree}")
    assert line == (f"ERROR: --nested-kselftests='{tree}' (from command line): {tree} holds no KVM selftest "
                    "binaries: run make in tools/testing/selftests/kvm (or pass an installed kselftest tree "
                    "that has kvm/)")


def test_suite_level_deeper_than_the_levels_set(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tree = kut_tree(tmp_path / "kut")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-kut={tree}", "--nested-kut-level=2",
                   "--nested-levels=1")
    assert line == ("ERROR: --nested-kut-level=2 (from command line) runs --nested-kut in L2, but --nested-levels=1 "
                    "(from command line) provides only up to L1: raise --nested-levels to 2 or lower "
                    "--nested-kut-level")


def test_known_failure_file_with_a_bad_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    known = tmp_path / "known.txt"
    known.write_text("# TCG\nkut:msr\n")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-known-failures={known}")
    assert line == (f"ERROR: --nested-known-failures='{known}' (from command line): {known}:2: kut:msr has no "
                    "reason: write why it fails after the name")


# --- collection ----------------------------------------------------------------------------------


def test_suites_collect_as_items_with_groups_as_markers(pytester: pytest.Pytester, tmp_path: Path) -> None:
    kut = kut_tree(tmp_path / "kut")
    kvm = selftests_tree(tmp_path / "kvm", ("x86_64/vmx_tsc_adjust_test", "demand_paging_test"))
    args = ["-p", "no:cacheprovider", "--strict-markers", f"--nested-kut={kut}", f"--nested-kselftests={kvm}",
            "--collect-only", "-q"]
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == 0, result.outlines
    assert result.outlines[:5] == ["kut::msr", "kut::vmx", "kut::tsx-ctrl", "kselftests::demand_paging_test",
                                   "kselftests::x86_64/vmx_tsc_adjust_test"]
    assert pytester.runpytest_subprocess(*args, "-m", "tsx-ctrl or nested_exception").outlines[:2] == [
        "kut::vmx", "kut::tsx-ctrl"]
    assert pytester.runpytest_subprocess(*args, "-m", "kselftests", "-k", "vmx").outlines[0] == (
        "kselftests::x86_64/vmx_tsc_adjust_test")


def test_kut_level_raises_the_default_levels(pytester: pytest.Pytester, tmp_path: Path) -> None:
    kut = kut_tree(tmp_path / "kut")
    pytester.makeconftest("""
def pytest_collection_finish(session):
    for item in session.items:
        print("LEVEL", item.nodeid, item.get_closest_marker("nested").kwargs["level"],
              session.config.stash[__import__("pytest_nestedkvm.session").session.SESSION_KEY].settings.levels)
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kut={kut}", "--nested-kut-level=2",
                                           "--collect-only", "-q", "-s", "-k", "msr")
    assert "LEVEL kut::msr 2 2" in result.outlines


def test_without_test_paths_only_the_suites_are_collected(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """In a kernel tree, pytest would import every *_test.py below the current directory."""
    kut = kut_tree(tmp_path / "kut")
    pytester.makepyfile(tools_test="raise SystemExit('imported a file of the tree')")
    pytester.makepyfile(test_mine="def test_mine(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kut={kut}", "--collect-only", "-q")
    assert result.outlines[:4] == ["kut::msr", "kut::vmx", "kut::tsx-ctrl", ""], result.outlines
    named = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kut={kut}", "--collect-only", "-q",
                                          "test_mine.py")
    assert named.outlines[:4] == ["test_mine.py::test_mine", "kut::msr", "kut::vmx", "kut::tsx-ctrl"]


def test_known_failures_are_xfail_markers_with_their_reason(pytester: pytest.Pytester, tmp_path: Path) -> None:
    kut = kut_tree(tmp_path / "kut")
    known = tmp_path / "known.txt"
    known.write_text("# this machine\nkut:vmx  no VMX under TCG\nkselftests:x86_64/amx_test  no AMX\n"
                     "kut:tsx-*  hangs: never ends here\n")
    pytester.makeconftest("""
def pytest_collection_finish(session):
    for item in session.items:
        mark = item.get_closest_marker("xfail")
        print("XFAIL", item.nodeid, mark.kwargs if mark else None)
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kut={kut}",
                                           f"--nested-known-failures={known}", "--collect-only", "-q", "-s")
    assert "XFAIL kut::msr None" in result.outlines
    assert ("XFAIL kut::vmx {'reason': 'known failure (known.txt:2): no VMX under TCG', 'strict': False, "
            "'raises': <class 'pytest_nestedkvm.suite_items.SuiteFailure'>, 'run': True}" in result.outlines)
    assert ("XFAIL kut::tsx-ctrl {'reason': 'known failure (known.txt:4): hangs: never ends here', 'strict': False, "
            "'raises': <class 'pytest_nestedkvm.suite_items.SuiteFailure'>, 'run': False}" in result.outlines)


def run_vmx_on_a_qemu_that_never_boots(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path, known_failures: str) -> pytest.RunResult:
    """kut::vmx with `known_failures`, where QEMU answers --version and then exits at once."""
    kut = kut_tree(tmp_path / "kut")
    known = tmp_path / "known.txt"
    known.write_text(known_failures)
    fake_qemu(monkeypatch, tmp_path)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--nested-kut={kut}", "-k", "vmx", "-rx",
                                         f"--nested-known-failures={known}", "--nested-emulator-reruns=0")


def test_a_known_failure_whose_guest_never_boots_is_an_error_not_an_xfail(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result = run_vmx_on_a_qemu_that_never_boots(pytester, monkeypatch, tmp_path, "kut:vmx  no VMX under TCG\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert "xfailed" not in outcomes and outcomes.get("errors", 0) + outcomes.get("failed", 0) == 1, outcomes


def test_a_known_failure_that_hangs_is_not_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not run at all: no guest can boot here, and the item still ends as its xfail."""
    result = run_vmx_on_a_qemu_that_never_boots(pytester, monkeypatch, tmp_path, "kut:v*  hangs: spins forever here\n")
    assert result.ret == pytest.ExitCode.OK
    assert result.parseoutcomes() == {"xfailed": 1, "deselected": 2}
    result.stdout.fnmatch_lines(
        ["XFAIL at setup of kut::vmx - [[]NOTRUN] known failure (known.txt:1): hangs: spins forever here"])


# --- XTF -----------------------------------------------------------------------------------------


def xtf_tree(path: Path, tests: dict[str, tuple[str, list[str], list[str]]] | None = None,
             built: bool = True) -> Path:
    """A built XTF tree: its runner, and per test an info.json, binaries and xl configs."""
    tests = tests if tests is not None else {"example": ("special", ["pv64", "hvm64"], []),
                                             "nested-svm": ("in-development", ["hvm64"], []),
                                             "invlpg": ("functional", ["hvm64"], ["hap", "shadow"])}
    path.mkdir(parents=True)
    (path / "xtf-runner").write_text("#!/usr/bin/env python3\n")
    for name, (category, envs, variations) in tests.items():
        test = path / "tests" / name
        test.mkdir(parents=True)
        (test / "info.json").write_text(json.dumps(
            {"name": name, "category": category, "environments": envs, "variations": variations}))
        for env in envs if built else ():
            (test / f"test-{env}-{name}").write_bytes(b"\0")
            for variation in variations or [None]:
                (test / f"test-{env}-{name}{'~' + variation if variation else ''}.cfg").write_text("")
    return path


def test_xtf_instances_collect_as_items_with_categories_as_markers(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = xtf_tree(tmp_path / "xtf")
    args = ["-p", "no:cacheprovider", "--strict-markers", "--nested-hypervisor=xen", f"--nested-xtf={tree}",
            "--collect-only", "-q"]
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == 0, result.outlines
    assert result.outlines[:6] == ["xtf::test-pv64-example", "xtf::test-hvm64-example", "xtf::test-hvm64-invlpg~hap",
                                   "xtf::test-hvm64-invlpg~shadow", "xtf::test-hvm64-nested-svm", ""]
    assert pytester.runpytest_subprocess(*args, "-m", "xtf_in_development").outlines[0] == "xtf::test-hvm64-nested-svm"
    assert pytester.runpytest_subprocess(*args, "-k", "pv64").outlines[:2] == ["xtf::test-pv64-example", ""]


def test_xtf_without_a_xen_l1(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tree = xtf_tree(tmp_path / "xtf")
    line = refused(pytester, monkeypatch, tmp_path, f"--nested-xtf={tree}")
    assert line == (f"ERROR: --nested-xtf={tree} (from command line): XTF's tests are domUs of a Xen L1: "
                    "pass --nested-hypervisor=xen too, or drop --nested-xtf")


@pytest.mark.parametrize(("built", "runner", "words"), [
    (True, False, "is not an XTF tree (no xtf-runner, no tests/*/info.json): point it at the top of a "
                  "xen-test-framework checkout"),
    (False, True, "has no built XTF test: run `make xtfdir="),
], ids=["no-tree", "not-built"])
def test_xtf_directory_that_is_no_built_xtf_tree(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, built: bool, runner: bool, words: str,
) -> None:
    tree = xtf_tree(tmp_path / "xtf", built=built)
    if not runner:
        (tree / "xtf-runner").unlink()
    line = refused(pytester, monkeypatch, tmp_path, "--nested-hypervisor=xen", f"--nested-xtf={tree}")
    assert line.startswith(f"ERROR: --nested-xtf='{tree}' (from command line): {tree} ") and words in line
