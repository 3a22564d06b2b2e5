"""LevelDB engine: namespaces are one-byte key prefixes in one database."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import plyvel

from distribkv.storage.api import (
    CallGate,
    HandleLost,
    Namespace,
    Op,
    Put,
    Scan,
    StorageEngine,
    StorageStats,
    disk_usage,
)
from distribkv.storage.errors import BackendClosedError, StorageError, from_status
from distribkv.storage.space import REOPEN_MARGIN, Reopener, unflushed_bytes
from distribkv_leveldb import CAPABILITIES

PREFIX = {Namespace.DATA: b"d", Namespace.LOG: b"l", Namespace.META: b"m"}
# The first key past each namespace: the exclusive upper bound of an unbounded scan.
PREFIX_END = {ns: bytes([p[0] + 1]) for ns, p in PREFIX.items()}
#: Every key of every namespace is in [_FIRST, _PAST_LAST).
_FIRST = min(PREFIX.values())
_PAST_LAST = max(PREFIX_END.values())


class LevelDBEngine(StorageEngine):
    name = "leveldb"
    capabilities = CAPABILITIES

    def __init__(self, path: Path, settings: dict[str, Any]):
        self._path = path
        self._settings = settings
        self._db: Any = self._open()
        # Every plyvel call runs inside the gate: freeing the DB under a running call crashes.
        self._gate = CallGate(f"the leveldb backend at {path}")
        # One write at a time, so that none follows a failed one on the same handle: a log
        # write cut short by a full disk leaves half a record, and LevelDB (which does not stop
        # by itself then) would append the next record after it, where recovery cannot read
        # it. After a full disk, the reopener reopens the database once there is room again.
        self._writing = threading.Lock()
        self._reopener = Reopener(self._gate, path, self._reopen, self._room_to_reopen)

    def _open(self) -> Any:
        settings = self._settings
        # plyvel takes no bloom_filter_bits at all to mean "no filter".
        bloom = {"bloom_filter_bits": settings["bloom_filter_bits"]}
        if settings["bloom_filter_bits"] <= 0:
            bloom = {}
        try:
            return plyvel.DB(
                str(self._path),
                create_if_missing=True,
                paranoid_checks=True,
                **bloom,
                lru_cache_size=settings["lru_cache_size"],
                write_buffer_size=settings["write_buffer_size"],
                block_size=settings["block_size"],
                max_open_files=settings["max_open_files"],
                compression=None if settings["compression"] == "none" else "snappy",
            )
        except (plyvel.Error, OSError) as exc:
            raise from_status(_text(exc), f"opening LevelDB at {self._path}") from exc

    def _room_to_reopen(self) -> int:
        # Opening replays the log into a new table file, next to the log it came from.
        return unflushed_bytes(self._path) + REOPEN_MARGIN

    def _reopen(self) -> None:
        """Close the handle and open a new one (inside the gate's swap: no call runs)."""
        old = self._db
        self._db = HandleLost(StorageError(f"LevelDB at {self._path} is being reopened"))
        if not isinstance(old, HandleLost):
            old.close()
        try:
            self._db = self._open()
        except StorageError as exc:
            self._db = HandleLost(exc)
            raise

    def _error(self, exc: Exception, doing: str) -> StorageError:
        if isinstance(exc, RuntimeError) or self._gate.closed:
            return BackendClosedError(f"the leveldb backend at {self._path} is closed")
        return from_status(_text(exc), f"LevelDB {doing} at {self._path}")

    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        with self._gate:
            try:
                return self._db.get(PREFIX[ns] + key, verify_checksums=True)
            except (plyvel.Error, RuntimeError) as exc:
                raise self._error(exc, "get") from exc

    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        prefix = PREFIX[ns]
        with self._gate:
            try:
                snapshot = self._db.snapshot()
                try:
                    return [snapshot.get(prefix + key, verify_checksums=True) for key in keys]
                finally:
                    snapshot.close()
            except (plyvel.Error, RuntimeError) as exc:
                raise self._error(exc, "get_many") from exc

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        reopener = self._reopener
        if reopener.failure is not None:
            reopener.recover()
        with self._gate, self._writing:
            reopener.refuse()  # a write that ran meanwhile may have failed
            try:
                # transaction=True: nothing is written if building the batch fails half way.
                with self._db.write_batch(transaction=True, sync=sync) as batch:
                    for op in ops:
                        if type(op) is Put:
                            batch.put(PREFIX[op.ns] + op.key, op.value)
                        else:
                            batch.delete(PREFIX[op.ns] + op.key)
            except (plyvel.Error, RuntimeError) as exc:
                error = self._error(exc, "write")
                reopener.stopped(error)
                raise error from exc

    def recover(self) -> None:
        self._reopener.recover()

    def scan(self, ns, start=None, stop=None, *, limit=None) -> Scan:
        prefix = PREFIX[ns]
        lower = prefix + (start or b"")
        upper = prefix + stop if stop is not None else PREFIX_END[ns]
        with self._gate:
            try:
                # A LevelDB iterator reads the implicit snapshot taken when it is created.
                iterator = self._db.iterator(start=lower, stop=upper, verify_checksums=True)
            except (plyvel.Error, RuntimeError) as exc:
                raise self._error(exc, "scan") from exc
        release = functools.partial(self._gate.release, iterator.close)
        return self._gate.track(Scan(self._pairs(iterator, limit), release))

    def _pairs(self, iterator, limit) -> Iterator[tuple[bytes, bytes]]:
        count = 0
        while limit is None or count < limit:
            with self._gate:
                try:
                    key, value = next(iterator)
                except StopIteration:
                    return
                except (plyvel.Error, RuntimeError) as exc:
                    raise self._error(exc, "scan") from exc
            count += 1
            yield key[1:], value

    def stats(self) -> StorageStats:
        with self._gate:
            try:
                sizes = {
                    ns.value: self._db.approximate_size(PREFIX[ns], PREFIX_END[ns])
                    for ns in Namespace
                }
                files = (self._db.get_property(b"leveldb.num-files-at-level0") or b"").decode()
            except (plyvel.Error, RuntimeError) as exc:
                raise self._error(exc, "stats") from exc
        return StorageStats(
            backend=self.name,
            path=str(self._path),
            disk_bytes=disk_usage(self._path),
            keys={ns.value: None for ns in Namespace},
            details={"approximate_bytes": sizes, "files_at_level0": files, **self._settings},
        )

    def compact(self, ns: Namespace | None = None) -> None:
        # Bounds always: plyvel's compact_range() without them compacts an empty range, which
        # only writes the memtable out and leaves the levels as they are.
        start, stop = (_FIRST, _PAST_LAST) if ns is None else (PREFIX[ns], PREFIX_END[ns])
        with self._gate:
            try:
                self._db.compact_range(start=start, stop=stop)
            except (plyvel.Error, RuntimeError) as exc:
                raise self._error(exc, "compaction") from exc

    def close(self) -> None:
        self._gate.close(self._free)

    def _free(self) -> None:
        if not isinstance(self._db, HandleLost):
            self._db.close()


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else str(exc)
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
