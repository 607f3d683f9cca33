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


class FileWatch:
    """Tells, each time it is asked, whether the files changed since it last looked (or since it was made)."""

    def __init__(self, paths) -> None:
        self.paths = [p for p in paths if p]
        self._seen = file_versions(self.paths)

    def changed(self) -> bool:
        if (now := file_versions(self.paths)) == self._seen:
            return False
        self._seen = now
        return True
