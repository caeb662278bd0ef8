"""Bad input against real QEMU: a short message, no hang, no QEMU left behind."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.nested(level=1), pytest.mark.usefixtures("no_qemu_left")]


def test_guest_that_never_boots_is_an_error_quoting_its_console(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_l1(l1):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_subprocess("--nested-append=rdinit=/no/such/init", "--nested-boot-timeout=120")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "BootError: l1 died while booting" in out
    assert "Kernel panic - not syncing" in out
    assert "pool.py" not in out  # the message, not the plugin's stack


def test_boot_timeout_is_an_error_and_kills_qemu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_l1(l1):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_subprocess("--nested-boot-timeout=1")
    result.assert_outcomes(errors=1)
    assert "l1 did not boot within 1 s" in result.stdout.str()


def test_missing_kernel_modules_is_a_short_error(pytester: pytest.Pytester, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake_kernel = tmp_path / "vmlinuz-9.9.9-none"
    fake_kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 1024)  # a setup header, no version string
    pytester.makepyfile("def test_uses_l1(l1):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_subprocess(f"--nested-kernel={fake_kernel}")
    result.assert_outcomes(errors=1)
    assert "HostError: no modules for kernel" in result.stdout.str()
