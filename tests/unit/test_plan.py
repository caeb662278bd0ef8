"""Unit tests for plan.py: settings + host report + hooks -> GuestSpec and skip reason per level (pure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_nestedkvm.base.errors import ConfigError
from pytest_nestedkvm.base.host import HostReport, QemuInfo
from pytest_nestedkvm.boot.qemu import Disk, GuestSpec
from pytest_nestedkvm.boot.view import Export, View
from pytest_nestedkvm.config import plan
from pytest_nestedkvm.config.plan import BootFiles, builtin_spec, seed_levels, skip_reason, spec_for, timeouts
from pytest_nestedkvm.config.settings import Settings

QEMU = QemuInfo(binary="/usr/bin/qemu-system-x86_64", version="8.2.2")
FIX = "load kvm_amd with nested=1"
# Never opened here. The cache is one of the view's exports, so every level sees these files.
KERNEL = Path("/home/nk/.cache/nestedkvm/vmlinux")
INITRD = Path("/home/nk/.cache/nestedkvm/initrd.img")
FIRMWARE = Path("/usr/share/qemu/qboot.rom")
VIEW = View(
    exports=(Export(Path("/run/user/0/nk/etc"), Path("/etc")), Export(Path("/usr"), Path("/usr")),
             Export(Path("/home/nk/.cache/nestedkvm"), Path("/home/nk/.cache/nestedkvm"))),
    links=(("/bin", "usr/bin"),),
)
FILES = BootFiles(kernel=KERNEL, initrd=INITRD, firmware=FIRMWARE, seeds={}, view=VIEW)


def host(accel: str = "kvm", cpu: str = "host", *, qemu: QemuInfo | None = QEMU, nesting: bool = True) -> HostReport:
    return HostReport(
        arch="x86_64", vendor="amd", virt_flags=("svm",) if accel == "kvm" else (), in_vm=False,
        kvm_device=accel == "kvm", kvm_openable=accel == "kvm", kvm_backend="kvm_amd" if accel == "kvm" else None,
        kvm_usable=accel == "kvm", nested=nesting, accel=accel, cpu=cpu, qemu=qemu,  # type: ignore[arg-type]
        reasons=[], nesting_possible=nesting, nesting_fix=None if nesting else FIX,
    )


def settings(**cli: str) -> Settings:
    return Settings.from_sources(cli, env={})


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"QFI\xfb" + bytes(508))
    return path


# -- skip_reason -------------------------------------------------------------------------------


def test_level_above_nested_levels_is_skipped_with_the_exact_flag() -> None:
    reason = skip_reason(2, settings(levels="1"), host())
    assert reason == "needs L2, but this session provides up to L1 (run with --nested-levels=2)"


def test_missing_qemu_skips_every_level() -> None:
    assert skip_reason(1, settings(), host(qemu=None)) == "QEMU not found: apt-get install qemu-system-x86"


def test_impossible_nesting_skips_l2_but_not_l1() -> None:
    report = host(accel="tcg", cpu="max", nesting=False)
    assert skip_reason(1, settings(levels="2"), report) is None
    reason = skip_reason(2, settings(levels="2"), report)
    assert reason is not None
    assert reason.startswith("L2 needs nested virtualization") and reason.endswith(FIX)


def test_levels_deeper_than_a_user_image_are_skipped(image: Path) -> None:
    l1 = settings(levels="3", l1_image=str(image))
    assert skip_reason(2, l1, host()) is None and skip_reason(3, l1, host()) is None
    login = settings(levels="3", l1_image=str(image), login="root:secret")
    assert skip_reason(1, login, host()) is None and skip_reason(3, login, host()) is None
    l2 = settings(levels="3", l2_image=str(image))
    assert skip_reason(2, l2, host()) is None
    assert "L3 inside a --nested-l2-image is not supported yet" in (skip_reason(3, l2, host()) or "")


def test_everything_present_means_no_skip() -> None:
    assert skip_reason(2, settings(levels="2"), host()) is None


# -- builtin_spec ------------------------------------------------------------------------------


def per_level_settings() -> Settings:
    return settings(levels="2", memory="1024,512", smp="3,2", qemu_args="-device virtio-rng-pci",
                    l2_qemu_args="-d guest_errors", append="quiet")


def test_l1_builtin_spec_follows_report_settings_and_boot_files() -> None:
    spec = builtin_spec(1, per_level_settings(), host(accel="tcg", cpu="max"), FILES)
    assert (spec.level, spec.qemu, spec.accel, spec.cpu) == (1, QEMU.binary, "tcg", "max")
    assert (spec.memory_mib, spec.smp, spec.extra_args) == (1024, 3, ("-device", "virtio-rng-pci"))
    assert (spec.kernel, spec.initrd, spec.firmware) == (KERNEL, INITRD, FIRMWARE)
    assert (spec.append, spec.view, spec.share_root, spec.deepest, spec.disks) == ("quiet", VIEW, None, 2, ())
    assert spec.exports == VIEW.exports
    assert spec.channel == "agent"


def test_l2_builtin_spec_runs_on_kvm_with_cpu_host_even_under_tcg() -> None:
    spec = builtin_spec(2, per_level_settings(), host(accel="tcg", cpu="max"), FILES)
    assert (spec.level, spec.accel, spec.cpu) == (2, "kvm", "host")
    assert (spec.memory_mib, spec.smp, spec.extra_args) == (512, 2, ("-d", "guest_errors"))
    assert (spec.kernel, spec.initrd, spec.share_root, spec.deepest) == (KERNEL, INITRD, None, 2)


def test_deeper_levels_see_what_their_parent_sees_from_the_same_paths() -> None:
    l1 = builtin_spec(1, settings(levels="3"), host(), FILES)
    l2 = builtin_spec(2, settings(levels="3"), host(), FILES)
    l3 = builtin_spec(3, settings(levels="3"), host(), FILES)
    assert l1.view == VIEW
    assert l2.view == VIEW.one_level_down() == l3.view
    assert l2.view is not None
    # L1 exports its own mounts: each source is where L1 mounted that export, links unchanged.
    assert [(e.source, e.target) for e in l2.view.exports] == [(e.target, e.target) for e in VIEW.exports]
    assert l2.view.links == VIEW.links


def test_no_view_without_one_in_the_boot_files() -> None:
    files = dataclasses.replace(FILES, view=None)
    for level in (1, 2):
        spec = builtin_spec(level, settings(levels="2"), host(), files)
        assert (spec.view, spec.share_root, spec.exports) == (None, None, ())


def test_l2_cpu_option_sets_the_cpu_of_l2_only() -> None:
    chosen = settings(levels="2", l2_cpu="qemu64,+svm")
    assert builtin_spec(2, chosen, host(), FILES).cpu == "qemu64,+svm"
    assert builtin_spec(1, chosen, host(), FILES).cpu == "host"


def test_boot_files_under_tmp_are_fine_for_deeper_levels() -> None:
    # The cache is exported wherever it is, also under a directory the guests cover with a tmpfs.
    cache = Path("/tmp/nk")
    view = View((*VIEW.exports[:2], Export(cache, cache)), VIEW.links)
    files = dataclasses.replace(FILES, kernel=cache / "vmlinux", initrd=cache / "initrd.img", view=view)
    l2 = builtin_spec(2, settings(levels="2"), host(), files)
    assert (l2.kernel, l2.initrd) == (cache / "vmlinux", cache / "initrd.img")
    assert l2.view is not None and Export(cache, cache) in l2.view.exports


def test_l1_holds_the_l2_image_and_its_seed_as_disks(image: Path, tmp_path: Path) -> None:
    seed = tmp_path / "seed-l2.iso"
    chosen = settings(levels="2", l2_image=str(image))
    files = dataclasses.replace(FILES, seeds={2: seed}, image_formats={image: "qcow2"})
    l1 = builtin_spec(1, chosen, host(), files)
    assert l1.disks == (Disk(image, "qcow2"), Disk(seed, "raw"))  # QEMU is told each format
    assert l1.channel == "agent"
    l2 = builtin_spec(2, chosen, host(), files)
    assert l2.disks == plan.L2_IMAGE_DISKS == (Disk(Path("/dev/vda")), Disk(Path("/dev/vdb")))  # decoded by L1
    assert (l2.channel, l2.login, l2.kernel) == ("ssh", None, None)
    assert (l1.view, l2.view, l2.exports) == (VIEW, None, ())  # an image sees nothing of its host


def test_l1_image_with_cloud_init_uses_ssh_and_its_seed(image: Path, tmp_path: Path) -> None:
    seed = tmp_path / "seed-l1.iso"
    files = BootFiles(kernel=None, initrd=None, firmware=None, seeds={1: seed}, image_formats={image: "qcow2"})
    spec = builtin_spec(1, settings(l1_image=str(image)), host(), files)
    assert (spec.channel, spec.disks, spec.login) == ("ssh", (Disk(image, "qcow2"), Disk(seed)), None)
    assert (spec.kernel, spec.share_root, spec.view) == (None, None, None)


def test_l1_image_with_login_uses_serial_and_no_seed(image: Path) -> None:
    files = BootFiles(kernel=None, initrd=None, firmware=None, seeds={}, image_formats={image: "qcow2"})
    spec = builtin_spec(1, settings(l1_image=str(image), login="tester:secret"), host(), files)
    assert (spec.channel, spec.disks, spec.login) == ("serial", (Disk(image, "qcow2"),), ("tester", "secret"))


@pytest.mark.parametrize(
    ("options", "levels"),
    [({}, ()), ({"l1_image": ""}, (1,)), ({"l1_image": "", "login": "u:p"}, ()),
     ({"l2_image": "", "levels": "2"}, (2,)), ({"l2_image": "", "levels": "1"}, ())],
    ids=["builtin", "l1-image", "l1-image-login", "l2-image", "l2-image-unused"],
)
def test_seed_levels(image: Path, options: dict[str, str], levels: tuple[int, ...]) -> None:
    cli = {key: value or str(image) for key, value in options.items()}
    assert seed_levels(settings(**cli)) == levels


# -- spec_for (the guest_spec hooks) -----------------------------------------------------------


def test_spec_for_applies_the_hooks_edit() -> None:
    seen: list[GuestSpec] = []

    def hook(level: int, spec: GuestSpec) -> GuestSpec:
        seen.append(spec)
        return dataclasses.replace(spec, memory_mib=777)

    spec = spec_for(1, settings(), host(), FILES, hook)
    assert spec.memory_mib == 777
    assert seen == [builtin_spec(1, settings(), host(), FILES)]


@pytest.mark.parametrize("returned", ["not a spec", None, "other level"])
def test_spec_for_rejects_a_hook_result_that_is_not_a_guest_spec_for_its_level(returned: str | None) -> None:
    def hook(level: int, spec: GuestSpec) -> GuestSpec:
        if returned == "other level":
            return dataclasses.replace(spec, level=level + 1)
        return returned  # type: ignore[return-value]

    with pytest.raises(ConfigError, match=r"pytest_nestedkvm_guest_spec returned .* for L1"):
        spec_for(1, settings(), host(), FILES, hook)


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accel", "level", "channel", "expected"),
    [("kvm", 1, "agent", (30.0, 60.0)), ("tcg", 1, "agent", (90.0, 120.0)), ("kvm", 2, "agent", (60.0, 120.0)),
     ("tcg", 2, "agent", (180.0, 240.0)), ("kvm", 1, "ssh", (120.0, 60.0)), ("tcg", 1, "serial", (360.0, 120.0))],
)
def test_timeouts_scale_with_accel_level_and_channel_kind(
    accel: str, level: int, channel: str, expected: tuple[float, float],
) -> None:
    spec = GuestSpec(level=level, qemu=QEMU.binary, accel="kvm", cpu="host", memory_mib=512, smp=1,
                     channel=channel)  # type: ignore[arg-type]
    assert timeouts(spec, settings(), host(accel=accel)) == expected


def test_kvm_on_an_emulated_cpu_gets_tcg_budgets() -> None:
    spec = GuestSpec(level=1, qemu=QEMU.binary, accel="kvm", cpu="host", memory_mib=512, smp=1)
    emulated = dataclasses.replace(host(accel="kvm"), cpu_emulated=True)
    assert timeouts(spec, settings(), emulated) == (90.0, 120.0)


def test_emulated_virtualization_gives_l1_one_vcpu_unless_the_user_says_otherwise() -> None:
    emulated = dataclasses.replace(host(accel="kvm"), cpu_emulated=True)
    assert [builtin_spec(lv, settings(levels="2"), emulated, FILES).smp for lv in (1, 2)] == [1, 1]
    assert builtin_spec(1, settings(levels="2"), host(accel="kvm"), FILES).smp == 2  # hardware KVM
    assert builtin_spec(1, settings(smp="2"), emulated, FILES).smp == 2
    assert builtin_spec(1, settings(), host(accel="tcg", cpu="max"), FILES).smp == 1  # TCG's SVM froze 2 vCPUs


def test_users_timeouts_win() -> None:
    spec = builtin_spec(2, settings(levels="2"), host(accel="tcg"), FILES)
    assert timeouts(spec, settings(boot_timeout="7", command_timeout="9.5"), host(accel="tcg")) == (7.0, 9.5)


@pytest.mark.parametrize("seccomp", [True, False])
def test_only_l1s_qemu_runs_in_the_sandbox_and_only_where_qemu_has_seccomp(seccomp: bool) -> None:
    report = host(accel="tcg", cpu="max", qemu=QemuInfo(QEMU.binary, QEMU.version, sandbox=seccomp))
    assert builtin_spec(1, per_level_settings(), report, FILES).sandbox is seccomp
    assert builtin_spec(2, per_level_settings(), report, FILES).sandbox is False  # inside L1: its kernel's business


# -- the built-in guest inside a --nested-l1-image -------------------------------------------


def test_l2_inside_an_l1_image_is_the_built_in_guest_booted_from_copies_in_it(image: Path, tmp_path: Path) -> None:
    chosen = settings(levels="3", l1_image=str(image))
    seed = tmp_path / "seed-l1.iso"
    files = plan.in_image(KERNEL, INITRD, FIRMWARE, {1: seed}, {image: "qcow2"})
    l1 = builtin_spec(1, chosen, host(), files)
    assert (l1.channel, l1.deepest, l1.kernel, l1.exports, l1.uploads) == ("ssh", 3, None, (), ())
    l2 = builtin_spec(2, chosen, host(), files)
    inside = Path("/run/nestedkvm/boot")
    assert (l2.channel, l2.kernel, l2.initrd, l2.firmware) == (
        "agent", inside / KERNEL.name, inside / INITRD.name, inside / FIRMWARE.name)
    assert l2.uploads == ((KERNEL, f"{inside}/{KERNEL.name}"), (INITRD, f"{inside}/{INITRD.name}"),
                          (FIRMWARE, f"{inside}/{FIRMWARE.name}"))
    assert l2.qemu == "qemu-system-x86_64"  # the image's own, from its PATH
    assert l2.view is not None and Export(Path("/run/nestedkvm/etc"), Path("/etc")) in l2.view.exports
    assert ("/bin", "usr/bin") in l2.view.links
    l3 = builtin_spec(3, chosen, host(), files)
    assert (l3.kernel, l3.uploads) == (l2.kernel, ())  # L2 shows L3 the boot files it got
    assert l3.view is not None and Export(inside, inside) in l3.view.exports
    assert Export(Path("/etc"), Path("/etc")) in l3.view.exports


def test_an_l1_image_reached_by_login_carries_the_deeper_levels_too(image: Path, tmp_path: Path) -> None:
    """Its boot files travel on a port, not over SFTP: a serial console login is enough."""
    chosen = settings(levels="3", l1_image=str(image), login="root:secret")
    files = plan.in_image(KERNEL, INITRD, FIRMWARE, {}, {image: "qcow2"})
    l1 = builtin_spec(1, chosen, host(), files)
    assert (l1.channel, l1.login, l1.deepest, l1.disks) == ("serial", ("root", "secret"), 3, (Disk(image, "qcow2"),))
    assert builtin_spec(2, chosen, host(), files).uploads == builtin_spec(2, settings(
        levels="3", l1_image=str(image)), host(), files).uploads


def test_an_l1_image_runs_deeper_levels_on_its_own_qemu_unless_a_second_entry_names_one(image: Path) -> None:
    assert settings(levels="2", l1_image=str(image)).qemu_for(2) is None
    assert settings(levels="2").qemu_for(2) is None
    assert settings(levels="2", l1_image=str(image)).qemu_shares() == ()  # an image sees nothing of L0
