"""QMP through the QEMU project's own library (qemu.qmp), synchronous facade."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..base.deadline import QMP_REPLY, Deadline

# qemu.qmp logs every negotiation at INFO; keep it out of test reports.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


class _Monitor(QEMUMonitorProtocol):
    def connect_within(self, timeout: float) -> None:
        """connect(), bounded: the legacy facade waits forever for an answer, and a QEMU inside a
        guest that dies after its greeting never closes the stream (the parent's port stays open)."""
        self._qmp.await_greeting = self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout)


class Qmp:
    """One QMP connection to a running QEMU's control socket, negotiated by `deadline`."""

    def __init__(self, address: Path | socket.socket, deadline: Deadline) -> None:
        self._qmp = _Monitor(address if isinstance(address, socket.socket) else str(address))
        timeout = deadline.remaining()
        try:
            self._qmp.connect_within(timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"QMP did not answer within {timeout:.1f} s") from None
        self._qmp.settimeout(QMP_REPLY)  # later commands: the monitor outlives the deadline it was connected by

    def command(self, name: str, **arguments: Any) -> Any:
        return self._qmp.cmd(name, **arguments)

    def query_kvm(self) -> dict[str, bool]:
        """{'enabled': ..., 'present': ...}: whether this QEMU really runs on KVM."""
        result = self.command("query-kvm")
        return {"enabled": bool(result["enabled"]), "present": bool(result["present"])}

    def forwarded_port(self, guest_port: int) -> int | None:
        """The host port QEMU's user network forwards to `guest_port` (HMP `info usernet`; no QMP query has it)."""
        table = self.command("human-monitor-command", **{"command-line": "info usernet"})
        for line in str(table).splitlines():
            # TCP[HOST_FORWARD]  8  127.0.0.1 41063  10.0.2.15  22  0  0
            fields = line.split()
            if len(fields) >= 6 and fields[0] == "TCP[HOST_FORWARD]" and fields[5] == str(guest_port):
                return int(fields[3])
        return None

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """Events QEMU sent since the last call, waiting up to `wait` s for a first one.

        Also after QEMU has exited: what it sent before closing the socket is kept.
        """
        try:
            return list(self._qmp.get_events(wait=wait or False))
        except (asyncio.TimeoutError, OSError, QMPError):
            return []

    def quit(self) -> None:
        self.command("quit")

    def close(self) -> None:
        try:
            self._qmp.close()
        except (EOFError, OSError, QMPError):
            pass  # QEMU already closed its end: there is nothing left to say goodbye to
