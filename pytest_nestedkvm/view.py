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

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import HostError

# Host directories a guest gets as they are (where they are directories, not /usr symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = Path("/etc")
# Never copied out of /etc, whatever their mode says (each is also 0600/0640 on a stock system).
ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "ssh/ssh_host_*_key", "ssl/private", "security/opasswd")
# Places a share may not be or contain: the host's own state and the usual homes of keys.
SECRET_ROOTS = ("/", "/etc", "/proc", "/sys", "/run", "/dev", "/boot", tempfile.gettempdir())  # tmp: run dirs, keys
# Secret as a whole, but a share below them is fine (a project checked out under /tmp).
CONTAINERS = ("/", tempfile.gettempdir())
HOME_SECRETS = (".ssh", ".gnupg", ".aws", ".config/gcloud", ".kube", ".docker", ".netrc", ".git-credentials")


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


def build_view(etc_copy: Path, shared: Iterable[Path], root: Path = Path("/")) -> View:
    """The view of L1: the system directories, `etc_copy` at /etc, and `shared` (deduplicated:
    a directory inside another one is already there)."""
    exports = [Export(etc_copy, ETC)]
    links = []
    for name in SYSTEM_DIRS:
        path = root / name.lstrip("/")
        if path.is_symlink():
            links.append((name, os.readlink(path)))
        elif path.is_dir():
            exports.append(Export(path, Path(name)))
    for path in sorted({p.resolve() for p in shared}, key=lambda p: len(p.parts)):
        reason = unshareable(path)
        if reason is not None:  # settings refuse such a share; this guards the rootdir, cache and Python dirs
            raise HostError(f"{path} would be shared with the guests, but {reason}: run pytest from a project "
                            "directory, with the cache and the Python environment outside key stores")
        if not any(path.is_relative_to(e.target) for e in exports):
            exports.append(Export(path, path))
    return View(tuple(exports), tuple(links))


def python_dirs() -> list[Path]:
    """The running Python environment: the venv and the interpreter it is built on."""
    return [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent]


def unshareable(path: Path) -> str | None:
    """Why `path` may not be shared with a guest, or None."""
    if any(c.isspace() or c in ":," for c in str(path)):
        return "its path holds whitespace, ':' or ',' (it travels on the guests' kernel command line)"
    secret = secret_inside(path)
    if secret is not None:
        if secret == path.resolve():
            return "it is a secret location of this host"
        return f"it holds or lies in {secret}, a secret location of this host"
    return None


def secret_inside(path: Path, home: Path | None = None) -> Path | None:
    """A secret location that `path` is, lies in, or contains; or None."""
    path = path.resolve()
    homes = [Path("/root"), *([home] if home else []), *_homes()]
    secrets = [Path(p) for p in SECRET_ROOTS] + [h / name for h in homes for name in HOME_SECRETS]
    for secret in secrets:
        inside = path.is_relative_to(secret) and str(secret) not in CONTAINERS
        if secret == path or inside or (secret.is_relative_to(path) and _may_exist(secret)):
            return secret
    return None


def _may_exist(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory on the way we may not look into: assume the worst
        return True


def _homes() -> list[Path]:
    base = Path("/home")
    try:
        return [p for p in base.iterdir() if p.is_dir()]
    except OSError:
        return []


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
    return target


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
