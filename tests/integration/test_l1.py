"""Real QEMU, real kernel: the built-in L1 guest and its command channel."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import pytest_nestedkvm
from pytest_nestedkvm.base.errors import CommandFailed, CommandTimeout
from pytest_nestedkvm.base.host import HostReport
from pytest_nestedkvm.boot.initramfs import WAKEUP_GRANULARITY_NS
from pytest_nestedkvm.boot.layout import BOOT_MARKS
from pytest_nestedkvm.machine.guest import Guest

pytestmark = pytest.mark.nested(level=1)


def test_l1_cpu_offers_hardware_virtualization(l1: Guest) -> None:
    flags = l1.succeed("grep -m1 '^flags' /proc/cpuinfo").split()
    assert "svm" in flags or "vmx" in flags


def test_l1_has_kvm_with_nested_on(l1: Guest, l0: HostReport) -> None:
    l1.succeed("test -c /dev/kvm")
    module = "kvm_amd" if "svm" in l1.succeed("cat /proc/cpuinfo") else "kvm_intel"
    assert l1.succeed(f"cat /sys/module/{module}/parameters/nested").strip() in ("1", "Y")


def test_l1_runs_the_planned_accelerator(l1: Guest, l0: HostReport) -> None:
    assert l1.spec.accel == l0.accel
    assert ["-cpu", l0.cpu] == l1.qemu_argv[l1.qemu_argv.index("-cpu"):][:2]
    assert "-snapshot" in l1.qemu_argv


def test_l1s_qemu_runs_under_its_seccomp_filter(l1: Guest, l0: HostReport) -> None:
    # Debian's QEMU is built with seccomp: -sandbox is on, and the kernel enforces a filter.
    assert l0.qemu is not None and l0.qemu.sandbox
    assert "-sandbox" in l1.qemu_argv
    status = Path(f"/proc/{l1.process.pid}/status").read_text()  # type: ignore[union-attr]
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status


def test_exit_status_and_streams_are_separate_and_exact(l1: Guest) -> None:
    result = l1.run("printf 'out\\nno newline'; printf 'err\\n' >&2; exit 7")
    assert (result.exit_status, result.stdout, result.stderr) == (7, "out\nno newline", "err\n")


def test_quotes_newlines_and_heredocs_round_trip(l1: Guest) -> None:
    command = "cat <<'EOF'\nit's \"quoted\" $HOME `x` \\ \nEOF"
    assert l1.succeed(command) == "it's \"quoted\" $HOME `x` \\ \n"


def test_binary_output_is_byte_exact(l1: Guest) -> None:
    result = l1.run("printf '\\000\\001\\377\\n@@NK\\r\\n'")
    assert result.stdout_bytes == b"\x00\x01\xff\n@@NK\r\n"


def test_large_output_is_complete(l1: Guest) -> None:
    out = l1.succeed("seq 1 200000")
    assert out.splitlines() == [str(n) for n in range(1, 200001)]


def test_stdin_is_not_the_channel(l1: Guest) -> None:
    assert l1.run("cat; echo done").stdout == "done\n"


def test_nor_is_stdout_nor_any_other_descriptor_a_command_gets(l1: Guest) -> None:
    # A background job of one command that reads its stdout must not take the next command off
    # the port (and answer it in its place): stdout is the reply port, opened write-only, and no
    # descriptor is the port the commands come in on.
    l1.succeed("(head -c 100 <&1 > /tmp/taken 2>/tmp/why &); true")
    assert l1.succeed("echo the next command ran") == "the next command ran\n"
    assert l1.succeed("sleep 0.2; cat /tmp/taken") == ""
    assert l1.succeed("grep ^flags: /proc/self/fdinfo/1").split()[1][-1] == "1"  # octal: O_WRONLY
    assert l1.run("head -c 1 <&1").exit_status != 0
    commands_port = l1.succeed("readlink /run/nestedkvm/port.nestedkvm.cmd").strip()
    assert commands_port.startswith("/dev/vport") and commands_port not in l1.succeed("ls -l /proc/self/fd/")
    for fd in (0, 1):  # the shell's own: a virtio port has one opener at a time
        assert "Device or resource busy" in l1.fail(f"head -c 1 /proc/$$/fd/{fd}")


def test_a_command_that_hides_tmp_does_not_stop_the_next_ones_running(l1: Guest) -> None:
    l1.succeed("mount -t tmpfs tmpfs /tmp")
    try:
        assert l1.fail("echo ran >&2; false") == "ran\n"  # it ran: a status for a command run for real
        assert l1.succeed("echo ran") == "ran\n"
    finally:
        l1.succeed("umount -l /tmp")  # lazily: this very command spools its stderr there


def test_state_does_not_leak_between_commands(l1: Guest) -> None:
    l1.run("cd /sys; X=1; exit 3")
    assert l1.succeed("pwd; echo ${X:-unset}") == "/\nunset\n"


def test_timeout_kills_the_command_and_channel_stays_usable(l1: Guest) -> None:
    with pytest.raises(CommandTimeout) as caught:
        l1.run("echo started; sleep 600", timeout=2)
    assert caught.value.stdout == b"started\n"
    assert l1.succeed("echo still here") == "still here\n"
    assert l1.run("pgrep -x 'sleep' || echo none").stdout == "none\n"


def test_succeed_and_fail_raise_assertion_errors_with_the_details(l1: Guest) -> None:
    with pytest.raises(CommandFailed) as caught:
        l1.succeed("echo oops >&2; false")
    assert isinstance(caught.value, AssertionError)
    assert caught.value.exit_status == 1 and caught.value.stderr == "oops\n"
    assert l1.fail("ls /nonexistent") != ""
    with pytest.raises(CommandFailed):
        l1.fail("true")


@pytest.mark.nested_fresh  # it boots L1 again: no L2 may be running in it (that would be trouble)
def test_the_root_is_writable_and_nothing_reaches_l0(l1: Guest) -> None:
    # What a daemon does (libvirtd): write its configuration and state under /etc and /var.
    name = f"nestedkvm-written-{os.getpid()}"
    places = [f"/etc/{name}", f"/var/lib/{name}/state", f"/var/cache/{name}", f"/{name}", f"/usr/local/{name}",
              f"/usr/lib/{name}"]
    for place in places:
        l1.succeed(f"mkdir -p $(dirname {place}) && echo from-l1 > {place} && grep -q from-l1 {place}")
    etc_copy = next(e.source for e in l1.spec.exports if e.target == Path("/etc"))
    for place in [*places, str(etc_copy / name)]:
        assert not Path(place).exists(), place  # neither L0 nor the filtered /etc it exports
    l1.succeed("echo x > /tmp/scratch && cat /tmp/scratch")
    # A daemon's socket and lock, where it looks for them: the usual links into /run.
    l1.succeed(f"touch /var/run/{name}.sock /var/lock/{name} && test -e /run/{name}.sock -a -e /run/lock/{name}")
    rootdir = Path(__file__).parent
    l1.fail(f"touch {rootdir}/{name}")  # the project stays read-only (see layout.WRITABLE_EXPORTS)
    l1.fail(f"touch /run/nestedkvm/lower/usr/{name}")  # and so does the 9p mount under /usr's overlay
    l1.restart()  # and the guest forgets it all: the writes lived in its memory
    for place in places:
        l1.fail(f"test -e {place}")


def test_complete_dev(l1: Guest) -> None:
    l1.succeed("test -e /dev/fd/0 && test -e /dev/stdin && test -d /dev/pts && test -d /dev/shm")
    assert l1.succeed("bash -c 'cat <(echo via-process-substitution)'") == "via-process-substitution\n"


def test_a_pipe_reader_does_not_preempt_its_writer_on_every_line(l1: Guest) -> None:
    # Both ends on one vCPU, one write per line. Under emulation a context switch is
    # ~50 us, so the guest's wakeup granularity is raised (initramfs.stage2_script).
    assert l1.succeed("cat /sys/kernel/debug/sched/wakeup_granularity_ns") == f"{WAKEUP_GRANULARITY_NS}\n"
    l1.succeed("cat > /tmp/writer.sh <<'EOF'\n"
               "i=0; while [ $i -lt 5000 ]; do echo $i; i=$((i+1)); done\n"
               "grep ^nonvoluntary_ctxt_switches /proc/$$/status >&2\n"
               "EOF")
    result = l1.run("taskset -c 0 sh -c 'sh /tmp/writer.sh | cat > /dev/null'")
    assert result.exit_status == 0, result
    preempted = int(result.stderr.split()[-1])
    assert preempted < 500, f"the writer was preempted {preempted} times for 5000 lines"


def test_the_init_records_its_boot_phases_in_order(l1: Guest) -> None:
    """benchmarks/boot_split.py reads these: each phase's guest uptime, in boot order."""
    marks = dict(item.split("=") for item in l1.succeed(f"cat {BOOT_MARKS}").split())
    assert list(marks) == ["init", "drivers", "mounts", "ports", "kvm", "stage2"]
    uptimes = [float(value) for value in marks.values()]
    assert uptimes == sorted(uptimes) and 0 < uptimes[0]
    assert uptimes[-1] <= float(l1.succeed("cut -d' ' -f1 /proc/uptime"))


def test_l1_finds_its_own_kernel_in_boot(l1: Guest) -> None:
    # What a hypervisor inside L1 (libvirt, QEMU, this plugin) boots: the kernel L1 runs.
    release = l1.succeed("uname -r").strip()
    l1.succeed(f"test -s /boot/vmlinuz-{release} && test -s /boot/config-{release}")
    package = Path(pytest_nestedkvm.__file__).parents[1]  # the project, which L1 sees at the same path
    check = l1.run(f"cd /tmp && PYTHONPATH={package} {sys.executable} -m pytest_nestedkvm check")
    assert f"kernel: {release} /boot/vmlinuz-{release}" in check.stdout.splitlines(), check.stdout + check.stderr
