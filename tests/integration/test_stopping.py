"""A pytest stopped from outside (SIGTERM from a CI runner or `timeout`, Ctrl-C, a closed terminal's
SIGHUP, Ctrl-\\'s SIGQUIT) still removes its run directory (private key, console logs) and leaves
no QEMU behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import qemu_processes  # type: ignore[import-not-found]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT],
                         ids=["SIGTERM", "Ctrl-C", "SIGHUP", "SIGQUIT"])
def test_a_stopped_session_removes_its_run_directory(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stop: signal.Signals
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the run directory goes here, where we can watch it
    pytester.makepyfile(
        """
        import time

        def test_waits(l1):
            l1.succeed("true")
            l1.ssh  # the session key is in use too
            print("GUEST UP", flush=True)
            time.sleep(600)
        """
    )
    before = qemu_processes()
    # The signal must reach the inner pytest whatever this process inherited: a background job of a
    # non-interactive shell (CI started as `.ci/run &`) starts with SIGINT ignored, nohup ignores
    # SIGHUP. The child sets its own dispositions (as a terminal's would be) before pytest starts.
    inner = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)]; "
             "sys.exit(pytest.main(sys.argv[1:]))")
    process = pytester.popen([sys.executable, "-c", inner, "-s", "-p", "no:cacheprovider"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "GUEST UP" in line:
            break
    else:
        pytest.fail("the inner session ended before its guest was up:\n" + "".join(seen))
    run_dirs = list(tmp.glob("nestedkvm-*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / "ssh" / "id_ed25519").is_file()
    process.send_signal(stop)
    output = "".join(seen) + process.stdout.read()  # to the end: the session is over
    assert process.wait(timeout=120) == pytest.ExitCode.INTERRUPTED, output
    assert not run_dirs[0].exists(), output
    assert qemu_processes() <= before
