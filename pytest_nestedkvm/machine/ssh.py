"""SSH to guests with paramiko: the session's key pair, sshd in the built-in guest,
connecting with retries, jumping through the parent guest, SFTP copies.

Guests are reached on the parent's loopback only: QEMU's user network forwards a
port of 127.0.0.1 (chosen by the kernel, read back over QMP, so no race) to the
guest's port 22. L2 and deeper are reached through their parent's SSH connection
(a direct-tcpip channel to the parent's loopback), never on L0's network.
Password authentication is never offered or accepted.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..base.deadline import CONNECT_STEP, MIN_WAIT, Deadline, retry
from ..base.errors import HostError, SshError
from ..boot.layout import PORT_DIR

# While a guest boots, QEMU accepts on the forwarded port and the guest resets the connection:
# each retry would log a traceback at ERROR. connect() reports what matters as an exception.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

SSHD = Path("/usr/sbin/sshd")
# What paramiko's AuthenticationException says when auth_timeout ran out (auth_handler.py).
AUTH_TIMEOUT = "Authentication timeout."
# The built-in guest's sshd keeps everything in its tmpfs, under the plugin's run directory.
SSHD_DIR = f"{PORT_DIR}/ssh"


@dataclass(frozen=True)
class SessionKey:
    """The key pair of one pytest process: private key 0600 in a 0700 directory."""

    path: Path
    pkey: paramiko.Ed25519Key

    @property
    def public_line(self) -> str:
        return f"{self.pkey.get_name()} {self.pkey.get_base64()} pytest-nestedkvm"


def make_session_key(directory: Path) -> SessionKey:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    text = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    key = SessionKey(path, paramiko.Ed25519Key.from_private_key(io.StringIO(text.decode())))
    (directory / "id_ed25519.pub").write_text(key.public_line + "\n")
    return key


def sshd_script(public_line: str) -> str:
    """Shell commands that bring up the built-in guest's network and sshd; they print its host key.

    The guest sees QEMU's user network (10.0.2.15, gateway 10.0.2.2). sshd is the host's
    own binary through the exported /usr, with a config, a host key and the session key in
    tmpfs. sftp is served in-process (internal-sftp); TCP forwarding stays on so the
    next level can be reached through this one.
    """
    if not SSHD.is_file():
        raise HostError(f"SSH into the built-in guest runs the host's {SSHD}, which is missing: "
                        "apt-get install openssh-server (its service need not run)")
    config = "\n".join([
        f"HostKey {SSHD_DIR}/host_ed25519", f"PidFile {SSHD_DIR}/sshd.pid",
        f"AuthorizedKeysFile {SSHD_DIR}/authorized_keys", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "PrintMotd no",
        "AllowTcpForwarding yes", "Subsystem sftp internal-sftp", "",
    ])
    d = SSHD_DIR
    return (
        f"set -e; mkdir -p -m 700 {d}; mkdir -p -m 755 /run/sshd; "
        "nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); "
        '[ -n "$nic" ] || { echo "no network interface (is virtio_net missing?)" >&2; exit 1; }; '
        "ip link set lo up; ip link set $nic up; "
        "ip addr add 10.0.2.15/24 dev $nic 2>/dev/null || true; ip route add default via 10.0.2.2 2>/dev/null || true; "
        f"[ -e {d}/host_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -f {d}/host_ed25519; "
        f"printf '%s\\n' {shlex.quote(public_line)} > {d}/authorized_keys; chmod 600 {d}/authorized_keys; "
        f"printf '%s' {shlex.quote(config)} > {d}/sshd_config; "
        f"[ -e {d}/sshd.pid ] && kill -0 $(cat {d}/sshd.pid) 2>/dev/null || "
        f"{SSHD} -f {d}/sshd_config -E {d}/sshd.log; "
        f"cat {d}/host_ed25519.pub"
    )


class _PinnedHostKey(paramiko.MissingHostKeyPolicy):
    """Accept exactly the host key the guest reported over its own channel; no key given: accept any.

    (A guest's host keys are made at its boot: there is no earlier place to learn them.)
    """

    def __init__(self, expected: str | None) -> None:
        self.expected = expected.split()[:2] if expected else None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if self.expected is not None and [key.get_name(), key.get_base64()] != self.expected:
            raise SshError(f"{hostname} offered host key {key.get_name()} {key.get_base64()[:16]}..., "
                           f"not the one the guest reported ({self.expected[1][:16]}...)")


def connect(
    what: str, port: int, key: SessionKey, *, user: str = "root", host_key: str | None = None,
    via: paramiko.SSHClient | None = None, deadline: Deadline, check: Callable[[], None] | None = None,
) -> paramiko.SSHClient:
    """A connected, authenticated client for the guest whose sshd is forwarded to `port`, by `deadline`.

    `port` is on L0's loopback, or with `via` on the loopback of that parent guest.
    Retries while the server is not up yet (calling `check`, which raises when the guest
    died, before each try); a rejected key is not retried.
    """
    last = ["nothing tried"]

    def attempt() -> paramiko.SSHClient | None:
        if check is not None:
            check()
        try:
            return _connect_once(what, port, key, user, host_key, via, deadline.share(CONNECT_STEP), deadline)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            last[0] = f"{type(exc).__name__}: {exc}"
            return None

    try:
        return retry(f"{what}: SSH on port {port} answering", attempt, deadline, interval=0.2)
    except TimeoutError:
        raise SshError(f"{what}: SSH on port {port} did not answer within {deadline.budget:g} s "
                       f"(last: {last[0]})") from None


def _connect_once(
    what: str, port: int, key: SessionKey, user: str, host_key: str | None, via: paramiko.SSHClient | None,
    step: Deadline, deadline: Deadline,
) -> paramiko.SSHClient:
    """One try: reaching sshd and its banner within `step`; once its banner came, sshd runs, and
    authenticating may take what is left of `deadline` (a fresh L2's sshd under TCG took more
    than 10 s for its first login in CI, 2026-12-05: a try per step never got in)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_PinnedHostKey(host_key))
    wait = max(step.remaining(), MIN_WAIT)
    try:
        sock = None
        if via is not None:
            transport = via.get_transport()
            if transport is None or not transport.is_active():
                raise SshError(f"{what}: the SSH connection to its parent is closed")
            sock = transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=wait)
        client.connect("127.0.0.1", port, username=user, pkey=key.pkey, sock=sock, timeout=wait,
                       banner_timeout=wait, auth_timeout=max(deadline.remaining(), MIN_WAIT),
                       allow_agent=False, look_for_keys=False)
        return client
    except paramiko.AuthenticationException as exc:
        client.close()
        if str(exc) == AUTH_TIMEOUT:  # a slow guest, not a refusal: tried again while time is left
            raise TimeoutError("sshd did not finish authenticating in time") from None
        raise SshError(f"{what}: the guest rejected the session key for {user!r} ({exc}): its sshd does not "
                       f"authorize {key.path}.pub (for a disk image: does it run cloud-init?)",
                       rejected_key=True) from None
    except BaseException:
        client.close()
        raise


def shell(client: paramiko.SSHClient, deadline: Deadline) -> paramiko.Channel:
    """A session running a plain `sh` that reads commands from the channel (see channel.py)."""
    transport = client.get_transport()
    assert transport is not None
    channel = transport.open_session(timeout=deadline.remaining())
    channel.exec_command("exec sh")
    return channel


def _sftp(client: paramiko.SSHClient, deadline: Deadline) -> paramiko.SFTPClient:
    """An SFTP session whose every wait is bounded: a guest that hangs mid-copy is an error, not a hang.
    (Each wait gets what is left when the session opens: paramiko takes one timeout per channel.)"""
    sftp = client.open_sftp()
    sftp.get_channel().settimeout(max(deadline.remaining(), MIN_WAIT))  # type: ignore[union-attr]
    return sftp


def put(client: paramiko.SSHClient, local: Path, remote: str, deadline: Deadline) -> None:
    """Copy a file into the guest, bytes and permission bits exact."""
    with _sftp(client, deadline) as sftp:
        sftp.put(str(local), remote)
        sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))


def get(client: paramiko.SSHClient, remote: str, local: Path, deadline: Deadline) -> None:
    """Copy a file out of the guest, bytes and permission bits exact except setuid and setgid,
    which are dropped: a guest never puts a set-id program on the host."""
    with _sftp(client, deadline) as sftp:
        sftp.get(remote, str(local))
        mode = sftp.stat(remote).st_mode
    # Never a set-id, sticky or world-writable file on L0 from a guest.
    os.chmod(local, stat.S_IMODE(mode or 0o600) & ~(stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH))
