"""The hypervisor suites without QEMU: unittests.cfg parsing, the runner's skip rules and exit statuses,
KTAP parsing, selftest discovery and verdicts, and the known-failure file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_nestedkvm.config.plan import scaled_timeout, timeout_note
from pytest_nestedkvm.suites import knownfail, kselftests, ktap, kut

CFG = '''\
##############################################################################
# unittest configuration
##############################################################################

[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386

[pmu]
file = pmu.flat
qemu_params = -cpu max
check = /sys/module/kvm/parameters/enable_pmu=Y /proc/sys/kernel/nmi_watchdog=0
accel = kvm
groups = pmu nodefault

[svm]
file = svm.flat
smp = $MAX_SMP
test_args = "-pause_filter_test -svm_unsupported_instruction_intercept_test"
qemu_params = -cpu max,+svm -m 4g
groups = svm migration

[multi]
file = multi.flat
qemu_params = """-cpu max \\
  -m 512
  -device virtio-rng-pci"""
timeout = 2m
'''
CONFIG_MAK = {"ARCH": "x86_64", "TEST_DIR": "x86", "TEST_SUBDIR": "x86"}


def unit_tests() -> dict[str, kut.UnitTest]:
    return {t.name: t for t in kut.parse_config(CFG)}


def facts(**changes: object) -> kut.GuestFacts:
    base = dict(level=1, cpus=2, memory_mib=1967, kvm=True, checks={})
    base.update(changes)
    return kut.GuestFacts(**base)  # type: ignore[arg-type]


def built_tree(tmp_path: Path, cfg: str = CFG, flats: tuple[str, ...] = ("apic.flat", "svm.flat")) -> Path:
    (tmp_path / "x86").mkdir(parents=True)
    (tmp_path / "x86" / "unittests.cfg").write_text(cfg)
    (tmp_path / "config.mak").write_text("".join(f"{k}={v}\n" for k, v in CONFIG_MAK.items()))
    for flat in flats:
        (tmp_path / "x86" / flat).write_bytes(b"\0")
    return tmp_path


# -- unittests.cfg ------------------------------------------------------------------------------


def test_config_fields_are_read_as_the_runner_reads_them() -> None:
    parsed = unit_tests()
    assert list(parsed) == ["x2apic", "cmpxchg8b", "pmu", "svm", "multi"]
    x2apic = parsed["x2apic"]
    assert (x2apic.file, x2apic.smp, x2apic.arch, x2apic.timeout, x2apic.groups) == (
        "apic.flat", "2", "x86_64", "30", ("apic",))
    assert x2apic.opts == "-cpu qemu64,+x2apic,+tsc-deadline"
    assert x2apic.line == 5
    assert parsed["cmpxchg8b"].smp == "1"  # the runner's default
    assert parsed["pmu"].check == ("/sys/module/kvm/parameters/enable_pmu=Y", "/proc/sys/kernel/nmi_watchdog=0")
    assert parsed["svm"].test_args == '"-pause_filter_test -svm_unsupported_instruction_intercept_test"'


def test_multiline_params_keep_their_lines_and_join_backslash_newlines() -> None:
    assert unit_tests()["multi"].opts == "-cpu max   -m 512\n  -device virtio-rng-pci"


def test_the_real_suite_list_parses(tmp_path: Path) -> None:
    tarball = Path(__file__).parents[3] / "shared" / "kvm-unit-tests-1da1819e.tar.xz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} is not here (test data only)")
    cfg = subprocess.run(["tar", "-xOf", tarball, "--wildcards", "*/x86/unittests.cfg"], check=True,
                         capture_output=True, text=True).stdout
    parsed = {t.name: t for t in kut.parse_config(cfg)}
    assert cfg.count("\n[") == len(parsed)
    assert parsed["vmx"].groups == ("vmx",) and parsed["svm"].groups == ("svm",)
    assert all(t.file.endswith(".flat") for t in parsed.values())


def test_timeouts_read_as_timeout_1_does() -> None:
    parsed = unit_tests()
    assert kut.timeout_seconds(parsed["x2apic"]) == 30
    assert kut.timeout_seconds(parsed["cmpxchg8b"]) == 90  # the suite's default
    assert kut.timeout_seconds(parsed["multi"]) == 120
    with pytest.raises(ValueError, match="not a duration"):
        kut.timeout_seconds(kut.UnitTest(name="x", file="x.flat", line=1, timeout="soon"))


def test_memory_asked_of_qemu() -> None:
    assert kut.memory_mib("-cpu max,+svm -m 4g") == 4096
    assert kut.memory_mib("-cpu max -m 2560") == 2560
    assert kut.memory_mib("-m 512M -cpu max") == 512
    assert kut.memory_mib("-cpu max,host-phys-bits") == 128  # QEMU's default


# -- skip rules -----------------------------------------------------------------------------------


def test_static_skips_use_the_runners_words(tmp_path: Path) -> None:
    tree = built_tree(tmp_path)
    parsed = unit_tests()
    assert kut.static_skip(parsed["x2apic"], CONFIG_MAK, tree) is None
    assert kut.static_skip(parsed["cmpxchg8b"], CONFIG_MAK, tree) == "i386 only"
    assert kut.static_skip(parsed["pmu"], CONFIG_MAK, tree) == "test marked as manual run only"
    assert kut.static_skip(parsed["multi"], CONFIG_MAK, tree) == "Test file 'x86/multi.flat' not found"


def test_check_and_accel_are_read_in_the_guest() -> None:
    pmu = unit_tests()["pmu"]
    good = {"/sys/module/kvm/parameters/enable_pmu": "Y", "/proc/sys/kernel/nmi_watchdog": "0"}
    assert kut.guest_skip(pmu, facts(checks=good)) is None
    assert kut.guest_skip(pmu, facts(checks={**good, "/proc/sys/kernel/nmi_watchdog": "1"})) == (
        "/proc/sys/kernel/nmi_watchdog not equal to 0")
    assert kut.guest_skip(pmu, facts(checks={**good, "/sys/module/kvm/parameters/enable_pmu": None})) == (
        "/sys/module/kvm/parameters/enable_pmu not equal to Y")
    assert kut.guest_skip(pmu, facts(kvm=False, checks=good)) == "kvm only, but L1 has no /dev/kvm"


def test_vcpus_and_memory_beyond_the_guest_skip_with_the_fix() -> None:
    parsed = unit_tests()
    assert "needs 2 vCPUs (smp = 2), L2 has 1: give L2 more with --nested-smp" == kut.guest_skip(
        parsed["x2apic"], facts(level=2, cpus=1))
    svm = parsed["svm"]  # smp = $MAX_SMP: always fits
    reason = kut.guest_skip(svm, facts())
    assert reason is not None and reason.startswith("needs 4096 MiB of guest memory (qemu_params -m), L1 has 1967 MiB")
    assert reason.endswith("(e.g. --nested-memory=5120)")
    assert kut.guest_skip(svm, facts(memory_mib=5000)) is None


def test_probe_output_is_read_back() -> None:
    pmu = unit_tests()["pmu"]
    command = kut.probe_command(pmu, Path("/kut"))
    assert "/proc/sys/kernel/nmi_watchdog" in command
    read = kut.parse_probe(pmu, 1, "2\n2014280\nkvm\n=Y\nmissing\n")
    assert (read.cpus, read.memory_mib, read.kvm) == (2, 1967, True)
    assert read.checks == {"/sys/module/kvm/parameters/enable_pmu": "Y", "/proc/sys/kernel/nmi_watchdog": None}


def test_probe_command_runs_in_a_shell(tmp_path: Path) -> None:
    """The probe is real shell: run it here against files of our own."""
    flag = tmp_path / "flag"
    flag.write_text("Y\n")
    test = kut.UnitTest(name="t", file="t.flat", line=1, check=(f"{flag}=Y", f"{tmp_path}/none=1"))
    out = subprocess.run(["sh", "-c", kut.probe_command(test, tmp_path)], capture_output=True, text=True).stdout
    read = kut.parse_probe(test, 1, out)
    assert read.checks == {str(flag): "Y", f"{tmp_path}/none": None}
    assert kut.guest_skip(test, read) == f"{tmp_path}/none not equal to 1"


# -- command line and exit statuses ---------------------------------------------------------------


def test_command_line_is_the_runners_get_cmdline() -> None:
    svm = unit_tests()["svm"]
    line = kut.command_line(svm, CONFIG_MAK, 450)
    assert line == ('MIGRATION=yes TESTNAME=svm TIMEOUT=450s MACHINE= ACCEL= ./x86/run x86/svm.flat -smp $MAX_SMP '
                    '-append "-pause_filter_test -svm_unsupported_instruction_intercept_test" -cpu max,+svm -m 4g')
    x2apic = unit_tests()["x2apic"]
    assert "-append" not in kut.command_line(x2apic, CONFIG_MAK, 30)


def test_guest_command_evaluates_the_line_under_bash_and_keeps_the_status(tmp_path: Path) -> None:
    """stdout and stderr come back through pipes (x86/run reopens /dev/fd/N), the status survives them."""
    script = tmp_path / "x86" / "run"
    script.parent.mkdir()
    script.write_text('#!/bin/bash\necho "args: $*" > /dev/fd/1\necho oops | tee /dev/stderr >/dev/null\nexit 77\n')
    script.chmod(0o755)
    command = kut.guest_command(tmp_path, 'TESTNAME=t ./x86/run x86/t.flat -smp $MAX_SMP -append "a b"', 3)
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (77, "args: x86/t.flat -smp 3 -append a b\n", "oops\n")


LOG_PASS = "timeout -k 1s --foreground 450s qemu ...\nenabling apic\nPASS: a\nSUMMARY: 3 tests\n"


@pytest.mark.parametrize(("status", "stdout", "stderr", "verdict", "message"), [
    (0, LOG_PASS, "", "passed", "PASS t (3 tests)"),
    (77, "cmd\nWARNING: vmx not supported, add '-cpu host'\nSUMMARY: 0 tests\n", "", "skipped",
     "SKIP t (0 tests): WARNING: vmx not supported, add '-cpu host'"),
    (124, "cmd\nenabling apic\n", "", "failed", "FAIL t (timeout; duration=450s)"),
    (137, "cmd\nenabling apic\n", "", "failed", "FAIL t (terminated on SIGKILL)"),
    (3, "cmd\nFAIL: x\nSUMMARY: 2 tests, 1 unexpected failures\n", "", "failed",
     "FAIL t (2 tests, 1 unexpected failures) (exit status 3, most likely the unittest failed); "
     "first failure: FAIL: x"),
    # QEMU could not start with the test's options: the runner's premature failure, a SKIP with its last line
    (1, "cmd\n", "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory\n", "skipped",
     "SKIP t (qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory)"),
])
def test_exit_statuses_mean_what_the_runner_says(
    status: int, stdout: str, stderr: str, verdict: str, message: str,
) -> None:
    test = kut.UnitTest(name="t", file="t.flat", line=1)
    result = kut.outcome(test, status, stdout, stderr, 450)
    assert (result.verdict, result.message) == (verdict, message)


def test_status_one_after_the_test_printed_is_a_failure() -> None:
    test = kut.UnitTest(name="t", file="t.flat", line=1)
    result = kut.outcome(test, 1, "cmd\nenabling apic\nPASS: a\n", "", 450)
    assert result.verdict == "failed" and "exit status 1, most likely QEMU failed" in result.message


def test_timeouts_scale_with_tcg_and_depth() -> None:
    assert scaled_timeout(90, "kvm", 1) == 90
    assert scaled_timeout(90, "tcg", 1) == 450
    assert scaled_timeout(90, "tcg", 2) == 900
    assert timeout_note(90, "tcg", 1) == "90 s x 5 (TCG) x 1 (L1) = 450 s"


# -- the tree ------------------------------------------------------------------------------------


def test_tree_validation_says_how_to_fix_it(tmp_path: Path) -> None:
    assert kut.validate_tree(built_tree(tmp_path / "good")) == tmp_path / "good"
    with pytest.raises(ValueError, match=r"no x86/unittests.cfg\): pass the top directory"):
        kut.validate_tree(tmp_path)
    unbuilt = built_tree(tmp_path / "unbuilt", flats=())
    with pytest.raises(ValueError, match=r"is not built \(no built x86/\*.flat\): run ./configure && make in it"):
        kut.validate_tree(unbuilt)
    (tmp_path / "good" / "config.mak").unlink()
    with pytest.raises(ValueError, match=r"no config.mak\): run ./configure && make"):
        kut.validate_tree(tmp_path / "good")


# -- KTAP -----------------------------------------------------------------------------------------

KTAP = """\
TAP version 13
1..4
# Random seed: 0x6b8b4567
ok 1 vmx_tsc_adjust
not ok 2 sync_regs - bad rax
ok 3 # SKIP - Requirement not met: kvm_cpu_has(X86_FEATURE_AMX_TILE)
    1..2
    ok 1 inner one
    not ok 2 inner two
not ok 4 # error weird
# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:1
"""


def test_ktap_results_directives_and_nesting() -> None:
    report = ktap.parse(KTAP)
    assert report.planned == 4 and report.plan_skip is None
    statuses = [(r.number, r.name, r.status, r.reason, r.depth) for r in report.results]
    assert statuses == [
        (1, "vmx_tsc_adjust", "pass", "", 0),
        (2, "sync_regs - bad rax", "fail", "", 0),
        (3, "", "skip", "Requirement not met: kvm_cpu_has(X86_FEATURE_AMX_TILE)", 0),
        (1, "inner one", "pass", "", 2),
        (2, "inner two", "fail", "", 2),
        (4, "weird", "error", "", 0),
    ]
    assert [r.line for r in report.failed] == ["not ok 2 sync_regs - bad rax", "not ok 2 inner two", "not ok 4 weird"]
    assert report.skip_reason == "Requirement not met: kvm_cpu_has(X86_FEATURE_AMX_TILE)"


def test_ktap_whole_test_skip_and_bail_out() -> None:
    skipped = ktap.parse("TAP version 13\n1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_XSAVE2)\n")
    assert skipped.planned == 0 and skipped.skip_reason == "Requirement not met: kvm_has_cap(KVM_CAP_XSAVE2)"
    bailed = ktap.parse("1..3\nok 1 a\nBail out! no /dev/kvm\n")
    assert bailed.bail_out == "no /dev/kvm" and [r.status for r in bailed.results] == ["pass"]


def test_ktap_xfail_and_hash_inside_a_name() -> None:
    report = ktap.parse("ok 1 # XFAIL known thing\nok 2 name with # inside\n")
    assert [(r.name, r.status) for r in report.results] == [("known thing", "xfail"), ("name with # inside", "pass")]


# -- selftests ------------------------------------------------------------------------------------


def elf(path: Path, e_type: int = 2, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF" + b"\0" * 12 + e_type.to_bytes(2, "little") + b"\0" * 46)
    path.chmod(mode)
    return path


def test_selftests_are_the_executable_programs_of_the_tree(tmp_path: Path) -> None:
    elf(tmp_path / "x86_64" / "vmx_tsc_adjust_test")
    elf(tmp_path / "demand_paging_test", e_type=3)
    elf(tmp_path / "lib" / "kvm_util.o", e_type=1, mode=0o644)
    elf(tmp_path / "x86_64" / "stale.o", e_type=1)  # an object, executable or not
    elf(tmp_path / "x86_64" / "not_built", mode=0o644)
    (tmp_path / "x86_64" / "script.sh").write_text("#!/bin/sh\n")
    (tmp_path / "x86_64" / "script.sh").chmod(0o755)
    (tmp_path / "libkvm.a").write_bytes(b"!<arch>\n")
    suite = kselftests.discover(tmp_path)
    assert suite.root == tmp_path and suite.tests == ("demand_paging_test", "x86_64/vmx_tsc_adjust_test")


def test_an_installed_tree_lists_its_tests(tmp_path: Path) -> None:
    elf(tmp_path / "kvm" / "x86_64" / "amx_test")
    elf(tmp_path / "kvm" / "x86_64" / "other_program")
    (tmp_path / "kselftest-list.txt").write_text("kvm:x86_64/amx_test\nkvm:x86_64/missing\nnet:foo\n")
    suite = kselftests.discover(tmp_path)
    assert suite.root == tmp_path / "kvm" and suite.tests == ("x86_64/amx_test",)


def test_a_tree_without_binaries_says_to_build_it(tmp_path: Path) -> None:
    (tmp_path / "x86_64").mkdir()
    (tmp_path / "x86_64" / "vmx_tsc_adjust_test.c").write_text("int main(void) {}\n")
    with pytest.raises(ValueError, match="holds no KVM selftest binaries: run make in tools/testing/selftests/kvm"):
        kselftests.discover(tmp_path)


def test_settings_timeout() -> None:
    assert kselftests.parse_settings_timeout(None) == 45
    assert kselftests.parse_settings_timeout("timeout=120\n") == 120
    assert kselftests.parse_settings_timeout("# timeout=1\n") == 45
    with pytest.raises(ValueError, match="not a whole number"):
        kselftests.parse_settings_timeout("timeout=soon\n")


def test_guest_command_runs_from_the_tests_directory() -> None:
    assert kselftests.guest_command(Path("/k/kvm"), "x86_64/amx_test") == "cd /k/kvm/x86_64 && ./amx_test 2>&1"


ASSERTION = """\
==== Test Assertion Failure ====
  x86_64/sync_regs_test.c:123: run->s.regs.regs.rbx == 0xBAD1DEA + 1
  pid=42 tid=42 errno=4 - Interrupted system call
     1	0x0000000000401e31: main at sync_regs_test.c:123
  rbx was 0x0 instead
"""


@pytest.mark.parametrize(("status", "output", "verdict", "message"), [
    (0, KTAP, "passed", "ok x86_64/t"),
    (4, "1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_XSAVE2)\n", "skipped",
     "x86_64/t: SKIP Requirement not met: kvm_has_cap(KVM_CAP_XSAVE2)"),
    (4, "no plan here\nsome last words\n", "skipped", "x86_64/t: SKIP some last words"),
    (1, KTAP, "failed",
     "x86_64/t: exit=1; failed subtests: not ok 2 sync_regs - bad rax; not ok 2 inner two; not ok 4 weird"),
    (254, ASSERTION, "failed", "x86_64/t: exit=254; x86_64/sync_regs_test.c:123: run->s.regs.regs.rbx == "
     "0xBAD1DEA + 1 pid=42 tid=42 errno=4 - Interrupted system call 1\t0x0000000000401e31: main at "
     "sync_regs_test.c:123"),
    (None, "1..2\nok 1 a\n", "failed", "x86_64/t: TIMEOUT 600 seconds, killed"),
])
def test_selftest_verdicts(status: int | None, output: str, verdict: str, message: str) -> None:
    result = kselftests.outcome("x86_64/t", status, output, 600)
    assert (result.verdict, result.message) == (verdict, message)


def test_subtests_become_junit_properties() -> None:
    props = kselftests.properties(ktap.parse(KTAP))
    assert props[:3] == [("ktap 1 vmx_tsc_adjust", "pass"), ("ktap 2 sync_regs - bad rax", "fail"),
                         ("ktap 3", "skip: Requirement not met: kvm_cpu_has(X86_FEATURE_AMX_TILE)")]
    assert ("ktap     2 inner two", "fail") in props


# -- known failures -------------------------------------------------------------------------------


def test_known_failure_file(tmp_path: Path) -> None:
    text = ("# TCG\n\nkut:msr  ends early under TCG\nkselftests:x86_64/amx_test\tno AMX in TCG\n"
            "xtf:test-hvm64-lbr-tsx-vmentry  no LBR in TCG\n")
    known = knownfail.parse(text, tmp_path / "known.txt")
    assert known.lookup("kut", "msr") == knownfail.Entry("ends early under TCG", 3)
    assert known.lookup("kselftests", "x86_64/amx_test") == knownfail.Entry("no AMX in TCG", 4)
    assert known.lookup("xtf", "test-hvm64-lbr-tsx-vmentry") == knownfail.Entry("no LBR in TCG", 5)
    assert known.lookup("kut", "amx_test") is None
    assert known.lookup("kut", "msr").run  # type: ignore[union-attr]


def test_known_failure_patterns_and_tests_known_to_hang(tmp_path: Path) -> None:
    text = ("xtf:test-hvm32pae-*  hangs: spins at its first CPUID\n"
            "xtf:test-hvm32pae-cpuid  fails on its own\n"
            "xtf:test-*-cpuid*  second pattern\n"
            "kut:vmx_*  no VMX\n")
    known = knownfail.parse(text, tmp_path / "known.txt")
    pae = known.lookup("xtf", "test-hvm32pae-argo")
    assert pae == knownfail.Entry("hangs: spins at its first CPUID", 1) and not pae.run
    assert known.lookup("xtf", "test-hvm32pae-cpuid") == knownfail.Entry("fails on its own", 2)  # its own entry
    assert known.lookup("xtf", "test-hvm32pae-cpuid-faulting") == knownfail.Entry("hangs: spins at its first CPUID", 1)
    assert known.lookup("xtf", "test-pv64-cpuid-faulting") == knownfail.Entry("second pattern", 3)
    assert known.lookup("xtf", "test-hvm32-example") is None
    assert known.lookup("kut", "test-hvm32pae-argo") is None  # a pattern is of its own suite
    assert known.lookup("kut", "vmx_apic_passthrough_tpr_threshold_test") == knownfail.Entry("no VMX", 4)


@pytest.mark.parametrize(("text", "error"), [
    ("msr reason\n", r"k.txt:1: 'msr' is not <suite>:<test name> with suite one of kut, kselftests"),
    ("kvm:msr reason\n", r"k.txt:1: 'kvm:msr' is not <suite>:<test name>"),
    ("# c\nkut:msr\n", r"k.txt:2: kut:msr has no reason: write why it fails after the name"),
    ("kut:msr a\nkut:msr b\n", r"k.txt:2: kut:msr is listed twice \(first on line 1\): keep one entry"),
    ("xtf:test-hvm32pae-*  hangs: \n", r"k.txt:1: xtf:test-hvm32pae-\* has no reason: write why it fails after the "
                                       r"name \(and after 'hangs:'\)"),
])
def test_known_failure_file_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        knownfail.parse(text, Path("k.txt"))
