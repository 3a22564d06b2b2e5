"""RocksDB engine: namespaces are column families; one apply is one write batch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import rocksdict

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
from distribkv.storage.errors import (
    BackendClosedError,
    StorageError,
    StorageFullError,
    from_status,
)
from distribkv.storage.space import REOPEN_MARGIN, Reopener, unflushed_bytes
from distribkv_rocksdb import CAPABILITIES

log = logging.getLogger(__name__)

FAMILY = {ns: ns.value for ns in Namespace}


def _options(settings: dict[str, Any], cache: rocksdict.Cache) -> rocksdict.Options:
    # raw_mode: keys and values are stored as given; without it rocksdict type-tags them.
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_paranoid_checks(True)
    options.set_write_buffer_size(settings["write_buffer_size"])
    options.set_max_background_jobs(settings["max_background_jobs"])
    options.set_keep_log_file_num(3)
    # Bound the write-ahead log (by default up to 4x all memtables: hundreds of MiB with three
    # column families), which an open replays into table files: that needs free space.
    options.set_max_total_wal_size(4 * settings["write_buffer_size"])
    # The manifest is preallocated 4 MiB at a time by default: space an open on a nearly full
    # disk may not have.
    options.set_manifest_preallocation_size(256 * 1024)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    if settings["bloom_filter_bits"] > 0:
        table.set_bloom_filter(settings["bloom_filter_bits"], False)
    options.set_block_based_table_factory(table)
    return options


class RocksDBEngine(StorageEngine):
    name = "rocksdb"
    capabilities = CAPABILITIES

    def __init__(self, path: Path, settings: dict[str, Any]):
        self._path = path
        self._settings = settings
        self._cache = rocksdict.Cache(settings["block_cache_size"])
        self._open()
        self._read = rocksdict.ReadOptions()
        self._read.set_verify_checksums(True)
        # Every write goes to the WAL unsynced; a synced apply then syncs the WAL (see apply).
        self._write = rocksdict.WriteOptions()
        self._write.sync = False
        self._sync_failed: str | None = None
        self._gate = CallGate(f"the rocksdb backend at {path}")
        # After a full disk RocksDB refuses every write until it is reopened (rocksdict has no
        # DB::Resume): the reopener reopens it in place once there is room again. Writes go one
        # at a time, so that none is written on a handle after a failed one.
        self._writing = threading.Lock()
        self._reopener = Reopener(self._gate, path, self._reopen, self._room_to_reopen)

    def _open(self) -> None:
        settings, path = self._settings, self._path
        try:
            families = {name: _options(settings, self._cache) for name in FAMILY.values()}
            self._db: Any = rocksdict.Rdict(
                str(path), _options(settings, self._cache), column_families=families
            )
            self._cf: dict[Namespace, Any] = {
                ns: self._db.get_column_family(FAMILY[ns]) for ns in Namespace
            }
            self._handles = {ns: self._db.get_column_family_handle(FAMILY[ns]) for ns in Namespace}
        except Exception as exc:  # rocksdict raises bare Exception with RocksDB's status text
            raise from_status(str(exc), f"opening RocksDB at {path}") from exc

    def _room_to_reopen(self) -> int:
        # Opening replays the WAL into table files, and starts a new WAL.
        return unflushed_bytes(self._path) + REOPEN_MARGIN

    def _reopen(self) -> None:
        """Close the handle and open a new one (inside the gate's swap: no call runs)."""
        self._close_handle()
        try:
            self._open()
        except StorageError as exc:
            self._db = HandleLost(exc)
            self._cf = {ns: self._db for ns in Namespace}
            raise
        self._sync_failed = None

    def _close_handle(self) -> None:
        db, families = self._db, list(self._cf.values())
        self._db = HandleLost(StorageError(f"RocksDB at {self._path} is closed"))
        self._cf = {ns: self._db for ns in Namespace}
        self._handles = {}
        if isinstance(db, HandleLost):
            return
        if self._reopener.failure is None:
            try:
                # Memtables out to table files, so the next open replays an empty WAL: an open
                # that replays one writes it out as table files, which a nearly full disk
                # may have no room for.
                for family in families:
                    family.flush(True)
            except Exception as exc:  # noqa: BLE001 - the WAL still has it all
                log.warning("flushing RocksDB at %s before closing: %s", self._path, exc)
        del families
        try:
            db.close()
        except rocksdict.DbClosedError:
            pass
        except Exception as exc:  # noqa: BLE001 - it closes anyway; say why it complained
            # After a failed write RocksDB reports that error again as it closes.
            log.warning("closing RocksDB at %s: %s", self._path, exc)

    def _error(self, exc: Exception, doing: str) -> StorageError:
        if self._gate.closed or isinstance(exc, rocksdict.DbClosedError):
            return BackendClosedError(f"the rocksdb backend at {self._path} is closed")
        return from_status(str(exc), f"RocksDB {doing} at {self._path}")

    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        with self._gate:
            try:
                return self._cf[ns].get(key, None, self._read)
            except Exception as exc:
                raise self._error(exc, "get") from exc

    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._gate:
            if not keys:
                return []
            try:
                # A multi-get reads all keys at one sequence number.
                values: Any = self._cf[ns].get(list(keys), None, self._read)
                return values
            except Exception as exc:
                raise self._error(exc, "get_many") from exc

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        reopener = self._reopener
        if reopener.failure is not None:
            reopener.recover()
        with self._gate, self._writing:
            reopener.refuse()  # a write that ran meanwhile may have failed
            if self._sync_failed is not None:
                raise StorageError(
                    f"RocksDB at {self._path} takes no more writes: a WAL sync failed"
                    f" ({self._sync_failed}); reopen it to recover what reached the disk"
                )
            try:
                # rocksdict holds the GIL for a whole write, its fsync included, which would
                # stop every other thread of the node (reads too) for each synced write. Its
                # flush_wal lets go of the GIL: a write then a WAL sync is as durable on
                # return, and readable from the write on (a moment before it is durable).
                # (The batch is no local: a traceback keeps this frame, and a batch holds
                # column families, which hold the database open, so it could not reopen.)
                self._db.write(self._batch(ops), self._write)
            except Exception as exc:
                error = self._error(exc, "write")
                reopener.stopped(error)
                raise error from exc
            if sync:
                try:
                    self._db.flush_wal(True)
                except Exception as exc:
                    error = self._error(exc, "syncing the WAL")
                    if isinstance(error, StorageFullError):
                        # The reopen replays what reached the WAL; the write was not
                        # acknowledged, so it may or may not be there afterwards.
                        reopener.stopped(error)
                    else:
                        # The write is in the memtable but maybe not on disk: no later write
                        # may be acknowledged as if the log before it were durable.
                        self._sync_failed = str(exc)
                    raise error from exc

    def recover(self) -> None:
        self._reopener.recover()

    def _batch(self, ops: Iterable[Op]) -> rocksdict.WriteBatch:
        handles = self._handles
        batch = rocksdict.WriteBatch(raw_mode=True)
        for op in ops:
            if type(op) is Put:
                batch.put(op.key, op.value, handles[op.ns])
            else:
                batch.delete(op.key, handles[op.ns])
        return batch

    def scan(self, ns, start=None, stop=None, *, limit=None) -> Scan:
        with self._gate:
            try:
                # A RocksDB iterator pins the version current at its creation: a consistent
                # view (iterating a rocksdict Snapshot object would return live data).
                iterator = self._cf[ns].iter(self._read)
                if start is None:
                    iterator.seek_to_first()
                else:
                    iterator.seek(start)
            except Exception as exc:
                raise self._error(exc, "scan") from exc
        # Closing the generator drops the last reference to the iterator, which frees it.
        return self._gate.track(Scan(self._pairs(iterator, stop, limit), None))

    def _pairs(self, iterator, stop, limit) -> Iterator[tuple[bytes, bytes]]:
        count = 0
        while limit is None or count < limit:
            with self._gate:
                try:
                    if not iterator.valid():
                        iterator.status()
                        return
                    key = iterator.key()
                    if stop is not None and key >= stop:
                        return
                    value = iterator.value()
                    iterator.next()
                except Exception as exc:
                    raise self._error(exc, "scan") from exc
            count += 1
            yield key, value

    def stats(self) -> StorageStats:
        with self._gate:
            try:
                keys = {
                    ns.value: self._cf[ns].property_int_value("rocksdb.estimate-num-keys")
                    for ns in Namespace
                }
                sst = self._db.property_int_value("rocksdb.total-sst-files-size")
            except Exception as exc:
                raise self._error(exc, "stats") from exc
        return StorageStats(
            backend=self.name,
            path=str(self._path),
            disk_bytes=disk_usage(self._path),
            keys=keys,
            details={"estimated": True, "sst_bytes": sst, **self._settings},
        )

    def compact(self, ns: Namespace | None = None) -> None:
        with self._gate:
            try:
                for one in Namespace if ns is None else (ns,):
                    self._cf[one].compact_range(None, None)
            except Exception as exc:
                raise self._error(exc, "compaction") from exc

    def close(self) -> None:
        self._gate.close(self._close_handle)
