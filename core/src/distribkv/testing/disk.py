"""A real full disk for tests: a small tmpfs of the test's own, and files that take its space.

Mounting needs root; :func:`small_disk` skips the test (with the reason) where it cannot mount,
and always unmounts what it mounted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from distribkv.storage.space import free_bytes

__all__ = ["free_bytes", "small_disk", "take_space"]

MiB = 1024 * 1024


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (created) for the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs at {path}: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        # A handle a failed test left open makes the mount busy: detach it lazily then.
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def take_space(file: Path, leave: int, *, chunk: int = MiB) -> int:
    """Grow ``file`` until the file system has about ``leave`` bytes free (never below 0:
    a full disk stops it); returns the bytes it added."""
    added = 0
    with open(file, "ab") as out:
        fd = out.fileno()
        # Bounded: at most the free space there was, one chunk at a time.
        for _ in range(free_bytes(file.parent) // 4096 + 1):
            want = min(chunk, free_bytes(file.parent) - leave)
            if want <= 0:
                break
            try:
                added += os.write(fd, b"\0" * want)
            except OSError:
                break
    return added
