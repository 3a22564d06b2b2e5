"""The free-space reserve: writes that add data stop while the disk is nearly full.

Once a disk is really full, an engine cannot be trusted with it any more: LevelDB and RocksDB
need space to write a delete (a tombstone in the log, later a table file) and to open at all
(the log is replayed into a new table), and after a failed write their handles refuse every
later one until they are reopened. So, like the databases that run on other people's disks
(CockroachDB keeps a ballast file, Elasticsearch stops writes at its flood-stage watermark), the
store keeps a reserve: while the file system of the data directory has less than
``min_free_bytes`` free, an apply that puts into the data namespace is refused with
:class:`~distribkv.storage.errors.StorageFullError` (HTTP 507) before it reaches the engine.
Deletes, ``/purge``, replication-log trims and node metadata still go through: they are what
frees space, and the reserve is the room they need. Writes resume by themselves as soon as
space is back.

A threshold rather than a ballast file: it also holds when another process fills the disk, it
needs no file to keep and no rule for when to give it back, and nothing is allocated on open.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from distribkv.storage.errors import StorageFullError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MIN_FREE_BYTES", "SpaceReserve", "free_bytes", "unflushed_bytes"]

#: The reserve of a node that does not set ``[storage] min_free_bytes``: room for LevelDB's
#: and RocksDB's default memtables to be flushed, deletes and an engine's reopen.
DEFAULT_MIN_FREE_BYTES = 128 * 1024 * 1024

#: How often (seconds) the file system is asked how much is free; in between, the bytes put
#: since the last answer are counted off it, so a write storm cannot run past the reserve.
CHECK_INTERVAL = 0.1


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def unflushed_bytes(path: Path, suffix: str = ".log") -> int:
    """The size of an LSM engine's write-ahead logs under ``path``: what reopening it replays
    into memory and writes out as table files again."""
    total = 0
    for entry in os.scandir(path):
        if entry.name.endswith(suffix):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    return total


class SpaceReserve:
    """Refuses data writes while the file system of ``path`` has less than ``min_free`` bytes
    free. :meth:`check` is on every write's path, so it asks the file system (``statvfs``) at
    most every ``interval`` seconds and counts the bytes put in between off the last answer.
    Thread-safe: concurrent writers may race on the count, which only makes it approximate."""

    def __init__(
        self,
        path: Path,
        min_free: int,
        *,
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = path
        self.min_free = min_free
        self.interval = interval
        self._clock = clock
        self._free = 0
        self._put = 0  # bytes put since _free was measured
        self._expires = float("-inf")
        #: True while writes are refused: the change either way is logged once, not each write.
        self.refusing = False

    def free(self) -> int:
        """Free bytes now (asks the file system)."""
        self._free = free_bytes(self.path)
        self._put = 0
        self._expires = self._clock() + self.interval
        return self._free

    def check(self, adding: int) -> None:
        """Let a write that puts ``adding`` bytes in, or raise StorageFullError."""
        if self._clock() >= self._expires:
            self.free()
        left = self._free - self._put - adding
        if left < self.min_free:
            if not self.refusing:
                self.refusing = True
                log.warning(
                    "disk of %s below the reserve: about %d bytes free, less than"
                    " [storage] min_free_bytes (%d); writes that add data get 507 until space"
                    " is freed",
                    self.path,
                    max(self._free - self._put, 0),
                    self.min_free,
                )
            raise StorageFullError(
                f"the disk of {self.path} is nearly full: about {max(self._free - self._put, 0)}"
                f" bytes free, and this write of {adding} bytes would leave less than the"
                f" reserve of {self.min_free} ([storage] min_free_bytes); writes that add data"
                " are refused until space is freed (deletes still work)"
            )
        self._put += adding
        if self.refusing:
            self.refusing = False
            log.info("disk of %s has room again: writes are taken", self.path)


#: Seconds between two attempts of an engine to take writes again after a full disk.
RETRY_INTERVAL = 0.25
#: Room an engine needs besides what it replays when it reopens (new log, manifest, info log).
REOPEN_MARGIN = 2 * 1024 * 1024


class Reopener:
    """Brings an engine whose handle stopped taking writes after a full disk back: LevelDB and
    RocksDB refuse every write after a failed one until they are reopened (and a LevelDB log
    that got half a record must not get another one after it).

    The engine reports such a failure with :meth:`stopped`, refuses writes while
    :attr:`failure` is set, and calls :meth:`recover` before each write: at most every
    ``retry`` seconds, and only once the file system has room for the reopen (``room()``
    bytes), ``reopen()`` runs inside ``gate.swap`` (no call runs meanwhile, open scans end).
    ``reopen`` closes the old handle and opens a new one; if that fails it leaves a
    :class:`~distribkv.storage.api.HandleLost` and raises the StorageError, and the next
    attempt tries again. Reads go on with the old handle until then."""

    def __init__(
        self,
        gate,
        path: Path,
        reopen: Callable[[], None],
        room: Callable[[], int],
        *,
        retry: float = RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        import threading

        self.gate = gate
        self.path = path
        self._reopen = reopen
        self._room = room
        self.retry = retry
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at = float("-inf")
        #: The error that stopped writes, or None while they are taken.
        self.failure: StorageFullError | None = None

    def stopped(self, error: Exception) -> None:
        """A write failed with ``error``; a full disk stops writes until :meth:`recover`."""
        if isinstance(error, StorageFullError):
            if self.failure is None:
                log.error(
                    "disk full at %s: writes stop until the engine can reopen there (%s)",
                    self.path,
                    error,
                )
            # A copy without the traceback, whose frames would keep native objects (and with
            # them the handle to reopen) alive.
            self.failure = StorageFullError(str(error))

    def refuse(self) -> None:
        """Raise a StorageFullError if writes are stopped (a fresh one each time)."""
        failure = self.failure
        if failure is not None:
            raise self._still(failure, None)

    def recover(self) -> None:
        """Reopen if writes are stopped and it is time and there is room; else raise."""
        if self.failure is None:
            return
        with self._lock:
            failure = self.failure
            if failure is None:
                return  # another thread recovered meanwhile
            now = self._clock()
            if now < self._retry_at:
                raise self._still(failure, None)
            self._retry_at = now + self.retry
            needed = self._room()
            free = free_bytes(self.path)
            if free < needed:
                raise self._still(failure, f"{free} bytes are free, it needs {needed}")
            self.gate.swap(self._swap, f"writes stopped after a full disk: {failure}")

    def _swap(self) -> None:
        try:
            self._reopen()
        except StorageFullError as exc:
            self.failure = StorageFullError(str(exc))
            raise
        except Exception:
            # Not a full disk: the handle is lost for another reason, which every call reports.
            self.failure = None
            raise
        self.failure = None
        log.info("the engine at %s reopened after a full disk: writes are taken again", self.path)

    def _still(self, failure: StorageFullError, why: str | None) -> StorageFullError:
        detail = f"; {why}" if why else ""
        return StorageFullError(
            f"writes are stopped until the engine at {self.path} can reopen{detail}"
            f" (after: {failure})"
        )
