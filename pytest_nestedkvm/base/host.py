"""L0 (host) probe: what the host offers and which accelerator and CPU model L1 gets.

Every fact is read from files under a ``root`` directory (``/`` on a real host) so unit
tests can hand in a fake procfs/sysfs tree. Host quirks are small named predicates;
:func:`probe` only combines them and writes down, in words, why each decision was made.

Measured on our own machines (the project's DESIGN.md, section 2, "Facts measured on our
machines"): ``/dev/kvm`` can open fine and still be
useless, because it is provided by ``kvm_pvm``, which cannot run an unmodified guest. So
"usable" means: device openable *and* backed by kvm_intel or kvm_amd.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .deadline import QEMU_VERSION_PROBE
from .errors import ConfigError, HostError

Accel = Literal["kvm", "tcg"]  # what L1 runs on
AccelChoice = Literal["auto", "kvm", "tcg"]  # what a user may ask for
ACCELS: tuple[AccelChoice, ...] = get_args(AccelChoice)
# The KVM module that drives each CPU virtualization flag (the one place these names live).
KVM_MODULE_BY_FLAG = {"vmx": "kvm_intel", "svm": "kvm_amd"}
HARDWARE_BACKENDS = tuple(KVM_MODULE_BY_FLAG.values())
# Checked in this order: a hardware module wins over kvm_pvm when both are loaded, since
# the hardware one is what an ordinary guest needs and what /dev/kvm normally belongs to.
KNOWN_BACKENDS = (*HARDWARE_BACKENDS, "kvm_pvm")
VIRT_FLAGS = tuple(KVM_MODULE_BY_FLAG)
VENDOR_IDS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
# Debian package that ships qemu-system-<arch>, for the "not found" hint.
QEMU_PACKAGES = {
    "x86_64": "qemu-system-x86",
    "i686": "qemu-system-x86",
    "aarch64": "qemu-system-arm",
}

Runner = Callable[..., "subprocess.CompletedProcess[Any]"]


# QEMU's seccomp filter for L1's QEMU on the host: no obsolete system calls, no setuid and
# friends, no fork/exec, no changes of scheduling or limits. None of them is needed once the
# guest runs (user networking, virtio-9p and chardev sockets do without).
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class QemuInfo:
    binary: str  # absolute path
    version: str  # e.g. "7.2.22"
    sandbox: bool = False  # built with seccomp: takes -sandbox QEMU_SANDBOX

    @property
    def release(self) -> tuple[int, ...]:
        """(major, minor) of `version`, to compare: (7, 2) for "7.2.22"."""
        return tuple(int(part) for part in self.version.split(".")[:2])


# The oldest QEMU whose options the plugin uses (-action panic=exit-failure came with 6.0).
QEMU_MIN_VERSION = (6, 0)


@dataclass(frozen=True)
class QemuBuild:
    """A QEMU the user chose (--nested-qemu): its binary, a build tree's firmware, what it said."""

    binary: Path
    firmware: Path | None  # a build directory's pc-bios/, given to QEMU with -L
    info: QemuInfo

    @property
    def directory(self) -> Path:
        return self.binary.parent

    def __str__(self) -> str:
        return str(self.binary)


def qemu_build(path: Path, arch: str | None = None) -> QemuBuild:
    """A qemu-system binary, or a QEMU build directory holding qemu-system-<arch> (and pc-bios/);
    ValueError, in words, for anything else or a QEMU older than QEMU_MIN_VERSION."""
    name = f"qemu-system-{arch or platform.machine()}"
    binary = path / name if path.is_dir() else path
    if path.is_dir() and not binary.is_file():
        raise ValueError(f"{path} is a directory without {name}: build QEMU there (make), or pass the binary")
    if not binary.is_file():
        raise ValueError(f"{path} does not exist: pass a qemu-system binary or a QEMU build directory")
    if not os.access(binary, os.X_OK):
        raise ValueError(f"{binary} is not executable: chmod +x it, or pass another QEMU")
    try:
        info = qemu_facts(str(binary.resolve()))
    except HostError as exc:
        raise ValueError(f"{binary} is not a QEMU that works here: {exc}") from None
    if info.release < QEMU_MIN_VERSION:
        need = ".".join(map(str, QEMU_MIN_VERSION))
        raise ValueError(f"{binary} is QEMU {info.version}; the plugin needs {need} or newer")
    firmware = binary.parent / "pc-bios"
    return QemuBuild(binary.resolve(), firmware.resolve() if firmware.is_dir() else None, info)


@dataclass(frozen=True)
class HostReport:
    arch: str
    vendor: str | None
    virt_flags: tuple[str, ...]
    in_vm: bool
    kvm_device: bool
    kvm_openable: bool
    kvm_backend: str | None
    kvm_usable: bool
    nested: bool | None
    accel: Accel
    cpu: str
    qemu: QemuInfo | None
    reasons: list[str]
    nesting_possible: bool
    nesting_fix: str | None
    # The CPU is QEMU's TCG (model name "QEMU TCG CPU ..."): this host is itself emulated, so
    # its KVM guests run emulated too (nested SVM on TCG), at TCG's pace, not hardware's.
    cpu_emulated: bool = False

    @property
    def pace(self) -> Accel:
        """The accelerator whose speed guests here run at: TCG's on an emulated CPU, even with KVM."""
        return "tcg" if self.cpu_emulated else self.accel

    @property
    def kvm_on_emulated_cpu(self) -> bool:
        """KVM whose SVM is itself emulated by TCG (this plugin's own L1, a KVM host inside TCG)."""
        return self.accel == "kvm" and self.cpu_emulated

    def as_dict(self) -> dict[str, object]:
        """Every field, JSON-serialisable (tuples become lists, QemuInfo a dict)."""
        data: dict[str, object] = asdict(self)
        data["virt_flags"] = list(self.virt_flags)
        data["reasons"] = list(self.reasons)
        return data

    def summary_lines(self) -> list[str]:
        """One line with the plan, one with the reason that decided the accelerator."""
        if self.qemu is None:
            qemu = "QEMU not found"
        else:
            qemu = f"QEMU {self.qemu.version} {self.qemu.binary}"
        if self.nesting_possible:
            nesting = "nesting possible"
        else:
            nesting = f"nesting NOT possible: {self.nesting_fix}"
        lines = [f"nestedkvm: L1 accel={self.accel} cpu={self.cpu} ({qemu}); {nesting}"]
        if self.reasons:
            lines.append(f"nestedkvm: {self.reasons[0]}")
        return lines


# --- reading the tree ---------------------------------------------------------------


def read_text_or_none(path: Path) -> str | None:
    """File content stripped, or None when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def cpuinfo_field(root: Path, name: str) -> str | None:
    """Value of ``name`` for the first processor in proc/cpuinfo (all CPUs agree on x86)."""
    text = read_text_or_none(root / "proc" / "cpuinfo")
    if text is None:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(root: Path) -> frozenset[str]:
    return frozenset((cpuinfo_field(root, "flags") or "").split())


def cpu_vendor(root: Path) -> str | None:
    return VENDOR_IDS.get(cpuinfo_field(root, "vendor_id") or "")


def cpu_is_tcg(root: Path) -> bool:
    """QEMU names the CPU it emulates with TCG "QEMU TCG CPU version ..." (-cpu max)."""
    return (cpuinfo_field(root, "model name") or "").startswith("QEMU TCG CPU")


def module_loaded(root: Path, name: str) -> bool:
    """Loaded or built in: both appear as sys/module/<name>."""
    return (root / "sys" / "module" / name).is_dir()


def module_is_builtin(root: Path, name: str) -> bool:
    """Built-in modules have no refcnt/initstate, so they cannot be reloaded with modprobe."""
    mod = root / "sys" / "module" / name
    return (
        mod.is_dir()
        and not (mod / "refcnt").exists()
        and not (mod / "initstate").exists()
    )


def module_refcnt(root: Path, name: str) -> int | None:
    raw = read_text_or_none(root / "sys" / "module" / name / "refcnt")
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def kvm_backend(root: Path) -> str | None:
    for name in KNOWN_BACKENDS:
        if module_loaded(root, name):
            return name
    return "other" if module_loaded(root, "kvm") else None


def nested_raw(root: Path, backend: str | None) -> str | None:
    """The nested parameter as the kernel prints it ("Y"/"N" for intel, "1"/"0" for amd)."""
    if backend not in HARDWARE_BACKENDS:
        return None
    return read_text_or_none(root / "sys" / "module" / str(backend) / "parameters" / "nested")


def parse_nested(raw: str | None) -> bool | None:
    if raw in ("Y", "y", "1"):
        return True
    if raw in ("N", "n", "0"):
        return False
    return None


def kvm_device_exists(root: Path) -> bool:
    return os.path.exists(root / "dev" / "kvm")


def kvm_device_openable(root: Path) -> bool:
    """QEMU opens /dev/kvm O_RDWR; a directory or missing permission fails here as there."""
    try:
        fd = os.open(root / "dev" / "kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def backend_runs_unmodified_guest(backend: str | None) -> bool:
    # kvm_pvm only runs PVM-aware guests: QEMU aborts ("failed to set MSR 0x10a") with
    # -cpu host and a stock kernel hangs after "Probing EDD" with -cpu qemu64 (measured).
    return backend in HARDWARE_BACKENDS


# --- CPU model predicates --------------------------------------------------------------


def _cpu_features(cpu: str) -> tuple[str, dict[str, bool]]:
    """Split a QEMU -cpu value "model,+f,-g,h=on" into the model and explicit features."""
    model, *parts = cpu.split(",")
    features: dict[str, bool] = {}
    for part in parts:
        if part.startswith(("+", "-")):
            features[part[1:]] = part[0] == "+"
        elif "=" in part:
            key, _, value = part.partition("=")
            features[key] = value.lower() in ("on", "true", "yes", "1")
        elif part:
            features[part] = True  # QEMU reads a bare feature name as "feature=on"
    return model, features


def tcg_cpu_has_svm(cpu: str) -> bool:
    """TCG emulates AMD SVM (in "max" by default) but not Intel VMX (QEMU warns and drops it)."""
    model, features = _cpu_features(cpu)
    return features.get("svm", model == "max")


def cpu_disables_virt(cpu: str) -> bool:
    """Under KVM the guest sees vmx/svm unless the -cpu value turns them off explicitly."""
    _, features = _cpu_features(cpu)
    return any(features.get(flag) is False for flag in VIRT_FLAGS)


def default_cpu(accel: str) -> str:
    return "host" if accel == "kvm" else "max"


# --- probe --------------------------------------------------------------------------


def _unusable_kvm_reason(
    *,
    device: bool,
    openable: bool,
    backend: str | None,
    flags: frozenset[str],
    in_vm: bool,
) -> str | None:
    """Why KVM cannot run an ordinary guest, or None when it can."""
    if not device:
        if in_vm and not flags & set(VIRT_FLAGS):
            return (
                "/dev/kvm does not exist and this host is itself a VM whose CPU shows neither "
                "vmx nor svm (the outer hypervisor does not pass virtualisation through)"
            )
        if "vmx" in flags:
            return "/dev/kvm does not exist although the CPU has vmx (`modprobe kvm_intel` loads it)"
        if "svm" in flags:
            return "/dev/kvm does not exist although the CPU has svm (`modprobe kvm_amd` loads it)"
        return "/dev/kvm does not exist and the CPU shows neither vmx nor svm"
    if not openable:
        return (
            f"/dev/kvm exists but cannot be opened read-write by uid {os.geteuid()} "
            "(add the user to the 'kvm' group)"
        )
    if backend_runs_unmodified_guest(backend):
        return None
    if backend == "kvm_pvm":
        return "/dev/kvm is provided by kvm_pvm, which cannot run an unmodified guest"
    if backend == "other":
        return "/dev/kvm is provided by a KVM backend other than kvm_intel or kvm_amd"
    return "/dev/kvm exists but no KVM module is listed under /sys/module"


def _accel_name(accel: str) -> str:
    return "KVM" if accel == "kvm" else "TCG"


def _nesting(
    accel: str, cpu: str, backend: str | None, raw_nested: str | None, root: Path
) -> tuple[bool, str, str | None]:
    """(possible, reason sentence, fix) for L1 hosting an L2 on KVM."""
    if accel == "tcg":
        if tcg_cpu_has_svm(cpu):
            return (
                True,
                f"TCG with -cpu {cpu} emulates AMD SVM: L1 can load kvm_amd and run L2 on KVM.",
                None,
            )
        why = (
            f"TCG with -cpu {cpu} gives L1 no svm (TCG cannot emulate Intel VMX at all)"
        )
        return (
            False,
            f"{why}: L1 cannot run L2 on KVM.",
            f"{why}: pass --nested-cpu max (or add +svm)",
        )
    module = str(backend)
    nested = parse_nested(raw_nested)
    if nested is None:
        why = f"cannot read /sys/module/{module}/parameters/nested"
        return (
            False,
            f"{why}: L1 may not see vmx/svm.",
            f"{why}: check that {module} supports nesting",
        )
    if not nested:
        why = f"{module} nested={raw_nested}"
        if module_is_builtin(root, module):
            fix = (
                f"{why}: {module} is built into the kernel; "
                f"add {module}.nested=1 to the kernel command line and reboot"
            )
        else:
            fix = f"{why}: run `modprobe -r {module} && modprobe {module} nested=1`, or pass --nested-enable"
        return False, f"{why}: L1 gets no vmx/svm and cannot run L2 on KVM.", fix
    if cpu_disables_virt(cpu):
        why = f"-cpu {cpu} turns vmx/svm off"
        return (
            False,
            f"{why}: L1 cannot run L2 on KVM.",
            f"{why}: drop -vmx/-svm from --nested-cpu",
        )
    return (
        True,
        f"{module} nested={raw_nested}: L1 sees vmx/svm and can run L2 on its own KVM.",
        None,
    )


def probe(
    root: Path = Path("/"),
    *,
    accel: str = "auto",
    cpu: str | None = None,
    qemu: QemuInfo | None = None,
    arch: str | None = None,
) -> HostReport:
    """Diagnose the host under ``root`` and plan L1's accelerator and CPU model.

    Raises ConfigError for an unknown ``accel``, for accel="kvm" when KVM cannot run an
    ordinary guest, and for ``-cpu host`` under TCG (QEMU refuses it).
    """
    if accel not in ACCELS:
        raise ConfigError(f"accelerator {accel!r} is not one of {', '.join(ACCELS)}", option="accel")
    arch = arch or platform.machine()
    flags = cpu_flags(root)
    in_vm = "hypervisor" in flags
    device = kvm_device_exists(root)
    openable = device and kvm_device_openable(root)
    backend = kvm_backend(root)
    raw_nested = nested_raw(root, backend)
    unusable = _unusable_kvm_reason(device=device, openable=openable, backend=backend, flags=flags, in_vm=in_vm)
    usable = unusable is None
    chosen, cpu_value = _choose(accel, cpu, unusable)
    reasons = _accel_reasons(unusable, chosen, cpu_value, backend, flags, root)
    possible, nesting_reason, fix = _nesting(chosen, cpu_value, backend, raw_nested, root)
    reasons.append(nesting_reason)
    emulated = cpu_is_tcg(root)
    if emulated and chosen == "kvm":
        reasons.append("This host's CPU is QEMU's TCG emulation: its KVM guests run emulated too, "
                       "so boot and command budgets are TCG's.")
    if qemu is None:
        reasons.append(f"qemu-system-{arch} not found: apt-get install {QEMU_PACKAGES.get(arch, 'qemu-system')}")
    return HostReport(
        arch=arch, vendor=cpu_vendor(root), virt_flags=tuple(flag for flag in VIRT_FLAGS if flag in flags),
        in_vm=in_vm, kvm_device=device, kvm_openable=openable, kvm_backend=backend, kvm_usable=usable,
        nested=parse_nested(raw_nested), accel=chosen, cpu=cpu_value, qemu=qemu, reasons=reasons,
        nesting_possible=possible, nesting_fix=fix, cpu_emulated=emulated,
    )


def _choose(accel: str, cpu: str | None, unusable: str | None) -> tuple[Accel, str]:
    """L1's accelerator and -cpu value; ConfigError when they contradict what the host can do."""
    if accel == "kvm" and unusable is not None:
        raise ConfigError(f"accelerator kvm requested but {unusable}: use --nested-accel=auto or tcg", option="accel")
    chosen: Accel = "kvm" if accel == "kvm" or (accel == "auto" and unusable is None) else "tcg"
    cpu_value = cpu or default_cpu(chosen)
    if chosen == "tcg" and _cpu_features(cpu_value)[0] == "host":
        raise ConfigError(f"-cpu {cpu_value} needs KVM but L1 uses TCG: use --nested-cpu max",
                          option="cpu" if cpu else "accel")
    return chosen, cpu_value


def _accel_reasons(
    unusable: str | None, chosen: Accel, cpu: str, backend: str | None, flags: frozenset[str], root: Path
) -> list[str]:
    """The sentences that explain the accelerator plan: why this accelerator, and what L0 is."""
    plan = f"L1 uses {_accel_name(chosen)} with -cpu {cpu}."
    reasons: list[str] = []
    if unusable is not None:
        reasons.append(f"{unusable}: {plan}")
    elif chosen == "tcg":
        reasons.append(f"KVM is usable ({backend}) but TCG was requested: {plan}")
    else:
        reasons.append(f"/dev/kvm is provided by {backend}: {plan}")
    if "hypervisor" in flags:
        seen = ", ".join(sorted(flags & set(VIRT_FLAGS))) or "neither vmx nor svm"
        reasons.append(f"The host is itself a VM (cpuinfo flag 'hypervisor'); its CPU shows {seen}.")
    if backend in HARDWARE_BACKENDS and module_loaded(root, "kvm_pvm"):
        reasons.append(f"kvm_pvm is loaded next to {backend}; assuming /dev/kvm belongs to {backend}.")
    return reasons


# --- QEMU lookup --------------------------------------------------------------------

_VERSION_RE = re.compile(r"version\s+(\d+(?:\.\d+)+)")


def qemu_facts(binary: str) -> QemuInfo:
    """Its version, and whether it takes -sandbox: one process where it does (QEMU checks the
    option before it prints the version; a build without seccomp has no such option)."""
    with contextlib.suppress(HostError):
        return QemuInfo(binary, qemu_version(binary, "-sandbox", QEMU_SANDBOX), sandbox=True)
    return QemuInfo(binary, qemu_version(binary))


def qemu_version(binary: str, *options: str) -> str:
    """Version from ``<binary> [options] --version``; HostError when the binary does not answer."""
    try:
        proc = subprocess.run(
            [binary, *options, "--version"],
            capture_output=True,
            text=True,
            timeout=QEMU_VERSION_PROBE,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{binary} --version failed: {exc}") from exc
    match = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise HostError(
            f"{binary} --version exited {proc.returncode} without a version: "
            f"{output[0] if output else '(no output)'}"
        )
    return match.group(1)


def find_qemu(arch: str, override: str | None = None) -> QemuInfo | None:
    """The QEMU system emulator for ``arch``: ``override`` (a path or name) or the one on PATH.

    None when the default binary is absent; ConfigError when an explicit override is absent,
    since the user asked for that binary by name.
    """
    name = override or f"qemu-system-{arch}"
    found = shutil.which(name)
    if found is None:
        if override is not None:
            raise ConfigError(f"QEMU binary {override!r} not found or not executable")
        return None
    binary = os.path.abspath(found)
    return qemu_facts(binary)


# --- enabling nesting ---------------------------------------------------------------


def _manual_commands(module: str) -> str:
    return f"`modprobe -r {module} && modprobe {module} nested=1`"


def enable_nested(
    report: HostReport, root: Path = Path("/"), run: Runner = subprocess.run
) -> list[str]:
    """Reload kvm_intel/kvm_amd with nested=1 when that is safe; say what was (not) done.

    Safe means: we are root and no VM holds the module (refcnt 0). Otherwise the
    sentences give the exact commands to run by hand. Never raises for these cases.
    """
    refusal = _why_not_reload(report, root)
    if refusal is not None:
        return [refusal]
    module = str(report.kvm_backend)
    done: list[str] = []
    for argv in (["modprobe", "-r", module], ["modprobe", module, "nested=1"]):
        failure = _run_quietly(run, argv)
        if failure is not None:
            done.append(f"`{' '.join(argv)}` failed: {failure}.")
            return done
        done.append(f"Ran `{' '.join(argv)}`.")
    raw = nested_raw(root, module)
    if parse_nested(raw):
        done.append(
            f"{module} nested now reads {raw}: nesting is enabled (until the next reboot; "
            f"add `options {module} nested=1` to /etc/modprobe.d/ to keep it)."
        )
    else:
        done.append(f"{module} nested still reads {raw}: nesting is NOT enabled.")
    return done


def _why_not_reload(report: HostReport, root: Path) -> str | None:
    """The sentence that says why the module is not reloaded, or None when reloading is safe."""
    module = report.kvm_backend
    if module not in HARDWARE_BACKENDS:
        return f"Nothing to do: nested applies to kvm_intel/kvm_amd, and the KVM backend is {module}."
    assert module is not None  # narrowed by the membership test above
    if report.nested is None:
        return f"Nothing done: /sys/module/{module}/parameters/nested cannot be read."
    if report.nested:
        return f"Nothing to do: {module} nested is already on."
    if module_is_builtin(root, module):
        return (f"Not done: {module} is built into the kernel and cannot be reloaded; "
                f"add {module}.nested=1 to the kernel command line and reboot.")
    euid = os.geteuid()
    if euid != 0:
        return (f"Not done: reloading {module} needs root (euid is {euid}). "
                f"Run by hand as root: {_manual_commands(module)}.")
    refcnt = module_refcnt(root, module)
    if refcnt != 0:
        held = "an unknown number of" if refcnt is None else str(refcnt)
        return (f"Not done: {held} users hold {module} (a VM is probably running); stop them, "
                f"then run {_manual_commands(module)}.")
    return None


def _run_quietly(run: Runner, argv: Sequence[str]) -> str | None:
    """Run argv; None on success, else a short description of what went wrong."""
    try:
        proc = run(list(argv), check=False, capture_output=True)
    except OSError as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    stderr = (
        proc.stderr.decode(errors="replace")
        if isinstance(proc.stderr, bytes)
        else str(proc.stderr or "")
    )
    return f"exit {proc.returncode}" + (f": {stderr.strip()}" if stderr.strip() else "")
