"""The README's options table moves with the code."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_nestedkvm.settings import OPTIONS

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_options_table_lists_every_option_with_its_ini_key_and_env_var() -> None:
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(--nested-[a-z0-9-]+)(?: [^`]*)?` \|.*$", README, re.M)}
    assert set(rows) == {o.cli for o in OPTIONS}
    for option in OPTIONS:
        assert f"`{option.ini}`" in rows[option.cli] and f"`{option.env}`" in rows[option.cli], option.cli
