"""Unit tests for hosting.py: a user's disk image readied for the built-in guest inside it (a fake shell)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nestedkvm.base.deadline import Deadline
from pytest_nestedkvm.base.errors import HostError, LevelUnavailable
from pytest_nestedkvm.boot.qemu import GuestSpec
from pytest_nestedkvm.boot.view import ETC_SECRETS
from pytest_nestedkvm.machine import hosting
from pytest_nestedkvm.machine.channel import CommandResult

SPEC = GuestSpec(level=2, qemu="qemu-system-x86_64", accel="kvm", cpu="host", memory_mib=512, smp=1,
                 uploads=((Path("/cache/vmlinux"), "/run/nestedkvm/boot/vmlinux"),
                          (Path("/cache/initrd"), "/run/nestedkvm/boot/initrd")))


class FakeImage:
    """The image's shell: the setup script ends with `status`; `id -un` answers `user`."""

    def __init__(self, status: int, user: str = "root") -> None:
        self.status, self.user = status, user
        self.put_files: list[tuple[str, str]] = []

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        if command == "id -un":
            return CommandResult(command, 0, f"{self.user}\n", "", 0.0)
        return CommandResult(command, self.status, "", "cp: cannot stat\n" if self.status else "", 0.0)


@pytest.fixture(autouse=True)
def copies(monkeypatch: pytest.MonkeyPatch) -> None:
    def put(parent: FakeImage, level: int, local: Path, remote: str, deadline: Deadline) -> None:
        assert deadline.remaining() == pytest.approx(60, abs=1)  # the boot budget of L2, not a command's
        parent.put_files.append((str(local), remote))

    monkeypatch.setattr(hosting, "put_through_port", put)


def test_a_ready_image_gets_the_boot_files_copied_in() -> None:
    image = FakeImage(0)
    hosting.prepare(image, SPEC, Deadline.after(60))
    assert image.put_files == [("/cache/vmlinux", "/run/nestedkvm/boot/vmlinux"),
                               ("/cache/initrd", "/run/nestedkvm/boot/initrd")]


@pytest.mark.parametrize(("status", "words"), [
    (90, "commands run as 'tester': let cloud-init authorize the session key for root"),
    (91, "has no qemu-system-x86_64 to run L2 with: install QEMU into the image (Debian/Ubuntu: apt-get install "
         "qemu-system-x86)"),
    (92, "has no /dev/kvm for L2"),
], ids=["not-root", "no-qemu", "no-kvm"])
def test_what_only_the_images_owner_can_add_is_a_skip_that_names_the_fix(status: int, words: str) -> None:
    image = FakeImage(status, user="tester")
    with pytest.raises(LevelUnavailable, match="--nested-l1-image") as caught:
        hosting.prepare(image, SPEC, Deadline.after(60))
    assert words in str(caught.value) and caught.value.level == 2
    assert image.put_files == []


def test_any_other_failure_is_a_host_error_with_the_shells_words() -> None:
    with pytest.raises(HostError, match=r"preparing L1 to run it failed \(status 1\): cp: cannot stat"):
        hosting.prepare(FakeImage(1), SPEC, Deadline.after(60))


def test_the_setup_script_is_valid_sh_and_refuses_before_it_changes_anything() -> None:
    script = hosting.setup_script(SPEC)
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    lines = script.splitlines()
    assert lines[0] == '[ "$(id -u)" = 0 ] || exit 90'
    assert lines.index("[ -c /dev/kvm ] || exit 92") < next(i for i, line in enumerate(lines) if "mkdir" in line)
    assert f"rm -rf {' '.join(ETC_SECRETS)} &&" in script  # the guest's /etc holds none of the image's secrets


# -- the boot files through a port: a real sh in the image's place, the port a socket pair --------


class ShellImage:
    """The image: each command runs in a local sh. Its port is a FIFO under a stand-in PORT_DIR,
    fed by a relay from the far end of a socket pair whose near end is L0's."""

    def __init__(self, near: socket.socket) -> None:
        self.near, self.closed = near, False
        self.link = self  # the link: carried() hands out L0's end of the port

    def carried(self, level: int, role: str) -> socket.socket:
        assert (level, role) == (2, "qmp")
        return self.near

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout, check=False)
        return CommandResult(command, done.returncode, done.stdout, done.stderr, 0.0)

    def close(self, keep_files: bool = False) -> None:
        self.closed = True


def relay(far: socket.socket, fifo: Path) -> None:
    with fifo.open("wb") as port:  # opens once head does
        while data := far.recv(1 << 16):
            port.write(data)
            port.flush()


@pytest.fixture
def image(tmp_path: Path) -> Iterator[ShellImage]:
    ports = tmp_path / "ports"
    ports.mkdir()
    os.mkfifo(ports / "port.nestedkvm.l2.qmp")
    near, far = socket.socketpair()
    threading.Thread(target=relay, args=(far, ports / "port.nestedkvm.l2.qmp"), daemon=True).start()
    yield ShellImage(near)
    near.close()
    far.close()


def test_a_file_goes_through_the_port_exact(
    monkeypatch: pytest.MonkeyPatch, image: ShellImage, tmp_path: Path,
) -> None:
    monkeypatch.undo()  # the real put_through_port (the autouse fixture replaced it)...
    monkeypatch.setattr(hosting, "PORT_DIR", str(tmp_path / "ports"))  # ...and the port again
    local = tmp_path / "vmlinuz"
    local.write_bytes(os.urandom(3 << 20))  # bigger than a socket's buffers: the writer must wait for head
    hosting.put_through_port(image, 2, local, str(tmp_path / "in-image"), Deadline.after(60))
    assert (tmp_path / "in-image").read_bytes() == local.read_bytes()
    assert not (tmp_path / "in-image.part").exists() and not image.closed


def test_a_copy_that_fails_stops_the_image_and_says_where(
    monkeypatch: pytest.MonkeyPatch, image: ShellImage, tmp_path: Path,
) -> None:
    monkeypatch.undo()
    monkeypatch.setattr(hosting, "PORT_DIR", str(tmp_path / "ports"))
    local = tmp_path / "initrd"
    local.write_bytes(b"x" * 1000)
    remote = tmp_path / "no-such-dir" / "initrd"
    with pytest.raises(HostError, match=rf"L2: copying {local} into L1 at {remote} failed \(.*Directory nonexistent"):
        hosting.put_through_port(image, 2, local, str(remote), Deadline.after(60))
    assert image.closed  # the port may hold part of the file: L1 boots afresh for the next L2


# The setup script's KVM lines with stand-ins: `cat` answers the vendor module's refcnt (REFCNT;
# empty: not loaded), `dmesg` the kernel log (DMESG), `modprobe` says what it was asked.
KVM_STUBS = """
cat() { [ -n "$REFCNT" ] && echo "$REFCNT"; }
dmesg() { echo "$DMESG"; }
modprobe() { echo "modprobe $*"; }
flag=svm
"""
REFINED = "[    1.79] tsc: Refined TSC clocksource calibration: 2599.980 MHz"


@pytest.mark.parametrize(("refcnt", "dmesg", "kvm", "asked"), [
    ("0", REFINED, True, ["modprobe -r kvm_amd", "modprobe kvm_amd nested=1"]),  # loaded before the refinement, maybe
    ("1", REFINED, True, []),  # a VM holds it: left alone
    ("0", "[    0.00] tsc: Detected 2600.000 MHz processor", True, []),  # a KVM guest: its TSC rate was known
    ("", REFINED, False, ["modprobe kvm_amd nested=1"]),  # not loaded yet
], ids=["refined-after-load", "in-use", "known-rate", "not-loaded"])
def test_the_image_loads_kvm_again_where_it_may_hold_a_first_tsc_estimate(
    tmp_path: Path, refcnt: str, dmesg: str, kvm: bool, asked: list[str],
) -> None:
    script = hosting.setup_script(SPEC)
    part = script[script.index("m=;"):script.index("[ -c /dev/kvm ] || exit 92")]
    device = tmp_path / "kvm"
    if kvm:
        os.mkfifo(device)  # a FIFO stands in for the device node (making one needs root): -c becomes -p
    part = part.replace("-c /dev/kvm", f"-p {device}")
    done = subprocess.run(["sh", "-c", KVM_STUBS + part], env={"REFCNT": refcnt, "DMESG": dmesg, "PATH": os.defpath},
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.splitlines() == asked
