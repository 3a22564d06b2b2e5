"""Private files: what a node writes (its data, its logs, rollback files) is readable by its
owner only, since it holds every key and value in the clear.

Storage engines create their files themselves, with the process's umask: ``distribkv serve``
and ``distribkv launch`` set :data:`PRIVATE_UMASK` first (:func:`private_umask`), and the
directories a node makes are created with mode 0700 whatever the umask.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "make_private_dir", "open_private_append", "private_umask"]

#: Files 0600 and directories 0700.
PRIVATE_UMASK = 0o077


def private_umask() -> int:
    """Set the process's umask to :data:`PRIVATE_UMASK` and return the previous one."""
    return os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700. A directory that exists keeps
    its mode, except ``path`` itself: a node's own directory is made private if it is not."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
    if path.is_dir() and path.stat().st_mode & 0o077:
        path.chmod(0o700)


def open_private_append(path: Path):
    """``path`` opened for appending bytes, created with mode 0600 if it is new."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
