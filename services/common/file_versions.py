"""Whether files changed since they were last read, for services that follow files rewritten while they run (TLS
certificates cert-manager renews, the API keys file): what a mounted Kubernetes Secret changes is a symlink, so a
new version shows as a new inode even where the modification time would not tell."""
from __future__ import annotations

from pathlib import Path


def file_versions(paths) -> tuple:
    """One (inode, mtime, size) per path, None for a path that cannot be read: equal tuples, same files."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)
