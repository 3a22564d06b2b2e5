"""The storage contract: what every storage backend provides to the node core.

A backend is a plugin that returns :class:`BackendSpec` objects from the
``distribkv_storage_backends`` hook. ``spec.open(path, durability=..., settings=...)`` returns a
:class:`StorageEngine` serving one node's data directory.

Engines store opaque bytes in three namespaces (data, replication log, metadata) and know nothing
of envelopes or limits: the core wraps every engine in :class:`distribkv.storage.store.Store`,
which validates keys, seals values in a checksummed envelope and is what the node uses.
"""

from __future__ import annotations

import abc
import enum
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from distribkv.storage.errors import (
    BackendClosedError,
    InvalidSettingError,
    StorageError,
    UnsupportedOperationError,
)

__all__ = [
    "DURABILITIES",
    "MAX_KEY_SIZE",
    "BackendSpec",
    "CallGate",
    "Capabilities",
    "Delete",
    "HandleLost",
    "Namespace",
    "Op",
    "Put",
    "Scan",
    "StorageEngine",
    "StorageStats",
    "at_least",
    "disk_usage",
    "one_of",
    "resolve_settings",
]

#: The longest key every backend accepts (LMDB's compiled-in limit, enforced everywhere).
MAX_KEY_SIZE = 511

#: ``"sync"``: an acknowledged write survives power loss; ``"async"``: it survives a process crash.
DURABILITIES = ("sync", "async")


class Namespace(enum.Enum):
    """Separate keyspaces of one data directory; one ``apply`` may span all of them."""

    DATA = "data"
    LOG = "log"
    META = "meta"


@attrs.frozen(slots=True)
class Put:
    """Store ``value`` under ``key`` in namespace ``ns``."""

    ns: Namespace
    key: bytes
    value: bytes


@attrs.frozen(slots=True)
class Delete:
    """Remove ``key`` from namespace ``ns`` (a missing key is not an error)."""

    ns: Namespace
    key: bytes


Op = Put | Delete


@attrs.frozen
class Capabilities:
    """What a backend declares about itself; the core and the test suite assume nothing else."""

    #: Data survives close and reopen (False for the in-memory backend).
    persistent: bool
    #: ``apply(sync=...)`` chooses durability per call. When False, the ``durability`` given to
    #: ``open`` decides for every write (``sync=True`` is still honoured, at a higher cost).
    per_write_sync: bool = True
    #: ``compact(ns)`` is available.
    compaction: bool = False
    #: Missing-key reads are answered by bloom filters without reading data blocks.
    bloom_filter: bool = False
    #: The engine verifies its own block checksums (the core's envelope checks values anyway).
    checksums: bool = False
    max_key_size: int = MAX_KEY_SIZE

    def names(self) -> list[str]:
        """The enabled capabilities, for listings."""
        flags = {
            "persistent": self.persistent,
            "per-write-sync": self.per_write_sync,
            "compaction": self.compaction,
            "bloom-filter": self.bloom_filter,
            "checksums": self.checksums,
        }
        return [name for name, on in flags.items() if on]


@attrs.frozen
class StorageStats:
    """A snapshot of a backend's size; counts a backend cannot know cheaply are None."""

    backend: str
    path: str
    disk_bytes: int
    keys: Mapping[str, int | None]
    details: Mapping[str, Any] = attrs.field(factory=dict)


class Scan:
    """An ordered iterator of ``(key, value)`` pairs over a consistent snapshot.

    It must be closed (use it as a context manager); it belongs to the thread that opened it.
    ``release`` frees the engine's snapshot, cursor or transaction and is called exactly once.
    """

    __slots__ = ("__weakref__", "_aborted", "_items", "_lock", "_release")

    def __init__(self, items: Iterator[tuple[bytes, bytes]], release: Callable[[], None] | None):
        self._items: Iterator[tuple[bytes, bytes]] | None = items
        self._release = release
        self._lock = threading.Lock()
        self._aborted: StorageError | None = None

    def __iter__(self) -> Scan:
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._items is None:
                if self._aborted is not None:
                    # Never let a scan cut short by close() look like a complete one.
                    raise self._aborted
                raise StopIteration
            return next(self._items)

    def close(self) -> None:
        with self._lock:
            items, self._items = self._items, None
            release, self._release = self._release, None
            if items is not None and hasattr(items, "close"):
                items.close()
            if release is not None:
                release()

    def abort(self, reason: str, error: type[StorageError] = BackendClosedError) -> None:
        """End the scan because its engine closes (or reopens); later ``next()`` raises
        ``error(reason)``."""
        with self._lock:
            if self._items is not None:
                self._aborted = error(reason)
        self.close()

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A scan dropped without close() still frees its snapshot.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing useful to do while collecting garbage
            pass


class CallGate:
    """Lets calls into a native library in until ``close()``, which waits for them.

    Native handles (plyvel's especially) crash the process when they are freed under a running
    call. Engines run every native call inside ``with gate:``, open scans register with
    ``track`` and free their cursors through ``release``, and ``close(free)`` frees the handles
    only when no call is running and every open scan has been ended. ``swap(replace)`` does the
    same for an engine that reopens its handles in place (after a full disk), and lets the
    calls that waited meanwhile go on with the new ones.
    """

    def __init__(self, what: str):
        self.what = what
        # Calls take the bare lock (cheap: every get passes here); only close() waits on the
        # condition, and only a call that ends during close() notifies it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = 0
        self.closed = False
        self._freed = False
        self._swapping = False
        self._scans: weakref.WeakSet = weakref.WeakSet()

    def __enter__(self) -> CallGate:
        with self._lock:
            while self._swapping and not self.closed:
                self._cond.wait()
            if self.closed:
                raise BackendClosedError(f"{self.what} is closed")
            self._active += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._active -= 1
            if (self.closed or self._swapping) and self._active == 0:
                self._cond.notify_all()

    def track(self, scan: Scan) -> Scan:
        with self._cond:
            self._scans.add(scan)
        return scan

    def release(self, free_cursor: Callable[[], None]) -> None:
        """Free a scan's cursor, unless the handles it belongs to are already gone."""
        with self._cond:
            if self._freed:
                return
            self._active += 1
        try:
            free_cursor()
        finally:
            self.__exit__()

    def swap(self, replace: Callable[[], None], reason: str) -> None:
        """Hold new calls, wait for running ones, end open scans (their next item raises
        ``StorageError(reason)``), then ``replace()`` the handles; the held calls then go on.
        Must not be called from inside the gate. BackendClosedError once closed."""
        with self._cond:
            # One swap at a time, never during close.
            self._cond.wait_for(lambda: not self._swapping or self.closed)
            if self.closed:
                raise BackendClosedError(f"{self.what} is closed")
            self._swapping = True
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._active == 0)
                scans = list(self._scans)
            for scan in scans:
                scan.abort(f"{self.what} was reopened during the scan: {reason}", StorageError)
            with self._cond:
                self._cond.wait_for(lambda: self._active == 0)
            replace()
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()

    def close(self, free: Callable[[], None]) -> bool:
        """Refuse new calls, wait for running ones, end open scans, then ``free()`` once.

        Returns False if the gate was already closed.
        """
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            self._cond.notify_all()  # calls held by a swap give up
            self._cond.wait_for(lambda: self._active == 0 and not self._swapping)
            scans = list(self._scans)
        for scan in scans:
            scan.abort(f"{self.what} was closed during the scan")
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0)
            try:
                free()
            finally:
                self._freed = True
        return True


class HandleLost:
    """Stands in for a native handle that an engine closed to reopen and could not open again:
    every use of it raises ``error`` (a StorageError), until a later reopen replaces it."""

    def __init__(self, error: StorageError):
        self.error = error

    def __getattr__(self, name: str) -> Any:
        raise self.error


class StorageEngine(abc.ABC):
    """One open data directory of a storage backend.

    Rules every engine follows (the conformance suite in :mod:`distribkv.testing` checks them):

    - Keys are 1..``capabilities.max_key_size`` bytes, values any bytes; the core validates
      both before calling, the engine stores them unchanged.
    - ``apply`` is all or nothing, in order, and visible to readers at once; with ``sync=True``
      it is durable when it returns.
    - ``get_many`` and ``scan`` read one consistent snapshot.
    - Every method is safe to call from several threads at once.
    - ``close()`` is idempotent; any other use after it raises ``BackendClosedError``.
    - Native exceptions are translated into :mod:`distribkv.storage.errors`.
    - A full disk or a full map is ``StorageFullError`` (HTTP 507), never a bare
      ``StorageError``. A failed apply leaves nothing behind that a later apply could build on,
      and every apply that returned stays readable, after a reopen too. Once space is back,
      applies succeed again with no reopen by the caller (see :meth:`recover`). The engine
      opens on a disk that is below the core's reserve (:mod:`distribkv.storage.space`): the
      reserve is there for deletes, for flushing what the engine holds in memory and for that.
    """

    #: The backend name this engine was opened as.
    name: str
    capabilities: Capabilities

    @abc.abstractmethod
    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""

    @abc.abstractmethod
    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent), read from one snapshot."""

    @abc.abstractmethod
    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        """Apply ``ops`` atomically and in order."""

    @abc.abstractmethod
    def scan(
        self,
        ns: Namespace,
        start: bytes | None = None,
        stop: bytes | None = None,
        *,
        limit: int | None = None,
    ) -> Scan:
        """Pairs with ``start <= key < stop`` in key order (None: unbounded), at most ``limit``."""

    @abc.abstractmethod
    def stats(self) -> StorageStats:
        """Sizes and counts, cheap enough for a status page."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the data directory; idempotent."""

    def compact(self, ns: Namespace | None = None) -> None:
        """Compact one namespace (or all); only when ``capabilities.compaction``."""
        raise UnsupportedOperationError(f"backend {self.name!r} does not support compaction")

    def recover(self) -> None:
        """Take writes again after a failed one, if the engine stopped taking them (LevelDB
        and RocksDB do after a full disk, until reopened); raise the StorageError that still
        stops them otherwise. ``apply`` calls it too, so writes resume by themselves once
        space is back; a caller that reads state before it writes (the replication log reads
        its last seq) calls it first, so that it reads what the recovered engine holds.
        A no-op for an engine that never stops taking writes (the default)."""
        return


@attrs.frozen
class BackendSpec:
    """A storage backend offered by a plugin.

    ``open(path, durability="sync", settings={})`` creates or opens the data directory ``path``.
    It must import the native library itself (lazily), so listing plugins never loads it.
    ``settings`` come from the ``[storage.<name>]`` table of ``sharding.toml``; names not in
    ``settings_help`` are rejected with :class:`~distribkv.storage.errors.InvalidSettingError`.
    """

    name: str
    open: Callable[..., StorageEngine]
    description: str
    capabilities: Capabilities
    #: setting name -> one line of help, for ``distribkv plugins`` and validation messages.
    settings_help: Mapping[str, str] = attrs.field(factory=dict)
    #: ``check_settings(settings) -> resolved settings``; raises InvalidSettingError. Lets a
    #: configuration be validated without opening (or importing) the engine.
    check_settings: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


#: A check of one setting: (predicate, what it must be), e.g. ``(lambda v: v > 0, "> 0")``.
SettingCheck = tuple[Callable[[Any], bool], str]


def at_least(minimum: int) -> SettingCheck:
    return (lambda value: value >= minimum, f">= {minimum}")


def one_of(*choices: str) -> SettingCheck:
    return (lambda value: value in choices, "one of " + ", ".join(repr(c) for c in choices))


def resolve_settings(
    backend: str,
    settings: Mapping[str, Any],
    defaults: Mapping[str, Any],
    checks: Mapping[str, SettingCheck] | None = None,
) -> dict[str, Any]:
    """``defaults`` updated with ``settings``; an unknown name, a wrong type or a value that
    fails its check is an InvalidSettingError naming the setting."""
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise InvalidSettingError(
            f"unknown setting(s) for backend {backend!r}: {', '.join(unknown)}"
            f" (known: {', '.join(sorted(defaults)) or 'none'})"
        )
    resolved = dict(defaults)
    for name, value in settings.items():
        expected = type(defaults[name])
        if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
            raise InvalidSettingError(
                f"setting {name!r} of backend {backend!r} must be {expected.__name__},"
                f" got {value!r}"
            )
        check = (checks or {}).get(name)
        if check is not None and not check[0](value):
            raise InvalidSettingError(
                f"setting {name!r} of backend {backend!r} must be {check[1]}, got {value!r}"
            )
        resolved[name] = value
    return resolved


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk by the files under ``path`` (sparse files count what they use)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
