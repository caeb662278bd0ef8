"""The package's rooms and the one rule between them: imports only run downwards.

Each sub-package has a floor; a module may import its own sub-package and the floors below
it, never one beside or above (TYPE_CHECKING imports count too). The top-level modules are
the pytest face and may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_nestedkvm"
FLOORS = {"base": 0, "boot": 1, "suites": 1, "config": 2, "machine": 2, "": 3}


def room(module: str) -> str:
    """'machine.guest' -> 'machine'; a top-level module -> ''."""
    return module.rpartition(".")[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """The package modules (dotted, below the package) that `module` imports."""
    package = module if path.name == "__init__.py" else room(module)
    known = set(modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            submodules = {f"{target}.{a.name}".lstrip(".") for a in node.names} & known
            found.update(submodules or {target})
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for name in [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                if name and name.startswith("pytest_nestedkvm."):
                    found.add(name.removeprefix("pytest_nestedkvm."))
    return found


def upward(module: str, targets: set[str]) -> list[str]:
    """The imports of `module` that do not run downwards."""
    here = module if module in FLOORS else room(module)
    return sorted(target for target in targets
                  if (there := target if target in FLOORS else room(target)) != here and FLOORS[there] >= FLOORS[here])


def test_every_module_lives_in_a_known_room() -> None:
    assert {room(m) for m in modules()} <= set(FLOORS)
    assert {d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists()} <= set(FLOORS)


@pytest.mark.parametrize("module", sorted(m for m in modules() if room(m) != "" or m in FLOORS))
def test_imports_run_downwards(module: str) -> None:
    assert upward(module, imports_of(module, modules()[module])) == []


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle in `graph` (module -> the modules it imports), as [a, b, ..., a]; [] when none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if found := visit(target):
                return found
        path.pop()
        done.add(module)
        return []

    return next((found for module in sorted(graph) if (found := visit(module))), [])


def test_no_import_circle() -> None:
    # Downward imports alone allow a circle inside a room (guest -> process -> guest); TYPE_CHECKING
    # imports count too: a circle hidden there is still two modules that cannot be read apart.
    graph = {module: imports_of(module, path) for module, path in modules().items()}
    found = cycle(graph)
    assert found == [], f"import circle: {' -> '.join(found)}"


def test_the_circle_check_finds_one() -> None:
    graph = {"machine.guest": {"machine.process", "base.errors"}, "machine.process": {"machine.guest"},
             "base.errors": set()}
    assert cycle(graph) == ["machine.guest", "machine.process", "machine.guest"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    # The checker itself, on a made-up module: boot may not reach into machine, nor into suites beside it.
    path = tmp_path / "qemu.py"
    path.write_text("from ..machine.channel import channel_class\nfrom .layout import PORT_DIR\n"
                    "from ..base import errors\nfrom ..suites.kut import x\n")
    found = imports_of("boot.qemu", path)
    assert found == {"machine.channel", "boot.layout", "base.errors", "suites.kut"}
    assert upward("boot.qemu", found) == ["machine.channel", "suites.kut"]


@pytest.mark.parametrize("module", sorted(m for m in modules() if room(m) != "" or m in ("lab", *FLOORS)))
def test_below_the_pytest_face_nothing_imports_pytest(module: str) -> None:
    # The Lab and the rooms under it work in a script or a benchmark, with no pytest session.
    tree = ast.parse(modules()[module].read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {name for name in names if name.split(".")[0] in ("pytest", "_pytest", "pluggy")}


def test_readmes_module_map_names_every_module_in_its_room() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    mapped = set()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`") and cells[1].endswith(".py`"):
            where = cells[0].strip("`").rstrip("/") if cells[0].startswith("`") else ""
            mapped |= {f"{where}.{name[:-3]}".lstrip(".") for name in cells[1].replace("`", "").split(", ")}
    mapped = {m.removesuffix(".__init__").removesuffix("__init__") for m in mapped}
    actual = {m for m in modules() if m not in FLOORS or m == ""}
    assert mapped == actual, f"README lacks {sorted(actual - mapped)}, names gone {sorted(mapped - actual)}"


# Shell scripts the plugin writes out, kept whole so that they read as one script.
TEMPLATES = {"boot.initramfs.init_script"}


def test_no_class_over_200_lines_nor_function_over_50() -> None:
    too_long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            limit = 200 if isinstance(node, ast.ClassDef) else 50
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit and f"{module}.{node.name}" not in TEMPLATES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert too_long == []
