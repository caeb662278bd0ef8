"""What a guest may see of its host: an allowlist of read-only directories, filtered on the host.

Each directory reaches the guest as its own read-only 9p export, mounted at the same path on
an otherwise empty root: the system directories, a copy of /etc without its secrets, the
plugin's cache, the project under test, the Python environment, and what the user shares.
Nothing else of the host is exported, so root in the guest cannot reach it by mounting the
9p tags again or by bind-mounting / elsewhere. (Several exports rather than one export of a
directory assembled with bind mounts: that needs a mount namespace, so root or user
namespaces, and a user namespace shows root's files as nobody's to the guest.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import HostError
from .layout import HOSTED_BOOT, HOSTED_ETC, LOWER_DIR, SYSTEM_DIRS

# Links every root has, whatever the host's: daemons (libvirtd, ...) keep their sockets and locks there.
ROOT_LINKS = (("/var/run", "/run"), ("/var/lock", "/run/lock"))
ETC = Path("/etc")
# Never copied out of /etc, whatever their mode says (each is also 0600/0640 on a stock system).
ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "ssh/ssh_host_*_key", "ssl/private", "security/opasswd")
# Places a share may not be, contain or lie in: the host's own state. (/var/backups: copies of
# shadow; QEMU reads what pytest's user can, root in most CI, whatever a file's mode says.)
SECRET_ROOTS = ("/etc", "/proc", "/sys", "/run", "/dev", "/boot", "/var/backups")
# Places a share may not be or contain, but may lie in (a project checked out under /tmp): the
# root, the temp dirs (run directories and their keys) and the homes of people.
TEMP_DIRS = ("/tmp", "/var/tmp")
# What a home keeps credentials in: none of it may be shared, wherever the home is.
HOME_SECRETS = (
    ".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".config/gh", ".config/hub", ".kube", ".docker",
    ".netrc", ".git-credentials", ".npmrc", ".pypirc", ".cargo/credentials", ".cargo/credentials.toml",
    ".vault-token", ".terraform.d", ".password-store", ".local/share/keyrings", ".pgpass", ".my.cnf",
    ".bash_history", ".zsh_history", ".python_history", ".psql_history", ".mysql_history", ".lesshst",
    ".viminfo",
)
# Each session's private run directory: lab.RUN_DIR_PREFIX, its pid, a random part.
RUN_DIR = re.compile(r"nestedkvm-[0-9]+-[A-Za-z0-9_]+")

@dataclass(frozen=True)
class Export:
    """One read-only directory for a guest: `source` on the exporting host, mounted at `target`."""

    source: Path
    target: Path


@dataclass(frozen=True)
class View:
    """Everything a built-in guest sees of its host's files."""

    exports: tuple[Export, ...]
    links: tuple[tuple[str, str], ...]  # (path, target) symlinks in the guest's root, e.g. ("/bin", "usr/bin")
    tmpfs: tuple[Path, ...] = ()  # more tmpfs mounts than layout.TMPFS_DIRS (a place for links)

    def one_level_down(self) -> View:
        """What a guest exports to the guest inside it: its own view, from the same paths."""
        return View(tuple(Export(e.target, e.target) for e in self.exports), self.links, self.tmpfs)


def build_view(etc_copy: Path, shared: Iterable[Path], root: Path = Path("/"), project: Path | None = None) -> View:
    """The view of L1: the system directories, `etc_copy` at /etc, the `project` and `shared`
    (deduplicated: a directory inside another one is already there)."""
    shared = [*([project] if project else []), *shared]
    exports = [Export(etc_copy, ETC)]
    links = []
    for name in SYSTEM_DIRS:
        path = root / name.lstrip("/")
        if path.is_symlink():
            links.append((name, os.readlink(path)))
        elif path.is_dir():
            lower = root / LOWER_DIR.lstrip("/") / name.lstrip("/")  # inside a built-in guest: see layout
            exports.append(Export(lower if lower.is_dir() else path, Path(name)))
    for path in sorted({p.resolve() for p in shared}, key=lambda p: len(p.parts)):
        reason = unshareable(path, project=project is not None and path == project.resolve())
        if reason is not None:  # settings refuse such a share; this guards the rootdir, cache and Python dirs
            raise HostError(f"{path} would be shared with the guests, but {reason}: run pytest from a project "
                            "directory, with the cache and the Python environment outside key stores")
        if not any(path.is_relative_to(e.target) for e in exports):
            exports.append(Export(path, path))
    return View(tuple(exports), (*links, *ROOT_LINKS))  # /var and /run are never shared (SECRET_ROOTS)


def image_view() -> View:
    """What the built-in guest sees of a user's disk image it runs in: the image's /usr, the copy of its
    /etc without secrets that the plugin makes there (HOSTED_ETC), the boot files it brought (so a
    guest inside this one boots from them too), and a merged /usr's links for /bin, /sbin, /lib, /lib64."""
    hosted = Path(HOSTED_BOOT)
    return View((Export(Path("/usr"), Path("/usr")), Export(Path(HOSTED_ETC), ETC), Export(hosted, hosted)),
                (*((name, f"usr{name}") for name in ("/bin", "/sbin", "/lib", "/lib64")), *ROOT_LINKS))


def python_dirs() -> list[Path]:
    """The running Python environment: the venv and the interpreter it is built on."""
    return [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent]


def unshareable(path: Path, project: bool = False) -> str | None:
    """Why `path` may not be shared with a guest, or None (`project`: it is pytest's rootdir)."""
    if any(c.isspace() or c in ":,\"" for c in str(path)):
        return "its path holds whitespace, '\"', ':' or ',' (it travels on the guests' kernel command line)"
    secret = secret_inside(path, project=project)
    if secret is not None:
        if secret == path.resolve():
            return "it is a secret location of this host"
        return f"it holds or lies in {secret}, a secret location of this host"
    return None


def secret_inside(path: Path, homes: Iterable[Path] | None = None, project: bool = False) -> Path | None:
    """A secret location that `path` is, lies in, or contains; or None. `homes`: the homes of
    people (secret as a whole; default: this host's, `people_homes()`). The `project` (pytest's
    rootdir) may be or hold a home (pytester makes its rootdir $HOME), but not its key stores."""
    path = _resolved(path)
    people = {_resolved(h) for h in (people_homes() if homes is None else homes)}
    containers = {Path("/"), *_temp_dirs(), *(() if project else people)}
    stores = {_resolved(home / name) for home in {*people, *_account_homes()} for name in HOME_SECRETS}
    whole = {*(Path(p) for p in SECRET_ROOTS), *stores, *_run_dirs()}
    for secret in sorted(whole | containers, key=lambda p: (len(p.parts), str(p))):
        if secret == path or (secret.is_relative_to(path) and _may_exist(secret)):
            return secret
        if path.is_relative_to(secret) and secret not in containers:
            return secret
    return None


def people_homes() -> list[Path]:
    """Homes of people, wherever they are: root's, $HOME, the user's, /home/*, and the passwd
    entries of ordinary accounts (uid 1000 and up) outside the system directories."""
    homes = [Path("/root"), Path.home(), *([Path(os.environ["HOME"])] if os.environ.get("HOME") else [])]
    with contextlib.suppress(OSError):
        homes += [p for p in Path("/home").iterdir() if p.is_dir()]
    homes += [Path(entry.pw_dir) for entry in _passwd() if entry.pw_uid >= 1000 or entry.pw_uid == os.getuid()]
    system = [Path(d) for d in SYSTEM_DIRS]
    return [home for home in homes if home.is_absolute() and home != Path("/")
            and not any(home.is_relative_to(d) for d in system)]


def _account_homes() -> list[Path]:
    """The home of every account, system ones included (/var/www, /var/lib/...): their key stores count."""
    return [Path(entry.pw_dir) for entry in _passwd() if entry.pw_dir.startswith("/")]


def _passwd() -> list[pwd.struct_passwd]:
    try:
        return pwd.getpwall()
    except OSError:
        return []


def _temp_dirs() -> list[Path]:
    return [_resolved(Path(p)) for p in (*TEMP_DIRS, tempfile.gettempdir())]


def _run_dirs() -> list[Path]:
    """Every session's run directory (its private key), this one's and others'."""
    found: list[Path] = []
    for temp in set(_temp_dirs()):
        with contextlib.suppress(OSError):
            found += [_resolved(p) for p in temp.glob("nestedkvm-*") if RUN_DIR.fullmatch(p.name)]
    return found


def _resolved(path: Path) -> Path:
    """`path` with symlinks resolved where they can be (a home reached through a link is that home)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _may_exist(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory on the way we may not look into: assume the worst
        return True


ETC_COPY_PREFIX = "etc-"
ETC_COPY_KEEP_S = 2 * 86400  # older copies of another /etc are removed (none serves a session that long)


def filtered_etc(cache: Path, source: Path = ETC) -> Path:
    """The copy_etc of `source` kept in `cache`, reused while every entry of `source` is as it
    was (path, type, mode, owner, size, mtime, inode, link target): a walk of /etc costs a few
    ms, a copy about a second."""
    key = _metadata_key(source)
    target = cache / f"{ETC_COPY_PREFIX}{key}"
    if target.is_dir():
        os.utime(target)  # in use: not pruned
        return target
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{ETC_COPY_PREFIX}", dir=cache))
    try:
        copy_etc(building / "etc", source)
        with contextlib.suppress(OSError):  # another session made the same copy meanwhile
            (building / "etc").rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _prune_etc_copies(cache, keep=target)
    return target


def _metadata_key(source: Path) -> str:
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted([".", *dirnames, *filenames]):
            path = Path(directory, name)
            try:
                st = path.lstat()
                link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            except OSError:
                continue
            fields = (path, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, link)
            digest.update(repr(fields).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _prune_etc_copies(cache: Path, keep: Path) -> None:
    for old in cache.glob(f"{ETC_COPY_PREFIX}*"):
        with contextlib.suppress(OSError):
            if old != keep and time.time() - old.stat().st_mtime > ETC_COPY_KEEP_S:
                shutil.rmtree(old)


def copy_etc(target: Path, source: Path = ETC) -> Path:
    """A copy of `source` without its secrets: what is readable by everyone, less ETC_SECRETS.

    Symlinks are kept as links; special files are left out.
    """
    secrets = {p for pattern in ETC_SECRETS for p in source.glob(pattern)}
    target.mkdir(mode=0o755)
    for directory, dirnames, filenames in os.walk(source):
        here = Path(directory)
        dirnames[:] = [d for d in dirnames if _shareable(here / d, secrets) or (here / d).is_symlink()]
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            _copy_one(here / name, target / (here / name).relative_to(source), secrets)
        for name in dirnames:
            if not (here / name).is_symlink():
                (target / (here / name).relative_to(source)).mkdir(mode=0o755)
    _write_blank_shadow(target)
    _write_own_machine_id(target)
    return target


def _write_own_machine_id(etc: Path) -> None:
    """A machine id of the guests' own: the host's identifies the host (journald, D-Bus, DHCP)."""
    machine_id = etc / "machine-id"
    machine_id.unlink(missing_ok=True)
    machine_id.write_text(secrets.token_hex(16) + "\n")
    machine_id.chmod(0o444)


def _write_blank_shadow(etc: Path) -> None:
    """A shadow file that holds no password: every account "*" (no password login), so sshd, which
    treats an account without a shadow entry as locked, still accepts the session key."""
    try:
        users = [line.split(":", 1)[0] for line in (etc / "passwd").read_text().splitlines() if ":" in line]
    except OSError:
        return
    shadow = etc / "shadow"
    shadow.unlink(missing_ok=True)  # never write through a link copied from the host's /etc
    shadow.write_text("".join(f"{user}:*:19000:0:99999:7:::\n" for user in users))
    shadow.chmod(0o640)


def _shareable(path: Path, secrets: set[Path]) -> bool:
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    wanted = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return path not in secrets and mode & wanted == wanted


def _copy_one(path: Path, copy: Path, secrets: set[Path]) -> None:
    if path in secrets:
        return
    if path.is_symlink():
        copy.symlink_to(os.readlink(path))
    elif path.is_file() and _shareable(path, secrets):
        try:
            shutil.copyfile(path, copy)
        except OSError:
            return  # vanished or unreadable after all: not shared
        copy.chmod(0o644 if not path.stat().st_mode & stat.S_IXOTH else 0o755)
