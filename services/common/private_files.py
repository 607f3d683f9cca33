"""Files that hold secrets (API keys, tokens, passwords, private keys): readable by their owner only from their
first byte. Writing first and restricting after leaves a moment when any local user can read them."""
from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | Path, data: str | bytes) -> None:
    """Create or replace the file's contents with mode 0600 (an existing file's mode is restricted first too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
