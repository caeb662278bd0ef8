"""The CI templates in example_suites/ci_templates/ parse, have the steps the README promises, and
spell only real options with valid values, so a copied template never stops at a usage error."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_nestedkvm.config.settings import OPTIONS, Settings

TEMPLATES = Path(__file__).parents[2] / "example_suites" / "ci_templates"
GITHUB = TEMPLATES / "github-actions.yml"
GITLAB = TEMPLATES / "gitlab-ci.yml"
UDEV_RULE = 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"'
PACKAGES = ("qemu-system-x86", "qemu-utils", "busybox-static", "openssh-server")


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a YAML mapping"
    return data


def pytest_command(lines: list[str]) -> str:
    """The one command line that runs the suite."""
    found = [line for line in lines if re.match(r"\s*(python -m )?pytest\s", line)]
    assert len(found) == 1, f"expected one pytest command, found {found}"
    return found[0]


def nested_args(command: str) -> dict[str, str]:
    """`--nested-<name>=<value>` words of a command line, by option name."""
    args: dict[str, str] = {}
    for word in shlex.split(command):
        if word.startswith("--nested-"):
            flag, eq, value = word.partition("=")
            option = next((o for o in OPTIONS if o.cli == flag), None)
            assert option is not None, f"{flag} is not an option of the plugin"
            assert eq or option.flag, f"{flag}: write it as {flag}=VALUE"
            args[option.name] = value if eq else "true"
    return args


def option_value(command: str, prefix: str) -> str:
    values = [word.removeprefix(prefix) for word in shlex.split(command) if word.startswith(prefix)]
    assert len(values) == 1, f"expected one {prefix}VALUE in {command!r}"
    return values[0]


# -- GitHub Actions --------------------------------------------------------------------------


def github_job() -> dict[str, Any]:
    jobs = load(GITHUB)["jobs"]
    ubuntu = [job for job in jobs.values() if str(job.get("runs-on", "")).startswith("ubuntu-")]
    assert len(ubuntu) == 1, "expected one job on a hosted Ubuntu runner (runs-on: ubuntu-*)"
    job: dict[str, Any] = ubuntu[0]
    return job


def step_index(steps: list[dict[str, Any]], pattern: str) -> int:
    found = [i for i, step in enumerate(steps) if re.search(pattern, str(step.get("run", "")))]
    assert len(found) == 1, f"expected one step running {pattern!r}, found {len(found)}"
    return found[0]


def test_github_workflow_has_triggers_and_an_ubuntu_job() -> None:
    workflow = load(GITHUB)
    # YAML 1.1 (PyYAML) reads the bare key `on` as True; GitHub reads it as "on".
    assert workflow.get("on", workflow.get(True)), "the workflow has no `on:` triggers"
    assert github_job()["steps"]


def test_github_workflow_makes_dev_kvm_usable_before_the_host_check_and_the_suite() -> None:
    steps = github_job()["steps"]
    udev = step_index(steps, "99-kvm4all.rules")
    script = steps[udev]["run"]
    assert UDEV_RULE in script and "/etc/udev/rules.d/99-kvm4all.rules" in script
    assert "udevadm control --reload-rules" in script and "udevadm trigger --name-match=kvm" in script
    check = step_index(steps, r"python -m pytest_nestedkvm check")
    suite = step_index(steps, r"pytest --nested-levels")
    assert udev < check < suite, "order: /dev/kvm fix, then the host check, then the suite"
    installs = " ".join(str(step.get("run", "")) for step in steps[:check])
    assert all(package in installs for package in PACKAGES) and "pip install pytest-nestedkvm" in installs


def test_github_workflow_shards_the_suite_over_a_matrix() -> None:
    job = github_job()
    shards = job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and len(shards) >= 2
    command = pytest_command([str(step.get("run", "")) for step in job["steps"]])
    assert f"--nested-shard=${{{{ matrix.shard }}}}/{len(shards)}" in command
    for shard in shards:
        settings = Settings.from_sources(nested_args(command.replace("${{ matrix.shard }}", str(shard))), env={})
        assert settings.shard == (shard, len(shards))


def test_github_workflow_keeps_the_junit_report_and_the_artifacts_of_failures() -> None:
    steps = github_job()["steps"]
    command = pytest_command([str(step.get("run", "")) for step in steps])
    uploads = [step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact@")]
    paths = {str(step["with"]["path"]).rstrip("/"): step.get("if", "") for step in uploads}
    assert paths.get(option_value(command, "--junitxml=")) in ("always()", "failure()")
    assert paths.get(option_value(command, "--nested-artifacts=")) == "failure()"
    names = [step["with"]["name"] for step in uploads]
    assert all("${{ matrix.shard }}" in name for name in names), "artifact names must differ per shard"


# -- GitLab CI -------------------------------------------------------------------------------


def gitlab_job() -> dict[str, Any]:
    jobs = [job for job in load(GITLAB).values() if isinstance(job, dict) and "script" in job]
    assert len(jobs) == 1, "expected one job with a script"
    job: dict[str, Any] = jobs[0]
    return job


def test_gitlab_job_checks_the_host_then_runs_the_suite() -> None:
    job = gitlab_job()
    script = [str(line) for line in job["script"]]
    check = next(i for i, line in enumerate(script) if "python -m pytest_nestedkvm check" in line)
    assert check < script.index(pytest_command(script)), "the host check comes first"
    installs = " ".join(str(line) for line in job.get("before_script", []))
    assert all(package in installs for package in (*PACKAGES, "linux-image-amd64"))
    assert "pip install pytest-nestedkvm" in installs


def test_gitlab_job_shards_the_suite_over_parallel_jobs() -> None:
    job = gitlab_job()
    total = job["parallel"]
    assert isinstance(total, int) and total >= 2
    command = pytest_command([str(line) for line in job["script"]])
    assert "--nested-shard=$CI_NODE_INDEX/$CI_NODE_TOTAL" in command
    for index in range(1, total + 1):
        given = command.replace("$CI_NODE_INDEX", str(index)).replace("$CI_NODE_TOTAL", str(total))
        assert Settings.from_sources(nested_args(given), env={}).shard == (index, total)


def test_gitlab_job_publishes_the_junit_report_and_keeps_the_artifacts_of_failures() -> None:
    job = gitlab_job()
    command = pytest_command([str(line) for line in job["script"]])
    artifacts = job["artifacts"]
    assert artifacts["when"] == "on_failure"  # reports are uploaded whatever `when` says
    assert artifacts["reports"]["junit"] == option_value(command, "--junitxml=")
    kept = [str(path).rstrip("/") for path in artifacts["paths"]]
    assert option_value(command, "--nested-artifacts=") in kept


# -- Both: in step with the options ----------------------------------------------------------


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_templates_spell_only_real_options(path: Path) -> None:
    text = path.read_text()
    flags = set(re.findall(r"--nested-[a-z0-9-]+", text))
    assert flags, f"{path.name} passes no --nested- option"
    assert flags <= {o.cli for o in OPTIONS}, f"{path.name}: not options: {flags - {o.cli for o in OPTIONS}}"
    env_vars = set(re.findall(r"\bNESTEDKVM_[A-Z0-9_]+", text))
    assert env_vars <= {o.env for o in OPTIONS}, f"{path.name}: not options: {env_vars - {o.env for o in OPTIONS}}"


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_templates_give_valid_values(path: Path) -> None:
    """Every `--nested-<name>=<value>` of the suite's command parses (shards substituted)."""
    if path == GITHUB:
        command = pytest_command([str(step.get("run", "")) for step in github_job()["steps"]])
    else:
        command = pytest_command([str(line) for line in gitlab_job()["script"]])
    given = re.sub(r"\$\{\{ matrix\.shard \}\}|\$CI_NODE_INDEX", "1", command).replace("$CI_NODE_TOTAL", "2")
    args = nested_args(given)
    assert {"levels", "artifacts", "shard"} <= set(args)
    settings = Settings.from_sources(args, env={})
    assert settings.levels == 2 and settings.artifacts is not None and settings.shard == (1, 2)
