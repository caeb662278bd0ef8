"""Unit tests for hosting.py: a user's disk image readied for the built-in guest inside it (a fake shell)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import cast

import paramiko
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

    @property
    def ssh(self) -> paramiko.SSHClient:
        return cast(paramiko.SSHClient, self)


@pytest.fixture(autouse=True)
def sftp(monkeypatch: pytest.MonkeyPatch) -> None:
    def put(client: FakeImage, local: Path, remote: str, deadline: Deadline) -> None:
        assert deadline.remaining() == pytest.approx(60, abs=1)  # the boot budget of L2, not a command's
        client.put_files.append((str(local), remote))

    monkeypatch.setattr(hosting.ssh, "put", put)


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
