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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from distribkv.storage.errors import InvalidSettingError, UnsupportedOperationError

__all__ = [
    "DURABILITIES",
    "MAX_KEY_SIZE",
    "BackendSpec",
    "Capabilities",
    "Delete",
    "Namespace",
    "Op",
    "Put",
    "Scan",
    "StorageEngine",
    "StorageStats",
    "disk_usage",
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

    __slots__ = ("_items", "_release")

    def __init__(self, items: Iterator[tuple[bytes, bytes]], release: Callable[[], None] | None):
        self._items = items
        self._release = release

    def __iter__(self) -> Scan:
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        if self._items is None:
            raise StopIteration
        return next(self._items)

    def close(self) -> None:
        items, self._items = self._items, None
        release, self._release = self._release, None
        if items is not None and hasattr(items, "close"):
            items.close()
        if release is not None:
            release()

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


def resolve_settings(
    backend: str, settings: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``defaults`` updated with ``settings``; an unknown name or a wrong type is an error."""
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
