"""The session's guests, lifecycle only: first use, reuse, a fresh boot after a crash, teardown.

A guest found dead (or wedged) before a test is started again from its pristine spec
(every disk is -snapshot and the built-in guest writes only into its memory, so a restart
is a clean slate). A boot that fails is not tried again here: the session decides, per test,
whether an emulator fault earns the test a rerun (--nested-emulator-reruns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..base.errors import BootError, HostError, LevelUnavailable
from ..base.host import KVM_MODULE_BY_FLAG, parse_nested
from ..boot.xen import domain_name
from .guest import Guest

log = logging.getLogger("pytest_nestedkvm.pool")


def _nothing(guest: Guest) -> None:
    return None


@dataclass(frozen=True)
class LifecycleHooks:
    """The user's say once a guest is up and before it stops (see hookspecs.py); by default, none."""

    guest_ready: Callable[[Guest], None] = _nothing
    guest_teardown: Callable[[Guest], None] = _nothing


class GuestPool:
    """Hands out the running guest of each level; `new(level, parent)` makes one that is not started."""

    def __init__(
        self, new: Callable[[int, Guest | None], Guest], progress: Callable[[str], None] | None = None,
        hooks: LifecycleHooks | None = None,
    ) -> None:
        self.new = new
        self.progress = progress or log.info
        self.hooks = hooks or LifecycleHooks()
        self.guests: dict[int, Guest] = {}
        self.boot_failures: list[tuple[Guest, BootError]] = []  # since the caller last cleared it

    def get(self, level: int) -> Guest:
        """The running guest at `level`, started (or started again) when needed."""
        guest = self.guests.get(level)
        if guest is not None and guest.alive:
            return guest
        parent = self.get(level - 1) if level > 1 else None
        if guest is None or guest.parent is not parent:
            guest = self.guests[level] = self.new(level, parent)
        else:
            self.progress(f"L{level} is down; starting a fresh one")
            guest.close()
        self._boot(guest)
        if parent is not None:
            (verify_domu if guest.spec.domu else verify_kvm)(parent, guest)
        self.progress(f"L{level} ready in {guest.boot_seconds:.1f} s ({guest.spec.runs_as})")
        try:
            self.hooks.guest_ready(guest)
        except BaseException:
            guest.close()  # half-provisioned: the next user gets a fresh boot and provisioning again
            raise
        return guest

    def _boot(self, guest: Guest) -> None:
        """Start `guest`; a failed boot is kept in `boot_failures` for the session to judge."""
        try:
            guest.start()
        except BootError as exc:
            self.boot_failures.append((guest, exc))
            raise
        except LevelUnavailable:
            del self.guests[guest.level]  # its parent cannot run it (never started): none to hand out later
            raise

    def ensure_running(self, level: int) -> None:
        """Boot the guest at `level` again, from its pristine spec, if an earlier test left it down."""
        guest = self.guests.get(level)
        if guest is not None and not guest.alive:
            self.get(level)

    def stop_from(self, level: int) -> None:
        """Stop the guest at `level` and those inside it: their next user gets a fresh boot.
        Every one is stopped; the first guest_teardown hook that raised is raised after."""
        failure: BaseException | None = None
        for deeper in sorted((lv for lv in self.guests if lv >= level), reverse=True):
            try:
                self._stop(self.guests[deeper])
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        try:
            self.stop_from(1)  # deepest first: each needs its parent to stop
        finally:
            self.guests.clear()

    def _stop(self, guest: Guest) -> None:
        try:
            if guest.alive:
                self.hooks.guest_teardown(guest)
        finally:
            guest.close()


def verify_kvm(parent: Guest, guest: Guest) -> None:
    """Prove, before a test sees `guest`, that it really runs on its parent's KVM.

    Checks the parent's CPU flags, its KVM module's nested parameter, and asks the
    child's QEMU itself (QMP query-kvm) so a silent fallback to TCG cannot pass.
    """
    where = f"L{parent.level}"
    flags = parent.succeed(f"grep -m1 -w -o -E '{'|'.join(KVM_MODULE_BY_FLAG)}' /proc/cpuinfo || true").strip()
    if flags not in KVM_MODULE_BY_FLAG:
        raise HostError(f"{where}'s CPU shows neither vmx nor svm, so it cannot run L{guest.level} on KVM: "
                        f"give {where} a CPU model with virtualization (-cpu max under TCG, host under KVM)")
    module = KVM_MODULE_BY_FLAG[flags]
    nested = parent.run(f"cat /sys/module/{module}/parameters/nested").stdout.strip()
    if not parse_nested(nested):
        raise HostError(f"{where} has {module} nested={nested or 'not loaded'}: L{guest.level} cannot use KVM")
    kvm = guest.qmp().query_kvm()
    if not (kvm["present"] and kvm["enabled"]):
        raise HostError(f"L{guest.level}'s QEMU is not using KVM (query-kvm: {kvm}): it fell back to emulation "
                        f"inside {where}")


def verify_domu(parent: Guest, guest: Guest) -> None:
    """Prove, before a test sees the domU `guest`, that Xen runs it hardware-virtualized: its
    domain is HVM (`xl list -l` in dom0) and its kernel sees itself on Xen HVM (/sys/hypervisor, not
    the boot log's `Hypervisor detected` line: ci28's second domU had none in its dmesg)."""
    domain = domain_name(guest.name)
    config = parent.succeed(f"xl list -l {domain}")
    if '"type": "hvm"' not in config:
        kind = next((line.strip() for line in config.splitlines() if '"type":' in line), "no type")
        raise HostError(f"L{guest.level} ({domain}) is not an HVM domU of L{parent.level}'s Xen: "
                        f"`xl list -l` says {kind}")
    seen = guest.run("cat /sys/hypervisor/type /sys/hypervisor/guest_type").stdout.split()
    if seen != ["xen", "HVM"]:
        raise HostError(f"L{guest.level}'s kernel does not see itself on Xen HVM (/sys/hypervisor says "
                        f"{' '.join(seen) or 'nothing'}): it needs CONFIG_XEN_PVHVM to tell")
