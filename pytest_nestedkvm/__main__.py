"""Small command-line tools: ``python -m pytest_nestedkvm check [--json]``.

Exit codes of ``check``: 0 nesting is possible, 1 it is not, 2 a bad setting or a host
problem that prevented the diagnosis (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

from pytest_nestedkvm.base.errors import ConfigError, HostError, NestedKvmError
from pytest_nestedkvm.base.host import HostReport, find_qemu, probe
from pytest_nestedkvm.boot.initramfs import cache_dir, find_kernel
from pytest_nestedkvm.boot.xen import HYPERVISORS, packages_line

PROG = "python -m pytest_nestedkvm"


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) or "-"
    return str(value)


def kernel_line() -> str:
    """The kernel the built-in guest would boot here (inside a guest: the one it runs, in /boot)."""
    try:
        kernel = find_kernel()
    except HostError as exc:
        return f"not found: {exc}"
    return f"{kernel.release} {kernel.path}"


def format_report(report: HostReport, kernel: str = "-", extra: dict[str, str] | None = None) -> str:
    """Human form: one ``key: value`` line per fact, then the reasons as bullets."""
    lines: list[str] = []
    for key, value in report.as_dict().items():
        if key == "reasons":
            continue
        if key == "qemu":
            value = (
                "not found"
                if report.qemu is None
                else f"{report.qemu.version} {report.qemu.binary}"
            )
        lines.append(f"{key}: {_format_value(value)}")
    lines.append(f"kernel: {kernel}")
    lines.extend(f"{key}: {value}" for key, value in (extra or {}).items())
    lines.append("reasons:")
    lines.extend(f"  - {reason}" for reason in report.reasons)
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    arch = platform.machine()
    report = probe(accel=args.accel, cpu=args.cpu, qemu=find_qemu(arch), arch=arch)
    if args.hypervisor not in HYPERVISORS:
        raise ConfigError(f"--hypervisor={args.hypervisor!r}: expected one of {', '.join(HYPERVISORS)}")
    extra = {"hypervisor": args.hypervisor}
    if args.hypervisor == "xen":
        extra["xen"] = packages_line(cache_dir())
    if args.json:
        print(json.dumps({**report.as_dict(), "kernel": kernel_line(), **extra}, indent=2))
    else:
        print(format_report(report, kernel_line(), extra))
    return 0 if report.nesting_possible else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="pytest-nestedkvm tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="diagnose the host (L0): KVM, nesting, L1 accelerator",
        description="Diagnose the host (L0). Exit 0 when L1 can host an L2 on KVM.",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    # No argparse choices: probe() validates, so the error is the same one line as in pytest.
    check.add_argument(
        "--accel",
        default="auto",
        metavar="{auto,kvm,tcg}",
        help="accelerator for L1 (default: auto)",
    )
    check.add_argument(
        "--cpu",
        default=None,
        metavar="MODEL",
        help="-cpu value for L1 (default: host for kvm, max for tcg)",
    )
    check.add_argument(
        "--hypervisor",
        default="kvm",
        metavar="{kvm,xen}",
        help="what L1 hosts its guests with (default: kvm); xen also says where Xen's packages come from",
    )
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except NestedKvmError as exc:
        message = " ".join(
            str(exc).split()
        )  # keep it to one line whatever the message holds
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
