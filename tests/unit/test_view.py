"""Unit tests for view.py: what a built-in guest sees of its host, built on fake roots and fake /etc trees."""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_nestedkvm.base.errors import HostError
from pytest_nestedkvm.boot import view
from pytest_nestedkvm.boot.view import (
    HOME_SECRETS,
    Export,
    View,
    build_view,
    copy_etc,
    python_dirs,
    secret_inside,
    unshareable,
)

# -- build_view --------------------------------------------------------------------------------


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A merged-/usr host: /bin a link into /usr, /usr and /lib64 real directories, no /sbin, /lib..."""
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin").symlink_to("usr/bin")
    return root


@pytest.fixture
def etc_copy(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "etc"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def no_homes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's real homes play no part (their key stores are not inside tmp_path anyway)."""
    monkeypatch.setattr(view, "people_homes", lambda: [])


pytestmark = pytest.mark.usefixtures("no_homes")


def test_build_view_links_the_symlinks_and_exports_the_directories(fake_root: Path, etc_copy: Path) -> None:
    result = build_view(etc_copy, [], root=fake_root)
    assert result == View(
        exports=(Export(etc_copy, Path("/etc")), Export(fake_root / "usr", Path("/usr")),
                 Export(fake_root / "lib64", Path("/lib64"))),
        links=(("/bin", "usr/bin"), ("/var/run", "/run"), ("/var/lock", "/run/lock")),
    )


def test_inside_a_built_in_guest_build_view_exports_the_9p_mount_under_each_overlay(
        fake_root: Path, etc_copy: Path) -> None:
    lower_usr = fake_root / "run/nestedkvm/lower/usr"  # layout.LOWER_DIR, as the guest's init binds it
    lower_usr.mkdir(parents=True)
    result = build_view(etc_copy, [], root=fake_root)
    assert Export(lower_usr, Path("/usr")) in result.exports  # not the overlay: multidevs=forbid refuses its files
    assert Export(fake_root / "lib64", Path("/lib64")) in result.exports  # no overlay there: the directory itself


def test_build_view_exports_etc_from_the_copy_first(fake_root: Path, etc_copy: Path, tmp_path: Path) -> None:
    (fake_root / "etc").mkdir()  # the host's own /etc is never exported
    project = tmp_path / "project"
    project.mkdir()
    result = build_view(etc_copy, [project], root=fake_root)
    assert result.exports[0] == Export(etc_copy, Path("/etc"))
    assert [e for e in result.exports if e.target == Path("/etc")] == [Export(etc_copy, Path("/etc"))]
    assert all(e.source != fake_root / "etc" for e in result.exports)


def test_build_view_exports_shared_dirs_at_their_own_paths(fake_root: Path, etc_copy: Path, tmp_path: Path) -> None:
    project, cache = tmp_path / "project", tmp_path / "cache"
    project.mkdir()
    cache.mkdir()
    shared = build_view(etc_copy, [project, cache], root=fake_root).exports[3:]
    assert set(shared) == {Export(project, project), Export(cache, cache)}


def test_build_view_deduplicates_shared_dirs(fake_root: Path, etc_copy: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(project)
    shared = [project / "src" / "pkg", project, tmp_path / "alias", project / "src"]
    result = build_view(etc_copy, shared, root=fake_root)
    # Inside another shared dir (whatever the order), the same dir again, or a link to it: exported once.
    assert result.exports[3:] == (Export(project, project),)


def test_build_view_drops_shared_dirs_inside_system_dirs(fake_root: Path, etc_copy: Path) -> None:
    # /usr/lib (e.g. the Python of the distribution) is already there as part of /usr.
    assert Path("/usr/lib").is_dir()
    result = build_view(etc_copy, [Path("/usr/lib"), Path("/usr")], root=fake_root)
    assert [e.target for e in result.exports] == [Path("/etc"), Path("/usr"), Path("/lib64")]


def test_build_view_refuses_a_shared_dir_holding_a_secret(
    fake_root: Path, etc_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home" / "nk"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setattr(view, "people_homes", lambda: [home])
    with pytest.raises(HostError, match="but it is a secret location"):
        build_view(etc_copy, [home], root=fake_root)
    with pytest.raises(HostError, match=f"but it holds or lies in {re.escape(str(home))}, a secret location"):
        build_view(etc_copy, [tmp_path / "home"], root=fake_root)
    with pytest.raises(HostError, match=f"but it holds or lies in {re.escape(str(home / '.ssh'))}, a secret"):
        build_view(etc_copy, [], root=fake_root, project=home)  # the project may be a home, not hold its keys
    with pytest.raises(HostError, match="lies in"):  # inside the key store
        build_view(etc_copy, [home / ".ssh" / "keys"], root=fake_root)
    project = home / "project"  # below the home and beside .ssh: fine
    project.mkdir()
    assert Export(project, project) in build_view(etc_copy, [project], root=fake_root).exports


def test_build_view_refuses_a_path_the_command_line_cannot_carry(
    fake_root: Path, etc_copy: Path, tmp_path: Path,
) -> None:
    project = tmp_path / "my project"
    project.mkdir()
    with pytest.raises(HostError, match="its path holds whitespace"):
        build_view(etc_copy, [project], root=fake_root)


@pytest.mark.parametrize("secret", ["/", "/etc", tempfile.gettempdir()])
def test_build_view_refuses_the_hosts_own_state(fake_root: Path, etc_copy: Path, secret: str) -> None:
    with pytest.raises(HostError, match="would be shared with the guests"):
        build_view(etc_copy, [Path(secret)], root=fake_root)


def test_one_level_down_exports_each_mount_from_where_it_is_and_keeps_the_links() -> None:
    l1 = View(exports=(Export(Path("/run/user/0/nk/etc"), Path("/etc")), Export(Path("/usr"), Path("/usr")),
                       Export(Path("/srv/cache"), Path("/home/nk/.cache/nk"))),
              links=(("/bin", "usr/bin"), ("/lib64", "usr/lib64")))
    l2 = l1.one_level_down()
    assert l2 == View(exports=(Export(Path("/etc"), Path("/etc")), Export(Path("/usr"), Path("/usr")),
                               Export(Path("/home/nk/.cache/nk"), Path("/home/nk/.cache/nk"))),
                      links=l1.links)
    assert all(e.source == e.target for e in l2.exports)
    assert l2.one_level_down() == l2


def test_python_dirs_hold_the_running_environment() -> None:
    dirs = python_dirs()
    assert Path(sys.prefix) in dirs and Path(sys.base_prefix) in dirs
    assert any(Path(sys.executable).resolve().is_relative_to(d) for d in dirs)


# -- copy_etc ----------------------------------------------------------------------------------


def write(path: Path, mode: int, text: str = "x\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.fixture
def fake_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    write(etc / "hostname", 0o644, "host\n")
    write(etc / "passwd", 0o644, "root:x:0:0::/root:/bin/sh\n")
    write(etc / "group", 0o444)
    write(etc / "rc.local", 0o755, "#!/bin/sh\n")
    write(etc / "secret.conf", 0o600)
    write(etc / "sudoers.d" / "README", 0o640)
    write(etc / "shadow", 0o644)  # world-readable by mistake: still a secret
    write(etc / "shadow-", 0o644)
    write(etc / "gshadow", 0o644)
    write(etc / "ssh" / "ssh_host_ed25519_key", 0o644)
    write(etc / "ssh" / "ssh_host_ed25519_key.pub", 0o644)
    write(etc / "ssh" / "sshd_config", 0o644)
    write(etc / "ssl" / "certs" / "ca.pem", 0o644)
    write(etc / "ssl" / "private" / "server.key", 0o644)
    (etc / "ssl" / "private").chmod(0o710)
    write(etc / "closed" / "inside.conf", 0o644)
    (etc / "closed").chmod(0o700)
    (etc / "mtab").symlink_to("../proc/self/mounts")
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")
    (etc / "dangling").symlink_to("no-such-file")
    (etc / "alternatives-dir").symlink_to("ssl/certs")
    return etc


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_copy_etc_keeps_what_everyone_may_read_and_nothing_else(fake_etc: Path, tmp_path: Path) -> None:
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    assert copy == tmp_path / "copy"
    assert tree(copy) == {
        "hostname", "passwd", "group", "rc.local", "sudoers.d",  # the directory is open, its README is not
        "ssh", "ssh/ssh_host_ed25519_key.pub", "ssh/sshd_config",
        "ssl", "ssl/certs", "ssl/certs/ca.pem",
        "mtab", "localtime", "dangling", "alternatives-dir",
        "shadow",  # a blank one, written by copy_etc (see below)
        "machine-id",  # the guests' own
    }
    assert (copy / "hostname").read_text() == "host\n"
    assert (copy / "passwd").read_text() == (fake_etc / "passwd").read_text()


@pytest.mark.parametrize("name", ["secret.conf", "sudoers.d/README", "shadow-", "gshadow",
                                  "ssh/ssh_host_ed25519_key", "ssl/private", "ssl/private/server.key",
                                  "closed", "closed/inside.conf"])
def test_copy_etc_leaves_out_secrets_and_what_not_everyone_may_read(
    fake_etc: Path, tmp_path: Path, name: str
) -> None:
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    assert not os.path.lexists(copy / name)


def test_copy_etc_gives_the_guests_a_machine_id_of_their_own(fake_etc: Path, tmp_path: Path) -> None:
    write(fake_etc / "machine-id", 0o444, "0123456789abcdef0123456789abcdef\n")
    copied = (copy_etc(tmp_path / "copy", source=fake_etc) / "machine-id").read_text()
    assert re.fullmatch(r"[0-9a-f]{32}\n", copied) and copied != (fake_etc / "machine-id").read_text()


def test_copy_etc_writes_a_blank_shadow_for_every_user(fake_etc: Path, tmp_path: Path) -> None:
    # sshd treats an account without a shadow entry as locked: each gets "*" (no password login).
    (fake_etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\nnk:x:1000:1000::/home/nk:/bin/sh\n"
                                     "\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n")
    (fake_etc / "shadow").write_text("root:$6$salt$secrethash:19000:0:99999:7:::\n")
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    shadow = copy / "shadow"
    assert shadow.read_text() == ("root:*:19000:0:99999:7:::\nnk:*:19000:0:99999:7:::\n"
                                  "nobody:*:19000:0:99999:7:::\n")
    assert not shadow.is_symlink()
    assert stat.S_IMODE(shadow.stat().st_mode) == 0o640
    assert "secrethash" not in shadow.read_text()
    assert (fake_etc / "shadow").read_text() == "root:$6$salt$secrethash:19000:0:99999:7:::\n"  # untouched


def test_copy_etc_writes_no_shadow_without_a_passwd(fake_etc: Path, tmp_path: Path) -> None:
    (fake_etc / "passwd").unlink()
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    assert not os.path.lexists(copy / "shadow")


def test_copy_etc_never_writes_through_a_shadow_symlink(fake_etc: Path, tmp_path: Path) -> None:
    # /etc/shadow as a link (to where the host keeps its hashes): the copy must not follow it
    # when it writes the blank shadow, which would overwrite the host's real file.
    real = tmp_path / "elsewhere" / "shadow"
    write(real, 0o600, "root:$6$salt$secrethash:19000:0:99999:7:::\n")
    (fake_etc / "shadow").unlink()
    (fake_etc / "shadow").symlink_to(real)
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    assert real.read_text() == "root:$6$salt$secrethash:19000:0:99999:7:::\n"
    assert not (copy / "shadow").is_symlink()
    assert (copy / "shadow").read_text() == "root:*:19000:0:99999:7:::\n"


def test_copy_etc_modes(fake_etc: Path, tmp_path: Path) -> None:
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    assert stat.S_IMODE((copy / "hostname").stat().st_mode) == 0o644
    assert stat.S_IMODE((copy / "group").stat().st_mode) == 0o644
    assert stat.S_IMODE((copy / "rc.local").stat().st_mode) == 0o755
    for directory in (copy, copy / "ssl", copy / "ssl" / "certs"):
        assert stat.S_ISDIR(directory.lstat().st_mode)


def test_copy_etc_keeps_symlinks_as_symlinks(fake_etc: Path, tmp_path: Path) -> None:
    copy = copy_etc(tmp_path / "copy", source=fake_etc)
    for name, target in [("mtab", "../proc/self/mounts"), ("localtime", "/usr/share/zoneinfo/Etc/UTC"),
                         ("dangling", "no-such-file"), ("alternatives-dir", "ssl/certs")]:
        assert (copy / name).is_symlink(), name
        assert os.readlink(copy / name) == target
    assert not (copy / "dangling").exists()


def test_copy_etc_refuses_an_existing_target(fake_etc: Path, tmp_path: Path) -> None:
    (tmp_path / "copy").mkdir()
    with pytest.raises(FileExistsError):
        copy_etc(tmp_path / "copy", source=fake_etc)


# -- secret_inside -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/etc", tempfile.gettempdir()])
def test_the_hosts_own_state_is_secret(path: str) -> None:
    assert secret_inside(Path(path)) == Path(path)


def test_a_home_is_secret_as_a_whole_and_so_is_its_key_store(tmp_path: Path) -> None:
    home = tmp_path / "home" / "nk"
    (home / ".ssh").mkdir(parents=True)
    assert secret_inside(home, homes=[home]) == home
    assert secret_inside(tmp_path / "home", homes=[home]) == home  # it holds the home
    assert secret_inside(home / ".ssh", homes=[home]) == home / ".ssh"
    assert secret_inside(home / "project", homes=[home]) is None  # below the home, beside .ssh


def test_the_project_may_be_a_home_but_not_hold_its_key_store(tmp_path: Path) -> None:
    # pytester runs pytest with $HOME at its rootdir; a CI account runs it in its home.
    home = tmp_path / "ci"
    home.mkdir()
    assert secret_inside(home, homes=[home], project=True) is None
    (home / ".npmrc").write_text("//registry.npmjs.org/:_authToken=x\n")
    assert secret_inside(home, homes=[home], project=True) == home / ".npmrc"


@pytest.mark.parametrize("store", [".netrc", ".pypirc", ".docker", ".cargo/credentials.toml", ".config/gh",
                                   ".bash_history", ".kube"])
def test_the_usual_credential_files_are_key_stores(tmp_path: Path, store: str) -> None:
    home = tmp_path / "nk"
    (home / store).parent.mkdir(parents=True, exist_ok=True)
    (home / store).write_text("secret\n")
    assert secret_inside(home, homes=[home], project=True) == home / store


def test_a_home_anywhere_counts_when_home_points_at_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real lookup, not the fixture's empty list
    home = tmp_path / "var" / "lib" / "ci"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert home in view.people_homes()
    assert secret_inside(tmp_path / "var") == home
    assert secret_inside(home, project=True) == home / ".ssh"


def test_a_key_store_reached_through_a_symlink_is_found(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "nk", tmp_path / "keys"
    (elsewhere / "ssh").mkdir(parents=True)
    home.mkdir()
    (home / ".ssh").symlink_to(elsewhere / "ssh")
    assert secret_inside(elsewhere, homes=[home], project=True) == elsewhere / "ssh"


def test_every_run_directory_and_every_temp_dir_are_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "tmp"
    (temp / "nestedkvm-123-abc").mkdir(parents=True)
    monkeypatch.setattr(view, "TEMP_DIRS", (str(temp),))
    assert secret_inside(temp) == temp
    assert secret_inside(temp / "nestedkvm-123-abc" / "ssh") == temp / "nestedkvm-123-abc"
    assert secret_inside(temp / "project") is None
    assert secret_inside(Path("/tmp")) == Path("/tmp")  # whatever TMPDIR says


def test_a_project_reached_through_a_symlink_that_holds_the_temp_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = tmp_path / "project"
    (project / "tmp").mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "link-to-tmp"))
    (tmp_path / "link-to-tmp").symlink_to(project / "tmp")
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert secret_inside(project, project=True) == project / "tmp"


@pytest.mark.parametrize(("path", "secret"), [
    ("/proc/1", "/proc"), ("/run/user/0", "/run"), ("/etc/foo", "/etc"), ("/sys/fs/cgroup", "/sys"),
    ("/dev/shm", "/dev"), ("/boot/grub", "/boot"),
])
def test_what_lies_in_the_hosts_own_state_is_secret(path: str, secret: str) -> None:
    assert secret_inside(Path(path)) == Path(secret)


def test_what_lies_in_a_key_store_is_secret(tmp_path: Path) -> None:
    home = tmp_path / "home" / "nk"
    (home / ".ssh" / "keys").mkdir(parents=True)
    assert secret_inside(home / ".ssh" / "keys", homes=[home]) == home / ".ssh"
    assert secret_inside(home / ".config" / "gcloud" / "x", homes=[home]) == home / ".config" / "gcloud"


@pytest.mark.parametrize("path", [Path(tempfile.gettempdir()) / "project", Path("/root/.pyenv"),
                                  Path("/root/.pyenv/versions/3.12")])
def test_what_lies_in_a_container_or_beside_a_key_store_is_harmless(path: Path) -> None:
    # "/", the temp dir and the homes are secret as a whole, not what lies in them.
    assert secret_inside(path) is None


def test_a_directory_that_cannot_be_looked_into_may_hold_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another user's home (mode 0700): whether it holds .ssh cannot be told, so it counts as holding one.
    home = tmp_path / "home" / "other"
    home.mkdir(parents=True)
    monkeypatch.setattr(view, "people_homes", lambda: [home])
    assert secret_inside(home, project=True) is None  # readable, and no key store there
    exists = Path.exists

    def closed(self: Path) -> bool:
        if self.is_relative_to(home) and self != home:
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self)

    monkeypatch.setattr(Path, "exists", closed)
    assert secret_inside(home, project=True) in {home / name for name in HOME_SECRETS}
    assert secret_inside(tmp_path / "project") is None  # beside it: not looked into


def test_unshareable_says_why() -> None:
    assert unshareable(Path(tempfile.gettempdir()) / "project") is None
    assert unshareable(Path("/etc")) == "it is a secret location of this host"
    assert unshareable(Path("/etc/foo")) == "it holds or lies in /etc, a secret location of this host"
    assert unshareable(Path("/proc/1")) == "it holds or lies in /proc, a secret location of this host"


@pytest.mark.parametrize("name", ["with space", "with\ttab", "with:colon", "with,comma", "new\nline"])
def test_unshareable_refuses_what_the_kernel_command_line_cannot_carry(name: str) -> None:
    reason = unshareable(Path(tempfile.gettempdir()) / name)
    assert reason is not None and reason.startswith("its path holds whitespace, '\"', ':' or ','")


def test_a_project_dir_is_harmless(tmp_path: Path) -> None:
    home = tmp_path / "home" / "nk"
    (home / ".ssh").mkdir(parents=True)
    project = home / "src" / "project"
    (project / ".git").mkdir(parents=True)
    assert secret_inside(project, homes=[home]) is None
    assert secret_inside(project, homes=[home], project=True) is None


# -- filtered_etc: the copy, reused while /etc is unchanged ------------------------------------


def test_filtered_etc_is_the_filtered_copy_and_is_reused_while_nothing_changed(fake_etc: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = view.filtered_etc(cache, source=fake_etc)
    assert tree(first) == tree(copy_etc(tmp_path / "copy", source=fake_etc))
    marker = first / "hostname"
    inode = marker.stat().st_ino
    assert view.filtered_etc(cache, source=fake_etc) == first
    assert marker.stat().st_ino == inode  # not copied again
    assert [p.name for p in cache.iterdir()] == [first.name]  # no building directory left


@pytest.mark.parametrize("change", ["edit", "mode", "add", "remove", "relink"])
def test_filtered_etc_is_made_again_when_any_entry_changes(fake_etc: Path, tmp_path: Path, change: str) -> None:
    cache = tmp_path / "cache"
    first = view.filtered_etc(cache, source=fake_etc)
    if change == "edit":
        (fake_etc / "hostname").write_text("other\n")
        os.utime(fake_etc / "hostname", ns=(1, 1))  # even with an old mtime: the size changed
    elif change == "mode":
        (fake_etc / "hostname").chmod(0o600)
    elif change == "add":
        write(fake_etc / "new.conf", 0o644)
    elif change == "remove":
        (fake_etc / "group").unlink()
    else:
        (fake_etc / "localtime").unlink()
        (fake_etc / "localtime").symlink_to("/usr/share/zoneinfo/Europe/Berlin")
    second = view.filtered_etc(cache, source=fake_etc)
    assert second != first
    assert tree(second) == tree(copy_etc(tmp_path / "copy", source=fake_etc))


def test_only_what_is_named_like_a_run_directory_counts_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "tmp"
    for name in ("nestedkvm-123-abc_9", "nestedkvm-unprivileged-x1", "nestedkvm-cache"):
        (temp / name).mkdir(parents=True)
    monkeypatch.setattr(view, "TEMP_DIRS", (str(temp),))
    assert secret_inside(temp / "nestedkvm-123-abc_9") == temp / "nestedkvm-123-abc_9"
    assert secret_inside(temp / "nestedkvm-unprivileged-x1") is None  # a project that only looks alike
