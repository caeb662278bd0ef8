"""Settings: one frozen object built from CLI > environment > ini > default.

Every option is declared once in OPTIONS; the plugin registers the CLI flag and
the ini key from that table, and `Settings.from_sources` parses and validates
every value once, naming where a bad value came from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..base.deadline import LDD, QEMU_IMG_INFO
from ..base.errors import ConfigError
from ..base.host import ACCELS, AccelChoice, QemuBuild, qemu_build
from ..boot.kernel_tree import check_image, check_modules, is_tree, tree_image
from ..boot.layout import SYSTEM_DIRS
from ..boot.view import unshareable
from ..boot.xen import HYPERVISORS, Hypervisor, dom0_mib
from ..boot.xen import check_image as check_xen_image
from ..suites import knownfail, kut, xtf
from ..suites import kselftests as kselftests_suite
from ..suites.knownfail import KnownFailures

MAX_LEVELS = 4
MAX_SECONDS = 86400  # a timeout longer than a day is a typo, not a plan
MAX_SHARDS = 1000  # more CI jobs than that, each booting its own guests, is a typo
# A bzImage unpacks to about 4x its size and the guest needs room to run: measured with the
# Debian 6.1 kernel (7.9 MiB), 80 MiB panics "System is deadlocked on memory", 96 MiB boots.
KERNEL_UNPACK_FACTOR = 4
KERNEL_BASE_MIB = 64
XEN_MIB = 64  # what a Xen L1 keeps for itself beside dom0 and the domUs (its heap, the domUs' page tables)


@dataclass(frozen=True)
class Option:
    """One setting: `--nested-<name>`, ini `nested_<name>`, env `NESTEDKVM_<NAME>`."""

    name: str
    help: str
    metavar: str = "VALUE"
    flag: bool = False  # a CLI switch without a value
    parse: Callable[[str], Any] = field(kw_only=True)  # raw text -> value; raises ValueError or OSError

    @property
    def cli(self) -> str:
        return "--nested-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "nested_" + self.name

    @property
    def env(self) -> str:
        return "NESTEDKVM_" + self.name.upper()

    @property
    def dest(self) -> str:
        return "nested_" + self.name





@dataclass(frozen=True)
class Settings:
    levels: int = 1
    accel: AccelChoice = "auto"
    cpu: str | None = None
    l2_cpu: str | None = None
    qemu: tuple[QemuBuild, ...] = ()  # --nested-qemu: the QEMU of L1, L2, ... (the last one for deeper levels)
    qemu_args: tuple[str, ...] = ()
    l2_qemu_args: tuple[str, ...] = ()
    kernel: Path | None = None
    modules: Path | None = None
    append: str = ""
    memory: tuple[int, ...] = ()
    smp: tuple[int, ...] = ()
    l1_image: Path | None = None
    login: tuple[str, str] | None = None
    l2_image: Path | None = None
    boot_timeout: float | None = None
    command_timeout: float | None = None
    artifacts: Path | None = None
    share: tuple[Path, ...] = ()
    console_limit: int = 64
    output_limit: int = 64
    shard: tuple[int, int] | None = None  # (I, N): share I of N, see in_shard
    enable: bool = False
    kut: Path | None = None
    kut_level: int = 1
    kselftests: Path | None = None
    kselftests_level: int = 1
    xtf: Path | None = None
    known_failures: KnownFailures | None = None
    emulator_reruns: int | None = None  # None: by the host, see reruns_allowed
    hypervisor: Hypervisor = "kvm"  # what L1 hosts its guests with
    xen: Path | None = None  # --nested-xen: the user's Xen image; None: Debian's, from the packages
    l1_smp_default: int = 2  # see from_sources: fewer when xdist workers share the host's cores
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_sources(
        cls,
        cli: Mapping[str, str | None],
        env: Mapping[str, str] | None = None,
        ini: Mapping[str, str | None] | None = None,
        *,
        host_memory_mib: int | None = None,
        host_cpus: int | None = None,
    ) -> Settings:
        """Take each option from the first source that sets it and validate it.

        `cli` and `ini` are keyed by option name; `env` is the process environment.
        L1 gets 2 vCPUs by default, fewer when the pytest-xdist workers on this host
        (PYTEST_XDIST_WORKER_COUNT) would otherwise give their L1s more vCPUs than
        `host_cpus` (under TCG each vCPU keeps a host core busy).
        """
        env = os.environ if env is None else env
        ini = ini or {}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for option in OPTIONS:
            raw, source = _pick(option, cli, env, ini)
            if raw is None:
                continue
            try:
                values[option.name] = option.parse(raw)
            except (ValueError, OSError) as exc:  # OSError: a file the parser reads (kernel, image) cannot be read
                shown = "'<hidden: it may hold a password>'" if option.name == "login" else repr(raw)
                raise ConfigError(f"{option.cli}={shown} (from {source}): {exc}", option=option.name) from None
            sources[option.name] = source
        _suite_levels(values, sources)
        workers = _xdist_workers(env.get("PYTEST_XDIST_WORKER_COUNT", ""))
        l1_smp_default = max(1, min(2, host_cpus // workers)) if host_cpus else 2
        settings = cls(**values, l1_smp_default=l1_smp_default, sources=sources)
        _check_memory(settings, host_memory_mib)
        _check_smp_nesting(settings)
        _check_login(settings)
        _check_xen(settings)
        _check_idle_options(settings)
        _check_kernel_tree(settings)
        _check_images(settings)
        _check_inner_qemus(settings)
        return settings

    def check_host_plan(self, *, accel: str, host_cpus: int, default_kernel: Callable[[], Path | None]) -> None:
        """The checks that need the host's plan and the kernel: L1's vCPUs under TCG, and the memory
        of each level that boots the built-in guest (`default_kernel` is asked only when needed)."""
        l1_vcpus = self.smp_for(1, emulated=True)
        if self.levels >= 1 and accel == "tcg" and l1_vcpus > host_cpus:
            raise ConfigError(
                f"{self._given('smp')}: L1 gets {l1_vcpus} vCPUs under TCG, but this process may use only "
                f"{host_cpus} host cores and each TCG vCPU keeps one busy: use --nested-smp={host_cpus} or fewer",
                option="smp")
        levels = self.built_in_levels()
        kernel = ((tree_image(self.kernel) if self.kernel else None) or default_kernel()) if levels else None
        if kernel is not None:
            _check_memory_floor(self, kernel, levels)

    def built_in_levels(self) -> range:
        """The levels that boot the built-in guest: not a user's disk image, nor anything inside an L2
        image (inside a --nested-l1-image, L2 and deeper are the built-in guest)."""
        if self.l1_image:
            return range(2, self.levels + 1)
        return range(1, min(self.levels, 1 if self.l2_image else MAX_LEVELS) + 1)

    def suite_dirs(self) -> tuple[Path, ...]:
        """The trees of --nested-kut, --nested-kselftests and --nested-xtf: the guests see them read-only at
        the same paths."""
        return tuple(p for p in (self.kut, self.kselftests, self.xtf) if p is not None)

    def describe_source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def memory_for(self, level: int) -> int:
        """MiB for a guest at `level`: explicit value, else a default that halves with depth and is
        never more than half of what its parent has (a Xen domU's parent: L1's memory beside dom0's)."""
        if level <= len(self.memory):
            return self.memory[level - 1]
        default = max(2048 >> (level - 1), 256)
        return default if level == 1 else min(default, self.parent_mib(level) // 2)

    def parent_mib(self, level: int) -> int:
        """MiB the parent of `level` has to give its guests."""
        parent = self.memory_for(level - 1)
        return parent - dom0_mib(parent) - XEN_MIB if level == 2 and self.hypervisor == "xen" else parent

    def cpu_for(self, level: int, host_plan: str) -> str:
        """-cpu for `level`: L1 follows the host plan, deeper levels take all their parent has."""
        if level == 1:
            return host_plan
        return self.l2_cpu or "host"

    def qemu_args_for(self, level: int) -> tuple[str, ...]:
        build = self.qemu_for(level)
        firmware = ("-L", str(build.firmware)) if build is not None and build.firmware is not None else ()
        return (*firmware, *(self.qemu_args if level == 1 else self.l2_qemu_args))

    def qemu_for(self, level: int) -> QemuBuild | None:
        """The user's QEMU for `level` (a level without an entry gets the one above it); None: L0's on
        PATH, and inside a --nested-l1-image the image's own (unless a second entry names one there)."""
        if not self.qemu or (self.l1_image is not None and level >= 2 and len(self.qemu) < 2):
            return None
        return self.qemu[min(level, len(self.qemu)) - 1]

    def qemu_shares(self) -> tuple[Path, ...]:
        """The directories of the user's QEMUs that run inside a guest (L2 and deeper): the guests see
        them read-only at the same paths (a binary under the system directories is there already).
        None for a --nested-l1-image: it sees nothing of L0, its own QEMU runs L2."""
        if self.l1_image is not None:
            return ()
        inner = {self.qemu_for(level) for level in range(2, self.levels + 1)}
        system = [Path(d) for d in SYSTEM_DIRS]
        return tuple(sorted({b.directory for b in inner if b is not None
                             and not any(b.directory.resolve().is_relative_to(d) for d in system)}))

    def smp_for(self, level: int, *, emulated: bool = False) -> int:
        """vCPUs at `level`: explicit value, else 2 for L1 (see from_sources) and 1 deeper. Where the
        host's virtualization is emulated (TCG, or KVM on a CPU QEMU emulates) L1 gets one: with two,
        QEMU 7.2's TCG froze the whole L1 (no stall report, no answer) while a KVM selftest ran a
        nested guest, 1 in 16 runs of state_test, none in 80 with one (README, The emulated path);
        a two-vCPU KVM L1 on emulated SVM reset while booting and never booted with a core busy."""
        l1_default = 1 if emulated else self.l1_smp_default
        return _per_level(self.smp, level, lambda lv: l1_default if lv == 1 else 1)

    @property
    def reruns(self) -> int:
        """Reruns a test gets after an emulator fault: the user's number, else 1. Only a guest whose
        virtualization is emulated has emulator faults, so on hardware KVM nothing reruns."""
        return 1 if self.emulator_reruns is None else self.emulator_reruns

    def in_shard(self, nodeid: str) -> bool:
        """Whether the test `nodeid` belongs to this run's share (always, without --nested-shard).

        A test belongs to share crc32(nodeid) % N + 1: a function of the node id alone, so every
        machine, every xdist worker and every collection order picks the same tests (Python's own
        str hash changes with PYTHONHASHSEED)."""
        if self.shard is None:
            return True
        index, count = self.shard
        return zlib.crc32(nodeid.encode("utf-8", "surrogateescape")) % count + 1 == index

    def _given(self, name: str) -> str:
        """`--nested-<name>=<value> (from <source>)`, for the start of an error message."""
        option = OPTION_BY_NAME[name]
        value = getattr(self, name)
        shown = (",".join(map(str, value)) if isinstance(value, tuple) else
                 value.path if isinstance(value, KnownFailures) else value)
        return f"{option.cli}={shown} (from {self.describe_source(name)})"


# -- checks across options, once all are parsed ------------------------------------------


def _check_smp_nesting(settings: Settings) -> None:
    for level, (outer, inner) in enumerate(zip(settings.smp, settings.smp[1:], strict=False), start=2):
        if inner > outer:
            raise ConfigError(f"{settings._given('smp')}: L{level} gets {inner} vCPUs but its parent L{level - 1} has "
                              f"only {outer}; give each level at most as many vCPUs as the level that runs it",
                              option="smp")


def _check_login(settings: Settings) -> None:
    if settings.login is not None and settings.l1_image is None:
        raise ConfigError(
            f"--nested-login={settings.login[0]}:*** (from {settings.describe_source('login')}): a serial-console "
            "login is only used for a --nested-l1-image, and none is set: pass --nested-l1-image PATH too, "
            "or drop --nested-login", option="login")


def _check_xen(settings: Settings) -> None:
    if settings.hypervisor == "xen" and settings.l1_image is not None:
        raise ConfigError(f"{settings._given('hypervisor')}: L1 boots Xen with the built-in guest as dom0, and a "
                          f"--nested-l1-image boots its own system: drop --nested-l1-image or use "
                          "--nested-hypervisor=kvm", option="hypervisor")
    if settings.hypervisor == "xen" and settings.l2_image is not None:
        raise ConfigError(f"{settings._given('l2_image')}: L2 in a Xen L1 is the built-in guest as an HVM domU; "
                          "a --nested-l2-image there is not supported yet: drop it or use --nested-hypervisor=kvm",
                          option="l2_image")
    if settings.hypervisor == "xen" and settings.levels >= 2 and settings.memory_for(2) > settings.parent_mib(2):
        raise ConfigError(f"{settings._given('memory')}: L2 (a Xen domU) gets {settings.memory_for(2)} MiB, and "
                          f"L1's Xen has {settings.parent_mib(2)} MiB beside dom0's {dom0_mib(settings.memory_for(1))} "
                          f"(half of L1's) and its own {XEN_MIB}: give L1 more memory or L2 less", option="memory")


def _check_idle_options(settings: Settings) -> None:
    """An option that would do nothing in the combination given is refused, not ignored."""
    idle = (
        ("l2_image", settings.l1_image is not None and settings.l2_image is not None,
         "L2 runs inside L1, and inside a --nested-l1-image L2 is the plugin's built-in guest: drop one of them"),
        ("kernel", settings.kernel is not None and settings.l1_image is not None and settings.levels < 2,
         "a --nested-l1-image boots its own kernel, and the built-in guest (L2 and deeper) is not asked for: "
         "drop --nested-kernel or raise --nested-levels"),
        ("modules", settings.modules is not None and settings.kernel is None,
         "the modules are for a --nested-kernel, and none is set (the default kernel brings its own): "
         "pass --nested-kernel too, or drop --nested-modules"),
        ("xen", settings.xen is not None and settings.hypervisor != "xen",
         "a Xen image is booted only with --nested-hypervisor=xen: pass it too, or drop --nested-xen"),
        ("known_failures", settings.known_failures is not None and not settings.suite_dirs(),
         "known failures are of --nested-kut, --nested-kselftests and --nested-xtf, and none is set: pass one "
         "of them, or drop --nested-known-failures"),
        ("xtf", settings.xtf is not None and settings.hypervisor != "xen",
         "XTF's tests are domUs of a Xen L1: pass --nested-hypervisor=xen too, or drop --nested-xtf"),
    )
    for name, idle_here, why in idle:
        if idle_here:
            raise ConfigError(f"{settings._given(name)}: {why}", option=name)


def _check_inner_qemus(settings: Settings) -> None:
    """A QEMU that runs inside a guest must be shareable, and its libraries must be there too."""
    for directory in settings.qemu_shares():
        build = next(b for b in settings.qemu if b.directory == directory)
        reason = unshareable(directory)
        if reason is None:
            reason = missing_library(build, (*settings.qemu_shares(), *settings.share))
        if reason is not None:
            raise ConfigError(f"{settings._given('qemu')}: {build.binary} runs inside L1 and deeper, but {reason}",
                              option="qemu")


def _check_images(settings: Settings) -> None:
    """The files a qcow2 image reads besides itself lie where the guests may see them."""
    for name in ("l1_image", "l2_image"):
        image = getattr(settings, name)
        try:
            if image is not None:
                _check_references(image, settings.share)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{settings._given(name)}: {exc}", option=name) from None


def _check_kernel_tree(settings: Settings) -> None:
    """A build directory's modules are prepared when a guest is first wanted: check now that
    they are built and that depmod is there (--nested-modules replaces them)."""
    if settings.kernel is None or settings.modules is not None or not is_tree(settings.kernel):
        return
    try:
        check_modules(settings.kernel)
    except ValueError as exc:
        raise ConfigError(f"{settings._given('kernel')}: {exc}", option="kernel") from None


def _check_memory_floor(settings: Settings, kernel: Path, levels: range) -> None:
    """Each built-in level gets enough memory to unpack and run `kernel` (deeper levels boot it too;
    a Xen L1's dom0 gets only its share of L1's memory)."""
    try:
        size_mib = kernel.stat().st_size / (1 << 20)
    except OSError:
        return  # reported where the kernel is needed
    floor = math.ceil(KERNEL_UNPACK_FACTOR * size_mib + KERNEL_BASE_MIB)
    why = (f"the {floor} MiB kernel {kernel} needs ({size_mib:.1f} MiB, about {KERNEL_UNPACK_FACTOR}x that "
           f"unpacked, + {KERNEL_BASE_MIB} MiB to run)")
    given = settings._given("memory") if settings.memory else (
        f"--nested-memory (default: {','.join(str(settings.memory_for(lv)) for lv in levels)})")
    dom0 = dom0_mib(settings.memory_for(1))
    if settings.hypervisor == "xen" and dom0 < floor:
        raise ConfigError(f"{given}: with --nested-hypervisor=xen dom0 gets {dom0} MiB of L1's "
                          f"{settings.memory_for(1)} MiB, below {why}: give L1 at least "
                          f"{math.ceil(floor * settings.memory_for(1) / max(dom0, 1))} MiB", option="memory")
    for level in levels:
        mib = settings.memory_for(level)
        if mib >= floor:
            continue
        if level <= len(settings.memory):
            raise ConfigError(f"{given}: L{level} gets {mib} MiB, below {why}: give every level at least "
                              f"{floor} MiB", option="memory")
        parent = settings.memory_for(level - 1)
        raise ConfigError(f"{given}: L{level} would get {mib} MiB by default (half of L{level - 1}'s {parent} "
                          f"MiB), below {why}: {_memory_fix(settings, level, floor)}", option="memory")


def _memory_fix(settings: Settings, level: int, floor: int) -> str:
    """How to give a defaulted `level` at least `floor` MiB."""
    parent = settings.memory_for(level - 1)
    more = f"give L{level - 1} at least {2 * floor} MiB"
    if parent <= floor:
        return more
    listed = [str(settings.memory_for(lv)) for lv in range(1, level)] + [str(floor)]
    return f"{more}, or set L{level}'s yourself (e.g. --nested-memory={','.join(listed)})"


def _check_memory(settings: Settings, host_memory_mib: int | None) -> None:
    if not settings.memory:
        return
    given = f"--nested-memory={','.join(map(str, settings.memory))} (from {settings.describe_source('memory')})"
    if host_memory_mib is not None and settings.memory[0] > host_memory_mib:
        raise ConfigError(f"{given}: the host has only {host_memory_mib} MiB; give L1 less memory")
    for level, (outer, inner) in enumerate(zip(settings.memory, settings.memory[1:], strict=False), start=2):
        if inner >= outer:
            raise ConfigError(
                f"{given}: L{level} gets {inner} MiB but its parent L{level - 1} has only {outer} MiB; "
                "each level must be smaller than the one that runs it"
            )


def _pick(
    option: Option, cli: Mapping[str, str | None], env: Mapping[str, str], ini: Mapping[str, str | None]
) -> tuple[str | None, str]:
    value = cli.get(option.name)
    if value is not None:
        return value, "command line"
    if env.get(option.env, "") != "":
        return env[option.env], f"env {option.env}"
    value = ini.get(option.name)
    if value not in (None, ""):
        return value, f"ini {option.ini}"
    return None, "default"


def _xdist_workers(raw: str) -> int:
    """How many pytest-xdist workers share the host (set by xdist itself; 1 when absent or not a number)."""
    try:
        return max(1, _whole(raw))
    except ValueError:
        return 1


def _per_level(values: tuple[int, ...], level: int, default: Callable[[int], int]) -> int:
    return values[level - 1] if level <= len(values) else default(level)


def _whole(raw: str) -> int:
    """A whole number in ASCII digits (int() also takes "٣" and "1_000")."""
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text, flags=re.ASCII):
        raise ValueError("expected a whole number")
    return int(text)


def _int_in(low: int, high: int | None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _whole(raw)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _levels(raw: str) -> int:
    value = _int_in(0, None)(raw)
    if value > MAX_LEVELS:
        raise ValueError(
            f"at most {MAX_LEVELS} levels are supported (each level runs inside the one above; "
            f"L{MAX_LEVELS + 1} would need hours under TCG)"
        )
    return value


def _int_list(low: int) -> Callable[[str], tuple[int, ...]]:
    def parse(raw: str) -> tuple[int, ...]:
        parts = [p for p in raw.replace(" ", "").split(",")]
        if not all(parts):
            raise ValueError("expected one number per level, separated by commas (e.g. 2048,1024)")
        one = _int_in(low, None)
        return tuple(one(p) for p in parts)

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        if not raw.isascii() or "_" in raw:  # float() also takes "٣٠" and "1_0"
            raise ValueError
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not 1 <= value <= MAX_SECONDS:  # also refuses nan and inf
        raise ValueError(f"must be from 1 to {MAX_SECONDS} seconds (one day): give e.g. 600")
    return value


def _existing_file(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path} is not readable by this user")
    return path.resolve()


def _kernel_dir(raw: str) -> Path | None:
    """A kernel build directory whose bzImage is built and current; None for anything else."""
    path = Path(raw).expanduser()
    return check_image(path.resolve()) if path.is_dir() else None


def _kernel_image(path: Path) -> Path:
    """A file QEMU can boot with -kernel: a bzImage (setup header "HdrS" at 0x202) or an ELF vmlinux."""
    with path.open("rb") as f:
        head = f.read(0x400)
    if head[0x202:0x206] == b"HdrS" or head[:4] == b"\x7fELF":
        return path
    raise ValueError(f"{path} is not a kernel image: it is {_what_is(head)}, with no bzImage header "
                     "(\"HdrS\" at 0x202) nor ELF magic; pass arch/x86/boot/bzImage (or a /boot/vmlinuz-*)")


QCOW2_MAGIC = b"QFI\xfb"
QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature bit: the guest's data lives in another file
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip data (an initramfs?)"), (b"070701", "a cpio archive (an initramfs?)"),
    (b"\xfd7zXZ", "xz data"), (b"\x28\xb5\x2f\xfd", "zstd data"), (QCOW2_MAGIC, "a qcow2 disk image"),
    (b"#!", "a script"),
)


def _what_is(head: bytes) -> str:
    """A few words on what a file's first bytes look like."""
    if not head:
        return "an empty file"
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return what
    try:
        text = head[:64].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"text ({' '.join(text.split())[:30]!r})"
    return f"binary data starting {head[:8].hex(' ')}"


def _artifacts_dir(raw: str) -> Path:
    """Where failed tests leave their artifacts: a directory, or a path one can be made at (made later)."""
    path = Path(raw).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problems = {
        f"{path} is a file, not a directory: name a directory (it is made when a test fails)":
            existing == path and not path.is_dir(),
        f"{existing} is a file, so no directory can be made at {path}: name a directory": not existing.is_dir(),
        f"{existing} is not writable by this user: name a directory you can write to":
            not os.access(existing, os.W_OK | os.X_OK),
    }
    problem = next((text for text, found in problems.items() if found), None)
    if problem is not None:
        raise ValueError(problem)
    return path


def _existing_dir(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path.resolve()


def _disk_image(path: Path) -> Path:
    """A file QEMU can boot through the firmware: qcow2, or a raw disk with a boot sector (the files
    a qcow2 image reads besides itself are checked with the shares: Settings._check_images)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head[:4] == QCOW2_MAGIC:
        return path
    if head[510:512] == b"\x55\xaa":
        return path
    raise ValueError(f"{path} is not a bootable disk image (neither qcow2 nor a raw disk with a boot sector): "
                     "pass a qcow2 or raw disk image, e.g. a distribution's cloud image")


def image_format(path: Path) -> Literal["qcow2", "raw"]:
    """The format of a disk image that _disk_image accepted: QEMU is told it, never left to probe."""
    with path.open("rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def _check_references(path: Path, shares: tuple[Path, ...]) -> None:
    """A qcow2 image may name a backing file or an external data file, which QEMU would open and
    show the guest (-snapshot does not stop reads): each must lie in the image's own directory or
    in a --nested-share path (which the guests see anyway)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head[:4] != QCOW2_MAGIC:
        return
    version, backing_offset = int.from_bytes(head[4:8], "big"), int.from_bytes(head[8:16], "big")
    external = version >= 3 and int.from_bytes(head[72:80], "big") & QCOW2_EXTERNAL_DATA
    if not backing_offset and not external:
        return
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise ValueError(f"{path} names other files (a backing file or a data file), and qemu-img, which the "
                         "plugin reads them with, is not installed: install qemu-utils")
    info = subprocess.run([qemu_img, "info", "--output=json", "--backing-chain", "-U", "-f", "qcow2", str(path)],
                          capture_output=True, text=True, timeout=QEMU_IMG_INFO, check=False)
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"{path}: qemu-img cannot read its backing chain ({why}): pass an image QEMU can open")
    own = path.resolve().parent
    allowed = (own, *(share.resolve() for share in shares))
    for layer in json.loads(info.stdout):
        data_file = layer.get("format-specific", {}).get("data", {}).get("data-file")
        for what, name in (("backing file", layer.get("full-backing-filename")), ("data file", data_file)):
            if name is None:
                continue
            where = Path(name)
            if (":" in name.split("/", 1)[0] or not where.is_absolute()
                    or not any(where.resolve().is_relative_to(place) for place in allowed)):
                raise ValueError(f"{path} reads {name} (its {what}), which is not in the image's own directory "
                                 f"{own} nor in a --nested-share path: the guest would see it; put it there, share "
                                 "its directory, or make a standalone image (qemu-img convert -O qcow2)")


def _login(raw: str) -> tuple[str, str]:
    user, colon, password = raw.partition(":")
    if not user.strip() or not colon:
        raise ValueError("expected USER:PASSWORD (e.g. tester:tester)")
    return user.strip(), password


def _shard(raw: str) -> tuple[int, int]:
    index, _, count = raw.strip().partition("/")
    try:
        i, n = _whole(index), _whole(count)
    except ValueError:
        raise ValueError("expected I/N, share I of N (e.g. 2/3)") from None
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"N must be from 1 to {MAX_SHARDS}")
    if not 1 <= i <= n:
        raise ValueError(f"I must be from 1 to N ({n})")
    return i, n


def _argv(raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(f"cannot split into arguments ({exc}): check the quotes") from None


def _qemu_builds(raw: str) -> tuple[QemuBuild, ...]:
    builds = tuple(qemu_build(Path(part.strip())) for part in raw.split(",") if part.strip())
    if not builds:
        raise ValueError("no QEMU given: pass a qemu-system binary or a QEMU build directory")
    return builds


def missing_library(build: QemuBuild, shares: tuple[Path, ...]) -> str | None:
    """Why `build.binary` would not start inside a guest that sees the system directories and
    `shares`: a shared library ldd cannot find, or finds elsewhere; None when all are there."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None  # nothing to ask; QEMU's own error says it inside the guest
    found = subprocess.run([ldd, str(build.binary)], capture_output=True, text=True, timeout=LDD,
                           check=False)
    places = [*(Path(d) for d in SYSTEM_DIRS), *(s.resolve() for s in shares)]
    for line in found.stdout.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow:
            continue
        target = rest.split(" (", 1)[0].strip()
        if target == "not found":
            return f"its library {name} is not found on this host either: install it or fix the build"
        if not any(Path(target).resolve().is_relative_to(place) for place in places):
            return (f"its library {name} is {target}, which guests do not see: share its directory "
                    "with --nested-share, or build QEMU against the system's libraries")
    return None


def _shares(raw: str) -> tuple[Path, ...]:
    return tuple(shareable_dir(part) for part in raw.split(",") if part.strip())


def shareable_dir(raw: str) -> Path:
    """A directory a guest may see: it exists, its path fits the kernel command line, and it is
    not and does not contain a secret location."""
    path = _existing_dir(raw.strip())
    reason = unshareable(path)
    if reason is not None:
        raise ValueError(f"{path}: {reason}: share another directory")
    return path


SUITE_LEVELS = {"kut": "kut_level", "kselftests": "kselftests_level"}


def _suite_levels(values: dict[str, Any], sources: dict[str, str]) -> None:
    """A suite run at level N needs guests up to N: --nested-levels follows when it was not set,
    and a --nested-levels set lower is a contradiction the user resolves."""
    for suite, level_name in SUITE_LEVELS.items():
        if suite not in values:
            continue
        level = values.get(level_name, 1)
        if "levels" not in values:
            values["levels"] = level
            sources.setdefault("levels", f"{OPTION_BY_NAME[level_name].cli}={level}")
        elif values["levels"] < level:
            option = OPTION_BY_NAME[level_name]
            raise ConfigError(
                f"{option.cli}={level} (from {sources.get(level_name, 'default')}) runs {OPTION_BY_NAME[suite].cli} "
                f"in L{level}, but --nested-levels={values['levels']} (from {sources['levels']}) provides only up to "
                f"L{values['levels']}: raise --nested-levels to {level} or lower {option.cli}", option=level_name)


def _kut_tree(raw: str) -> Path:
    return kut.validate_tree(shareable_dir(raw))


def _xtf_tree(raw: str) -> Path:
    return xtf.validate_tree(shareable_dir(raw))


def _kselftests_dir(raw: str) -> Path:
    path = shareable_dir(raw)
    kselftests_suite.discover(path)
    return path


def _known_failures(raw: str) -> KnownFailures:
    return knownfail.load(_existing_file(raw))


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


# Every option once; its parser is the last field of its row (the functions above).
OPTIONS: tuple[Option, ...] = (
    Option("levels", "deepest guest level to provide: 0 = host check only, 1 = L1, 2 = L2 inside L1, "
           f"up to {MAX_LEVELS} (default 1)", "N", parse=_levels),
    Option("accel", "accelerator for L1: auto (KVM when it can run an ordinary guest, else TCG), kvm, tcg "
           "(default auto)", "auto|kvm|tcg", parse=_choice(ACCELS)),
    Option("cpu", "-cpu model for L1 (default: host with KVM, max with TCG)", "MODEL", parse=str.strip),
    Option("l2_cpu", "-cpu model for L2 and deeper, e.g. qemu64,+svm (default host: all the parent has)", "MODEL",
           parse=str.strip),
    Option("qemu", "the QEMU for L1, L2, ... in that order: a qemu-system binary or a QEMU build directory "
           "(its firmware in pc-bios/ too); a level without an entry gets the one above it; a binary for L2 and "
           "deeper is shared read-only with the guests (default: qemu-system-<arch> on PATH; inside a "
           "--nested-l1-image, the image's own)", "PATH[,PATH...]",
           parse=_qemu_builds),
    Option("qemu_args", "extra arguments for L1's QEMU, split like a shell would (e.g. '-device virtio-rng-pci')",
           "ARGS", parse=_argv),
    Option("l2_qemu_args", "extra arguments for the QEMU of L2 and deeper", "ARGS", parse=_argv),
    Option("kernel", "kernel for the built-in guest: an image, or a kernel build directory whose "
           "arch/x86/boot/bzImage and built modules are used (default: a /boot/vmlinuz-* whose modules exist)",
           "PATH", parse=lambda raw: _kernel_dir(raw) or _kernel_image(_existing_file(raw))),
    Option("modules", "modules directory matching --nested-kernel (default: /lib/modules/<its version>, or a "
           "build directory's own modules)", "DIR", parse=_existing_dir),
    Option("append", "extra kernel command line for the built-in guest", "ARGS", parse=str.strip),
    Option("memory", "guest memory in MiB; a comma list sets L1,L2,... (default 2048 for L1, shrinking with "
           "depth)", "MIB[,MIB...]", parse=_int_list(64)),
    Option("smp", "guest vCPUs; a comma list sets L1,L2,... (default 2 for L1, 1 deeper; 1 for L1 where KVM "
           "itself runs on an emulated CPU)", "N[,N...]", parse=_int_list(1)),
    Option("l1_image", "disk image (qcow2/raw) to boot as L1 instead of the built-in guest, always with -snapshot; "
           "reached over SSH with a key given through a generated cloud-init seed; L2 and deeper run inside it as "
           "the built-in guest, on the image's own QEMU", "PATH",
           parse=lambda raw: _disk_image(_existing_file(raw))),
    Option("login", "USER:PASSWORD for a serial-console login into a --nested-l1-image that lacks cloud-init "
           "(the command channel then runs on the serial console)", "USER:PASSWORD", parse=_login),
    Option("l2_image", "disk image (qcow2/raw) to boot as L2 instead of the built-in guest: L1 gets it as its "
           "virtio disk /dev/vda (and its cloud-init seed as /dev/vdb) and boots it with -snapshot", "PATH",
           parse=lambda raw: _disk_image(_existing_file(raw))),
    Option("boot_timeout", "seconds a guest may take to answer its first command (default scales with "
           "accelerator and depth)", "S", parse=_seconds),
    Option("command_timeout", "default seconds a guest command may run (default 60 x level with KVM, 120 x level "
           "under TCG)", "S", parse=_seconds),
    Option("artifacts", "keep, per failed test, each guest's console, QEMU command line and new dmesg lines "
           "in DIR/<test id>/", "DIR", parse=_artifacts_dir),
    Option("share", "more host directories the built-in guests see, read-only and at the same paths, beside the "
           "system directories, the project and its Python environment (comma-separated)", "PATH[,PATH...]",
           parse=_shares),
    Option("console_limit", "MiB of console log kept per guest on the host; past it one line says that the rest "
           "was dropped (default 64)", "MIB", parse=_int_in(1, 1 << 20)),
    Option("output_limit", "MiB of a command's stdout, and as much of its stderr, kept in pytest's memory; past it "
           "the rest is read and dropped, and one line at the end says how much (default 64)", "MIB",
           parse=_int_in(1, 1 << 20)),
    Option("shard", "run only share I of N of the collected tests (1 <= I <= N), the same share on every "
           "machine: for a CI matrix where each job boots its own guests", "I/N", parse=_shard),
    Option("enable", "try to reload kvm_intel/kvm_amd with nested=1 when it is off (needs root)", flag=True,
           parse=_flag),
    Option("kut", "a configured and built kvm-unit-tests tree: each test of DIR/x86/unittests.cfg becomes a test "
           "item that runs inside a guest, its groups markers", "DIR", parse=_kut_tree),
    Option("kut_level", "the guest level the kvm-unit-tests run in (default 1)", "N", parse=_int_in(1, MAX_LEVELS)),
    Option("kselftests", "the built tools/testing/selftests/kvm directory of a kernel tree, or an installed "
           "kselftest tree with kvm/: each KVM selftest becomes a test item that runs inside a guest", "DIR",
           parse=_kselftests_dir),
    Option("kselftests_level", "the guest level the KVM selftests run in (default 1)", "N",
           parse=_int_in(1, MAX_LEVELS)),
    Option("xtf", "a built Xen Test Framework tree (with --nested-hypervisor=xen): each test instance "
           "(test-hvm64-example, ...) becomes a test item that XTF's runner runs as a domU of the Xen L1, its "
           "category a marker (xtf_functional, ...)", "DIR", parse=_xtf_tree),
    Option("known_failures", "known failures of --nested-kut, --nested-kselftests and --nested-xtf, one "
           "'<suite>:<test> <reason>' line each (suite kut, kselftests or xtf; the test may be a shell pattern "
           "such as xtf:test-hvm32pae-*): a listed test that fails is an xfail with that reason; a reason that "
           "starts with 'hangs:' is an xfail that is not run", "FILE",
           parse=_known_failures),
    Option("hypervisor", "what L1 hosts its guests with: kvm (L1 is Linux with KVM) or xen (L1 boots Xen, the "
           "built-in guest is its dom0 and L2 an HVM domU) (default kvm)", "kvm|xen", parse=_choice(HYPERVISORS)),
    Option("xen", "the Xen that L1 boots with --nested-hypervisor=xen: xen/xen or xen.gz of a Xen build, a "
           "multiboot image (default: Debian's xen-hypervisor-4.17-amd64, unpacked in the plugin's cache)", "PATH",
           parse=lambda raw: check_xen_image(_existing_file(raw))),
    Option("emulator_reruns", "times a test runs again on fresh guests when emulated virtualization wedged or reset "
           "a guest (default 1 where the host's virtualization is emulated, 0 on hardware KVM, where no rerun "
           "happens)", "N", parse=_int_in(0, 10)),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
