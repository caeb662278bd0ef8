"""Files in the plugin's cache that other processes and guests read while they may be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(target: Path, data: bytes) -> None:
    """`target` holds `data` whole or not at all (a temporary file renamed over it), mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # deeper levels and guests read the cache through its export
    os.replace(tmp, target)
