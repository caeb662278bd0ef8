"""The README moves with the code: its options table, and the public API it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest_nestedkvm
from pytest_nestedkvm.config.settings import OPTIONS

README = (Path(__file__).parents[2] / "README.md").read_text()
ROW = re.compile(r"^\| `(--nested-[a-z0-9-]+)(?: [^`]*)?` \|.*$", re.M)


def option_rows() -> dict[str, list[str]]:
    """Each options-table row by its flag, split into cells (a `\\|` inside a cell is not a cell break)."""
    rows: dict[str, list[str]] = {}
    for match in ROW.finditer(README):
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(0))[1:-1]]
        rows[match.group(1)] = cells
    return rows


def plain(cell: str) -> str:
    """A table cell as its words: code-span backticks dropped, `\\|` read as `|`."""
    return cell.replace("`", "").replace("\\|", "|")


def test_readme_options_table_lists_every_option_with_its_ini_key_and_env_var() -> None:
    rows = option_rows()
    assert set(rows) == {o.cli for o in OPTIONS}
    for option in OPTIONS:
        assert len(rows[option.cli]) == 4, option.cli
        assert rows[option.cli][1] == f"`{option.ini}`" and rows[option.cli][2] == f"`{option.env}`", option.cli


def test_readme_options_table_describes_each_option_with_its_help_text() -> None:
    """Rule: the description cell starts with the option's help text, word for word (code spans
    allowed); README-only detail may follow it. So `pytest --help` and the README never disagree."""
    rows = option_rows()
    for option in OPTIONS:
        description = plain(rows[option.cli][3])
        assert description.startswith(option.help), (
            f"{option.cli}: the README says {description!r}, but its help text is {option.help!r}")


def test_readme_mentions_every_public_name() -> None:
    """Every name in `pytest_nestedkvm.__all__` appears as code (in backticks) somewhere in the README."""
    in_code = {word for span in re.findall(r"`([^`\n]+)`", README) for word in re.findall(r"\w+", span)}
    missing = [name for name in pytest_nestedkvm.__all__ if name not in in_code]
    assert not missing, f"public names the README never mentions: {missing}"
