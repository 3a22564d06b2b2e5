"""The template's engine: in memory, laid out the way an engine over a native library is.

For a real engine keep this shape and replace the dictionaries with the library's handle. Each
method says what it must guarantee; the conformance suite (``distribkv.testing``) checks every
one of those guarantees. The core validates keys and values before they get here and seals
every value in a checksummed envelope: the engine stores opaque bytes, unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# A real engine imports its native library here, at module level (``import lmdb``): only
# open_template() imports this module, so listing plugins never loads the library.
from distribkv.storage.api import (
    CallGate,
    Namespace,
    Op,
    Put,
    Scan,
    StorageEngine,
    StorageStats,
)
from distribkv.storage.errors import StorageError, StorageFullError
from distribkv_template import CAPABILITIES, NAME


class TemplateEngine(StorageEngine):
    """One open data directory. Every method is safe to call from several threads at once."""

    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, path: Path, settings: dict[str, Any]):
        self._path = path
        self._max_bytes: int = settings["max_bytes"]
        # A persistent engine opens its library's handle here, translating what the library
        # raises as every method does, and refuses a second open of the same directory, from
        # this process or another, with BackendLockedError (LevelDB and RocksDB refuse it
        # themselves; LMDB needs a lock file of the engine's own, see backends/lmdb).
        #
        # The gate lets calls in until close(): every method runs inside ``with self._gate``,
        # which raises BackendClosedError once the engine is closed, and close() frees the
        # handles only when no call is running any more.
        self._gate = CallGate(f"the template backend at {path}")
        # Readers and writers take this lock, so no reader sees half an apply. A real engine
        # has the same from its write batches (or transactions) and its snapshots.
        self._lock = threading.Lock()
        self._tables: dict[Namespace, dict[bytes, bytes]] = {ns: {} for ns in Namespace}
        self._bytes = 0  # keys and values held, for max_bytes

    def _error(self, exc: BaseException, doing: str) -> StorageError:
        """The distribkv error for what went wrong while ``doing``: nothing native leaves the
        engine. A real engine maps its library's exceptions here: no space left (or a full
        map) -> StorageFullError, damaged files or a failed checksum -> CorruptionError, the
        directory held by another handle -> BackendLockedError, the rest -> StorageError.
        (LevelDB and RocksDB report failures as text: see ``storage.errors.from_status``.)
        A full disk must be StorageFullError however the library words it: LMDB reports a
        short write as EIO, and backends/lmdb asks the file system whether it is full."""
        text = f"template backend at {self._path}, {doing}: {exc!r}"
        if isinstance(exc, MemoryError):
            return StorageFullError(text)
        return StorageError(text)

    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        # A missing key is None, not an error; an empty value is b"", not None.
        # (A real engine wraps its library call in try/except and raises self._error(...).)
        with self._gate, self._lock:
            return self._tables[ns].get(key)

    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        # One value per key, in the order asked (duplicates too), all read from one snapshot.
        with self._gate, self._lock:
            table = self._tables[ns]
            return [table.get(key) for key in keys]

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        # All or nothing, in order, visible at once: readers wait on the lock while it runs,
        # and a failure half-way undoes what was done before it. With sync=True the change is
        # durable (flushed to disk) when apply returns; with sync=False it must at least
        # survive a crash of the process. Memory keeps neither, as persistent=False declares.
        ops = list(ops)
        with self._gate, self._lock:
            tables = self._tables
            size = self._bytes
            undo: list[tuple[dict[bytes, bytes], bytes, bytes | None]] = []
            try:
                for op in ops:
                    table = tables[op.ns]
                    old = table.get(op.key)
                    undo.append((table, op.key, old))
                    if old is not None:
                        size -= len(op.key) + len(old)
                    if type(op) is Put:
                        table[op.key] = op.value
                        size += len(op.key) + len(op.value)
                    else:
                        table.pop(op.key, None)  # deleting a missing key is not an error
                if size > self._max_bytes:
                    raise StorageFullError(
                        f"template backend at {self._path}: this write would hold {size}"
                        f" bytes; the limit is {self._max_bytes} (max_bytes in"
                        " [storage.template])"
                    )
            except BaseException as exc:
                for table, key, value in reversed(undo):
                    if value is None:
                        table.pop(key, None)
                    else:
                        table[key] = value
                if isinstance(exc, MemoryError):
                    raise self._error(exc, "writing") from exc
                raise
            self._bytes = size

    def recover(self) -> None:
        # This engine never stops taking writes. One whose handle refuses every write after a
        # full disk until it is reopened (LevelDB, RocksDB) reopens it here, and at the start of
        # apply, once there is room: see storage.space.Reopener and backends/leveldb. Writes
        # must resume by themselves when space is freed; the suite checks it on a real full
        # disk (a tmpfs, when run as root) for persistent engines. The core keeps the free-space
        # reserve in front of every engine (storage.space.SpaceReserve): the engine must open,
        # and take deletes, on a disk below it.
        pass

    def scan(
        self,
        ns: Namespace,
        start: bytes | None = None,
        stop: bytes | None = None,
        *,
        limit: int | None = None,
    ) -> Scan:
        # Pairs with start <= key < stop in byte order, at most limit of them, as they were
        # when the scan began, whatever is written while it is read. This engine copies them;
        # a real one reads from a snapshot, read transaction or cursor, and frees it in the
        # Scan's ``release``, which is called exactly once, through the gate:
        #     Scan(pairs, functools.partial(self._gate.release, snapshot.close))
        with self._gate, self._lock:
            try:
                pairs = sorted(
                    (key, value)
                    for key, value in self._tables[ns].items()
                    if (start is None or key >= start) and (stop is None or key < stop)
                )[:limit]
            except MemoryError as exc:
                raise self._error(exc, "scanning") from exc
        # Tracked by the gate: close() ends an open scan, whose next item then raises
        # BackendClosedError instead of looking like the end of the data.
        return self._gate.track(Scan(iter(pairs), None))

    def stats(self) -> StorageStats:
        # Cheap enough for /status; a count the engine cannot know cheaply is None.
        with self._gate, self._lock:
            keys: dict[str, int | None] = {ns.value: len(t) for ns, t in self._tables.items()}
            held = self._bytes
        return StorageStats(
            backend=self.name,
            path=str(self._path),
            disk_bytes=0,  # a real engine: storage.api.disk_usage(self._path)
            keys=keys,
            details={"bytes_held": held, "max_bytes": self._max_bytes},
        )

    def close(self) -> None:
        # Idempotent: the gate frees once, and a second close() does nothing. Afterwards every
        # method raises BackendClosedError (from ``with self._gate``).
        self._gate.close(self._free)

    def _free(self) -> None:
        # Called once, when no call is running and every open scan has been ended: a real
        # engine closes its library handle here and releases the directory's lock.
        for table in self._tables.values():
            table.clear()
