"""LMDB engine: namespaces are named databases; one apply is one write transaction."""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb

from distribkv.storage.api import (
    CallGate,
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
    BackendLockedError,
    CorruptionError,
    InvalidKeyError,
    StorageError,
    StorageFullError,
)
from distribkv.storage.space import free_bytes
from distribkv_lmdb import CAPABILITIES

LOCK_FILE = "distribkv-lmdb.lock"
_CORRUPT = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError)
#: A commit that fails with EIO while the file system has less free than this (or than twice
#: what the commit wrote) failed for want of space.
_FULL_MARGIN = 1024 * 1024


class LmdbEngine(StorageEngine):
    name = "lmdb"
    capabilities = CAPABILITIES

    def __init__(self, path: Path, sync: bool, settings: dict[str, Any]):
        self._path = path
        self._sync = sync
        self._settings = settings
        self._gate = CallGate(f"the lmdb backend at {path}")
        # LMDB lets two processes (and two handles in one process) open the same map, which
        # breaks its locking assumptions: hold an exclusive lock for the engine's whole life.
        self._lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BackendLockedError(
                f"LMDB data directory {path} is already open (lock file {LOCK_FILE} is held)"
            ) from None
        env = None
        try:
            env = lmdb.open(
                str(path),
                map_size=settings["map_size"],
                max_dbs=len(Namespace),
                max_readers=settings["max_readers"],
                sync=sync,
                metasync=True,
                readahead=False,
                subdir=True,
            )
            self._dbs = {ns: env.open_db(ns.value.encode()) for ns in Namespace}
        except Exception as exc:
            if env is not None:
                env.close()
            os.close(self._lock_fd)
            if isinstance(exc, lmdb.Error):
                raise self._error(exc, "opening") from exc
            raise StorageError(f"LMDB opening at {path}: {exc}") from exc
        self._env = env

    def _error(self, exc: Exception, doing: str, written: int = 0) -> StorageError:
        text = f"LMDB {doing} at {self._path}: {exc}"
        if isinstance(exc, lmdb.MapFullError):
            return StorageFullError(f"{text} (raise map_size in [storage.lmdb])")
        if isinstance(exc, lmdb.BadValsizeError):
            return InvalidKeyError(text)
        if isinstance(exc, _CORRUPT):
            return CorruptionError(text)
        message = str(exc).lower()
        if "no space left" in message or "disk quota" in message:
            return StorageFullError(text)
        if doing == "write" and "input/output error" in message and self._full(written):
            # LMDB reports a short write of its pages as EIO: with the disk (nearly) full,
            # that is what it was. The commit did not happen; the environment stays usable.
            return StorageFullError(f"{text} (the disk is full)")
        if self._gate.closed:
            return BackendClosedError(f"the lmdb backend at {self._path} is closed")
        return StorageError(text)

    def _full(self, written: int) -> bool:
        try:
            return free_bytes(self._path) < max(_FULL_MARGIN, 2 * written)
        except OSError:
            return False

    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        with self._gate:
            try:
                with self._env.begin(db=self._dbs[ns], buffers=False) as txn:
                    return txn.get(key)
            except lmdb.Error as exc:
                raise self._error(exc, "get") from exc

    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._gate:
            try:
                with self._env.begin(db=self._dbs[ns], buffers=False) as txn:
                    return [txn.get(key) for key in keys]
            except lmdb.Error as exc:
                raise self._error(exc, "get_many") from exc

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        dbs = self._dbs
        written = 0
        with self._gate:
            try:
                with self._env.begin(write=True) as txn:
                    for op in ops:
                        if type(op) is Put:
                            txn.put(op.key, op.value, db=dbs[op.ns])
                            written += len(op.key) + len(op.value)
                        else:
                            txn.delete(op.key, db=dbs[op.ns])
                if sync and not self._sync:
                    self._env.sync(True)
            except lmdb.Error as exc:
                raise self._error(exc, "write", written) from exc

    def scan(self, ns, start=None, stop=None, *, limit=None) -> Scan:
        with self._gate:
            # One read transaction: the scan sees the snapshot of its start, whatever commits.
            try:
                txn = self._env.begin(db=self._dbs[ns], buffers=False)
            except lmdb.Error as exc:
                raise self._error(exc, "scan") from exc
            try:
                cursor = txn.cursor()
                positioned = cursor.set_range(start) if start is not None else cursor.first()
            except lmdb.Error as exc:
                txn.abort()
                raise self._error(exc, "scan") from exc
        release = functools.partial(self._gate.release, txn.abort)
        pairs = self._pairs(cursor, stop, limit) if positioned else iter(())
        return self._gate.track(Scan(pairs, release))

    def _pairs(self, cursor, stop, limit) -> Iterator[tuple[bytes, bytes]]:
        count = 0
        while limit is None or count < limit:
            with self._gate:
                try:
                    key, value = cursor.item()
                    if stop is not None and key >= stop:
                        return
                    more = cursor.next()
                except lmdb.Error as exc:
                    raise self._error(exc, "scan") from exc
            count += 1
            yield key, value
            if not more:
                return

    def stats(self) -> StorageStats:
        with self._gate:
            try:
                with self._env.begin() as txn:
                    keys = {ns.value: txn.stat(self._dbs[ns])["entries"] for ns in Namespace}
                info = self._env.info()
            except lmdb.Error as exc:
                raise self._error(exc, "stats") from exc
        return StorageStats(
            backend=self.name,
            path=str(self._path),
            disk_bytes=disk_usage(self._path),
            keys=keys,
            details={
                "map_size": info["map_size"],
                "last_pgno": info["last_pgno"],
                "sync": self._sync,
                **self._settings,
            },
        )

    def close(self) -> None:
        self._gate.close(self._free)

    def _free(self) -> None:
        try:
            self._env.close()
        finally:
            os.close(self._lock_fd)
