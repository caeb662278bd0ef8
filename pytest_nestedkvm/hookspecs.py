"""Hooks a conftest.py (or another plugin) implements to change what the guests are.

Registered through `pytest_addhooks`. The plugin's own defaults run last, so any
implementation in a user's conftest comes first. Each guest goes through them in
this order: guest_spec -> qemu_argv -> (boot) -> guest_ready ... guest_teardown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import pytest

    from .boot.qemu import GuestSpec
    from .machine.guest import Guest

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_nestedkvm_guest_spec(config: pytest.Config, level: int, spec: GuestSpec) -> GuestSpec | None:
    """Supply or edit what to boot at `level`; the first non-None result wins.

    `spec` is the plugin's built-in guest for that level (host kernel, plugin
    initramfs, and `view`: the sealed view's read-only exports). Return an edited copy, or None to
    leave it to the next implementation (the plugin's own returns `spec`)::

        import dataclasses

        def pytest_nestedkvm_guest_spec(config, level, spec):
            if level == 2:
                return dataclasses.replace(spec, memory_mib=768, append="nokaslr")
            return None

    Called once per level and session; a restarted guest boots the same spec.
    """


@hookspec
def pytest_nestedkvm_qemu_argv(config: pytest.Config, spec: GuestSpec, argv: list[str]) -> None:
    """The last word on a guest's QEMU command line: edit `argv` in place.

    Runs whenever the plugin builds a guest's command line from `spec`, before
    that QEMU starts. For L2 and deeper the argv runs inside the parent guest::

        def pytest_nestedkvm_qemu_argv(config, spec, argv):
            if spec.level == 1:
                argv += ["-device", "virtio-rng-pci"]

    For a Xen domU (`spec.domu`, L2 with --nested-hypervisor=xen) the argv is
    `xl create -F /dev/null KEY=VALUE ...`, its whole config: append an xl.cfg
    setting (`argv.append("vcpus=2")`); a later one wins.
    """


@hookspec
def pytest_nestedkvm_guest_ready(config: pytest.Config, guest: Guest) -> None:
    """Provision `guest` right after it booted, before any test uses it.

    Called after every boot, a restart after a crash included (each boot starts
    pristine), so it is the place to copy a test binary in or load a module::

        def pytest_nestedkvm_guest_ready(config, guest):
            if guest.level == 1:
                guest.succeed("modprobe -q vhost_net || true")
    """


@hookspec
def pytest_nestedkvm_guest_teardown(config: pytest.Config, guest: Guest) -> None:
    """Collect what you need from `guest` before the plugin stops it.

    Called for each guest the plugin stops on purpose (end of session, a
    `nested_fresh` test), deepest level first, while it still answers::

        def pytest_nestedkvm_guest_teardown(config, guest):
            dmesg = guest.succeed("dmesg")
            (config.rootpath / f"{guest.name}-dmesg.txt").write_text(dmesg)
    """
