"""What a guest can see of L0: only the allowlisted, read-only exports; no secret, no environment.

One inner pytest session (so that its environment carries a canary) boots L1 and L2; root in
each guest then looks for canaries the outer test planted on L0: directly, after mounting every
9p tag of its QEMU again, and after bind-mounting / elsewhere.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CANARY_VAR = "CANARY_SECRET_TOKEN"  # not NESTEDKVM_*: the plugin reads those as options

# Run in the guest as root: prints "LEAK <where>" for every canary it can read, and "SEEN <path>"
# for the control file that must be visible (proof that the looking works).
LOOK = r"""
token=$1; shift; control=$1; shift
hit() { grep -qs "$token" "$1" && echo "LEAK $1"; }
for f in "$@"; do hit "$f"; done
grep -qs "$token" /proc/1/environ && echo "LEAK guest environment"
mkdir -p /mnt/again /mnt/bound
for tag in $(cat /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null | tr '\0' ' '); do
  mkdir -p /mnt/again/$tag
  mount -t 9p -o trans=virtio,version=9p2000.L,ro "$tag" /mnt/again/$tag || continue
  for f in "$@"; do
    hit "/mnt/again/$tag$f"
    hit "/mnt/again/$tag/${f##*/}"
  done
  [ -e "/mnt/again/$tag/proc/self/environ" ] && echo "LEAK a host /proc in $tag"
done
mount --bind / /mnt/bound
for f in "$@"; do hit "/mnt/bound$f"; done
[ -e "$control" ] && echo "SEEN $control"
umount /mnt/bound; for d in /mnt/again/*; do umount "$d" 2>/dev/null; done
true
"""

INNER = """
import json, os, pathlib, pytest

PLANTED = json.loads(pathlib.Path("planted.json").read_text())


@pytest.mark.parametrize("level", [1, 2])
def test_nothing_planted_on_l0_is_readable(nested_guest, level):
    guest = nested_guest(level)
    out = guest.succeed(
        f"sh {PLANTED['script']} {PLANTED['token']} {PLANTED['control']} " + " ".join(PLANTED['files']),
        timeout=600,
    )
    leaks = [line for line in out.splitlines() if line.startswith("LEAK")]
    # Only the canary in the --nested-share directory is readable (proof that the looking works).
    assert leaks and all(PLANTED["shared_name"] in line for line in leaks), out
    assert f"SEEN {PLANTED['control']}" in out  # the project itself is shared, at its own path


def test_the_project_runs_its_own_script_in_place(l1):
    # The project lives under /tmp on L0, which guests cover with their own tmpfs: shared all the same.
    assert l1.succeed(f"sh {pathlib.Path.cwd()}/helper.sh") == "helper ran\\n"


def test_l2_sees_no_more_than_l1(l1, l2):
    def shared(guest):
        # each export: a 9p mount under an overlay (or a 9p mount alone, on a kernel without overlayfs)
        mounts = guest.succeed("grep -E ' (9p|overlay) ' /proc/mounts | cut -d' ' -f2").split()
        return set(mounts)
    assert shared(l2) <= shared(l1)
    assert "/etc" in shared(l2) and "/usr" in shared(l2)


def test_qemu_gets_no_host_environment(l1):
    environ = pathlib.Path(f"/proc/{l1.process.pid}/environ").read_bytes().split(b"\\0")
    assert not [v for v in environ if v.startswith(b"CANARY_SECRET_TOKEN=")]
    assert sorted(v.split(b"=")[0] for v in environ if v) == [b"LANG", b"PATH"]
    for arg in l1.qemu_argv:
        for part in arg.split(","):
            if part.startswith("path=") and "-fsdev" in l1.qemu_argv[l1.qemu_argv.index(arg) - 1]:
                assert part[5:] not in ("/", "/proc", "/tmp", "/root", "/home", "/run", "/sys")
"""


@pytest.fixture
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Canaries on L0 that no guest may read: in /root, a home outside the shares, a 0600 file
    in /etc, and L0's /tmp outside the project; and one in a directory shared with --nested-share,
    which must be found. Root only: they sit where a CI runner's secrets do."""
    if os.geteuid() != 0:
        pytest.skip("planting canaries in /root and /etc needs root")
    token = secrets.token_hex(16)
    home = Path("/home") / f"nestedkvm-canary-{token[:8]}"
    files = [Path("/root") / f".nestedkvm-canary-{token[:8]}", home / ".ssh" / "id_canary",
             Path("/etc") / f"nestedkvm-canary-{token[:8]}", tmp_path_factory.mktemp("outside") / "canary"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{token}\n")
        path.chmod(0o600 if path.parent == Path("/etc") else 0o644)
    shared = Path("/srv") / f"nestedkvm-shared-{token[:8]}"
    shared.mkdir()
    (shared / "shared-canary").write_text(f"{token}\n")
    try:
        yield {"token": token, "files": [str(f) for f in [*files, shared / "shared-canary"]],
               "shared_dir": str(shared), "shared_name": "shared-canary"}
    finally:
        for path in [*files, shared / "shared-canary"]:
            path.unlink(missing_ok=True)
        for directory in (home / ".ssh", home, shared):
            directory.rmdir()


@pytest.mark.nested(level=2)
def test_a_guest_sees_what_its_tests_need_and_nothing_else(
    pytester: pytest.Pytester, planted: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = pytester.path / "look.sh"
    script.write_text(LOOK)
    (pytester.path / "helper.sh").write_text("echo helper ran\n")
    control = pytester.path / "helper.sh"
    (pytester.path / "planted.json").write_text(json.dumps({**planted, "script": str(script),
                                                            "control": str(control)}))
    pytester.makepyfile(INNER)
    monkeypatch.setenv(CANARY_VAR, str(planted["token"]))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nested-levels=2",
                                           f"--nested-share={planted['shared_dir']}")
    result.assert_outcomes(passed=5)


UNPRIVILEGED = "nestedkvm-tester"


@pytest.fixture(scope="module")
def unprivileged_python() -> Iterator[Path]:
    """A user without privileges and its own venv of this project, on Debian's python3 (the
    project's own interpreter may live under /root, which that user cannot enter). An account
    made here is removed again, home included."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not Path("/usr/bin/python3").exists():
        pytest.skip("creating an unprivileged user needs root, useradd and /usr/bin/python3")
    made = subprocess.run(["id", UNPRIVILEGED], capture_output=True).returncode != 0
    if made:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", UNPRIVILEGED], check=True)
    try:
        yield _venv_of_the_project()
    finally:
        if made:
            subprocess.run(["userdel", "--remove", UNPRIVILEGED], capture_output=True, check=True)


def _venv_of_the_project() -> Path:
    home = Path(pwd.getpwnam(UNPRIVILEGED).pw_dir)
    source = home / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "pytest_nestedkvm"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    subprocess.run(["chown", "-R", UNPRIVILEGED, str(source)], check=True)
    venv = home / "venv"
    if not (venv / "bin" / "python").exists():
        as_user(["/usr/bin/python3", "-m", "venv", str(venv)], home)
    as_user([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             str(source)], home)
    return venv / "bin" / "python"


def as_user(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    home = pwd.getpwnam(UNPRIVILEGED).pw_dir
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "LANG": "C.UTF-8", **env}
    return subprocess.run(["runuser", "-u", UNPRIVILEGED, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in environment.items()), *argv],
                          cwd=cwd, capture_output=True, text=True, check=False, timeout=1800)


@pytest.mark.nested(level=2)
def test_an_unprivileged_users_guest_sees_no_more(planted: dict[str, object], unprivileged_python: Path) -> None:
    """The same checks for a session of a user without privileges, its project under /tmp."""
    project = Path(tempfile.mkdtemp(prefix="nestedkvm-unprivileged-"))
    try:
        (project / "look.sh").write_text(LOOK)
        (project / "helper.sh").write_text("echo helper ran\n")
        (project / "planted.json").write_text(json.dumps({**planted, "script": str(project / "look.sh"),
                                                         "control": str(project / "helper.sh")}))
        (project / "test_inner.py").write_text(textwrap.dedent(INNER))
        subprocess.run(["chown", "-R", UNPRIVILEGED, str(project)], check=True)
        result = as_user([str(unprivileged_python), "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          "--nested-levels=2", f"--nested-share={planted['shared_dir']}"],
                         project, **{CANARY_VAR: str(planted["token"])})
        assert "5 passed" in result.stdout, result.stdout + result.stderr
    finally:
        shutil.rmtree(project, ignore_errors=True)


MOUNTED_BELOW = """
import pytest

@pytest.mark.parametrize("level", [1, 2])
def test_a_filesystem_mounted_below_the_project_is_not_served(nested_guest, level):
    guest = nested_guest(level)
    project = {project!r}
    assert guest.succeed(f"cat {{project}}/beside.txt") == "served\\n"  # the looking works
    guest.fail(f"cat {{project}}/procfs/1/environ")
    guest.fail(f"cat {{project}}/procfs/self/status")
    assert guest.run(f"ls {{project}}/procfs").stdout == ""
"""


@pytest.mark.nested(level=2)
def test_a_procfs_mounted_below_the_project_stays_out_of_the_guests(pytester: pytest.Pytester) -> None:
    # What a chroot build (debootstrap) leaves below an exported directory while it runs.
    if os.geteuid() != 0:
        pytest.skip("mounting a procfs needs root")
    (pytester.path / "beside.txt").write_text("served\n")
    procfs = pytester.path / "procfs"
    procfs.mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(procfs)], check=True)
    try:
        assert (procfs / "1" / "status").exists()  # mounted for real on L0
        test_file = pytester.makepyfile(MOUNTED_BELOW.format(project=str(pytester.path)))
        result = pytester.runpytest_subprocess(test_file.name, "--ignore=procfs", "-p", "no:cacheprovider",
                                               "--nested-levels=2")
    finally:
        subprocess.run(["umount", str(procfs)], check=True)
    result.assert_outcomes(passed=2)


def test_an_unprivileged_user_with_a_home_outside_home_and_a_tmpdir_in_the_project(
    unprivileged_python: Path,
) -> None:
    """As a user without privileges whose $HOME is outside /home: sharing that home is refused,
    and so is a project that holds the temp directory (TMPDIR a symlink into it), where the run
    directory and its key would land in an export; each before any QEMU starts, in one line."""
    where = Path(tempfile.mkdtemp(prefix="nestedkvm-elsewhere-"))
    try:
        home, project = where / "home", where / "project"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_canary").write_text("secret\n")
        (project / "runs").mkdir(parents=True)
        (project / "tmp-link").symlink_to(project / "runs")
        (project / "test_inner.py").write_text("def test_l1(l1):\n    l1.succeed('true')\n")
        subprocess.run(["chown", "-R", UNPRIVILEGED, str(where)], check=True)
        where.chmod(0o755)
        pytest_argv = [str(unprivileged_python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nested-levels=1"]
        cases = [
            (as_user([*pytest_argv, f"--nested-share={home}"], project, HOME=str(home)),
             f"{home}: it is a secret location of this host"),
            (as_user(pytest_argv, project, HOME=str(home), TMPDIR=str(project / "tmp-link")),
             f"pytest's rootdir {project}: it holds or lies in {project / 'runs'}, a secret location of this host"),
        ]
        for result, message in cases:
            output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            assert result.returncode == 4, output
            assert len(output) == 1 and message in output[0], output
        assert list((project / "runs").iterdir()) == []  # no run directory was made
    finally:
        shutil.rmtree(where, ignore_errors=True)
