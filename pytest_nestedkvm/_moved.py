"""The flat module names of 0.x, kept for one release: `import pytest_nestedkvm.guest` still
works, warns once, and gives the module at its new place (the same module object, so
monkeypatching either name patches both)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

PACKAGE = __name__.rpartition(".")[0]
# Old name -> where the module lives now, below the package.
MOVED = {
    "errors": "base.errors", "deadline": "base.deadline", "host": "base.host",
    "layout": "boot.layout", "view": "boot.view", "initramfs": "boot.initramfs",
    "kernel_tree": "boot.kernel_tree", "cloudinit": "boot.cloudinit", "qemu": "boot.qemu",
    "settings": "config.settings", "plan": "config.plan",
    "console": "machine.console", "qmp": "machine.qmp", "ssh": "machine.ssh", "link": "machine.link",
    "channel": "machine.channel", "process": "machine.process", "forensics": "machine.forensics",
    "guest": "machine.guest", "pool": "machine.pool",
    "kut": "suites.kut", "kselftests": "suites.kselftests", "ktap": "suites.ktap", "knownfail": "suites.knownfail",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        if package != PACKAGE or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__.rpartition(".")[2]
        new = f"{PACKAGE}.{MOVED[old]}"
        warnings.warn(f"{module.__name__} moved to {new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # before any path search: the old names are only aliases
