"""--nested-shard=I/N: each CI job runs a stable, disjoint share of the tests.

Only trivial inner tests that ask for no guest: no test in this file starts QEMU.
"""

from __future__ import annotations

import os
import re

import pytest

from pytest_nestedkvm.config.settings import OPTION_BY_NAME

SHARD = OPTION_BY_NAME["shard"]
FILES = {"test_alpha": range(0, 15), "test_beta": range(15, 30), "test_gamma": range(30, 40)}
ALL = {f"{name}.py::test_{i}" for name, numbers in FILES.items() for i in numbers}
PASSED = re.compile(r"(?:^|\s)PASSED (\S+::\S+)|^(\S+::\S+) PASSED")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NESTEDKVM_"):
            monkeypatch.delenv(name)


def write_tests(pytester: pytest.Pytester, *, reverse: bool = False) -> None:
    """40 trivial tests in three files; `reverse` writes each file's functions in the other order."""
    for name, numbers in FILES.items():
        order = reversed(numbers) if reverse else numbers
        pytester.makepyfile(**{name: "\n".join(f"def test_{i}(): pass" for i in order) + "\n"})


def passed(result: pytest.RunResult) -> set[str]:
    found = set()
    for line in result.outlines:
        match = PASSED.search(line)
        if match:
            found.add(match.group(1) or match.group(2))
    return found


def run_share(pytester: pytest.Pytester, *args: str, collected: int = 40) -> set[str]:
    """The tests that ran (all pass); checks that the summary counts the others as deselected."""
    result = pytester.runpytest("-v", *args)
    ran = passed(result)
    result.assert_outcomes(passed=len(ran), deselected=collected - len(ran))
    return ran


def test_the_shares_are_disjoint_and_together_are_every_test(pytester: pytest.Pytester) -> None:
    write_tests(pytester)
    assert run_share(pytester) == ALL  # without the option: everything, nothing deselected
    shares = [run_share(pytester, f"--nested-shard={i}/3") for i in (1, 2, 3)]
    assert all(shares), [len(s) for s in shares]  # 40 tests: no share of 3 is empty with this hash
    assert sum(len(s) for s in shares) == 40
    assert set().union(*shares) == ALL


def test_one_share_of_one_is_everything(pytester: pytest.Pytester) -> None:
    write_tests(pytester)
    result = pytester.runpytest("--nested-shard=1/1")
    result.assert_outcomes(passed=40)
    assert "deselected" not in result.outlines[-1]


def test_the_summary_reports_the_deselected_tests(pytester: pytest.Pytester) -> None:
    write_tests(pytester)
    share = run_share(pytester, "--nested-shard=2/3")
    result = pytester.runpytest("--nested-shard=2/3")
    result.stdout.fnmatch_lines([f"collected 40 items / {40 - len(share)} deselected / {len(share)} selected"])
    result.stdout.fnmatch_lines([f"* {len(share)} passed, {40 - len(share)} deselected in *"])


def test_the_share_is_the_same_on_every_run_and_in_any_collection_order(pytester: pytest.Pytester) -> None:
    write_tests(pytester)
    first = run_share(pytester, "--nested-shard=1/3")
    assert run_share(pytester, "--nested-shard=1/3") == first
    # The files named in the other order and each file's functions written the other way round.
    write_tests(pytester, reverse=True)
    assert run_share(pytester, "--nested-shard=1/3", *reversed([f"{name}.py" for name in FILES])) == first
    # Fewer tests collected (one file left out) leaves the others in the same share.
    assert run_share(pytester, "--nested-shard=1/3", "test_alpha.py", "test_beta.py", collected=30) == {
        nodeid for nodeid in first if not nodeid.startswith("test_gamma.py")}


def test_the_share_does_not_depend_on_the_python_hash_seed_nor_on_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each machine runs its own interpreter (another str hash seed) and xdist workers collect
    on their own: all of them pick the same tests."""
    write_tests(pytester)
    expected = run_share(pytester, "--nested-shard=3/3")
    for seed, extra in (("1", []), ("4242", ["-p", "xdist", "-n", "2"])):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        result = pytester.runpytest_subprocess("-v", "--nested-shard=3/3", *extra)
        assert result.ret == pytest.ExitCode.OK, result.outlines
        assert passed(result) == expected, (seed, extra)


def test_deselecting_composes_with_k_and_deselect(pytester: pytest.Pytester) -> None:
    """The share is taken of the whole collection, so -k and --deselect only narrow it; each
    dropped test is counted once."""
    write_tests(pytester)
    share = run_share(pytester, "--nested-shard=1/2")
    narrowed = run_share(pytester, "--nested-shard=1/2", "-k", "alpha or beta", "--deselect", "test_beta.py::test_20")
    assert narrowed == {n for n in share if not n.startswith("test_gamma.py") and n != "test_beta.py::test_20"}


def test_env_and_ini_set_the_share_and_the_command_line_wins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tests(pytester)
    shares = {i: run_share(pytester, f"--nested-shard={i}/3") for i in (1, 2, 3)}
    pytester.makeini("[pytest]\nnested_shard = 1/3\n")
    assert run_share(pytester) == shares[1]
    monkeypatch.setenv(SHARD.env, "2/3")
    assert run_share(pytester) == shares[2]
    assert run_share(pytester, "--nested-shard=3/3") == shares[3]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0/2", "I must be from 1 to N (2)"),
        ("3/2", "I must be from 1 to N (2)"),
        ("a/b", "expected I/N, share I of N (e.g. 2/3)"),
        ("1", "expected I/N, share I of N (e.g. 2/3)"),
        ("1/0", "N must be from 1 to 1000"),
        ("1/1001", "N must be from 1 to 1000"),
    ],
)
@pytest.mark.parametrize("source", ["cli", "env", "ini"])
def test_a_bad_share_is_a_usage_error_naming_the_option_and_its_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str, reason: str, source: str
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    args = []
    if source == "cli":
        args.append(f"--nested-shard={value}")
        origin = "command line"
    elif source == "env":
        monkeypatch.setenv(SHARD.env, value)
        origin = f"env {SHARD.env}"
    else:
        pytester.makeini(f"[pytest]\nnested_shard = {value}\n")
        origin = f"ini {SHARD.ini}"
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.outlines
    output = [line for line in result.outlines + result.errlines if line.strip()]
    assert output == [f"ERROR: --nested-shard={value!r} (from {origin}): {reason}"], output
