"""The in-memory reference backend: the storage contract in its plainest form.

Nothing survives ``close()``. It is the model the real engines are compared with, a fast backend
for tests of the layers above storage, and a baseline that isolates the request path's cost.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distribkv import hookimpl
from distribkv.storage.api import (
    BackendSpec,
    CallGate,
    Capabilities,
    Namespace,
    Op,
    Put,
    Scan,
    StorageEngine,
    StorageStats,
    resolve_settings,
)
from distribkv.storage.errors import BackendClosedError

CAPABILITIES = Capabilities(persistent=False)


class MemoryEngine(StorageEngine):
    name = "memory"
    capabilities = CAPABILITIES

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._gate = CallGate("the memory backend")
        self._data: dict[Namespace, dict[bytes, bytes]] | None = {ns: {} for ns in Namespace}

    def _tables(self) -> dict[Namespace, dict[bytes, bytes]]:
        data = self._data
        if data is None:
            raise BackendClosedError("the memory backend is closed")
        return data

    def get(self, ns: Namespace, key: bytes) -> bytes | None:
        return self._tables()[ns].get(key)

    def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            table = self._tables()[ns]
            return [table.get(key) for key in keys]

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        ops = list(ops)
        with self._lock:
            tables = self._tables()
            for op in ops:
                if type(op) is Put:
                    tables[op.ns][op.key] = op.value
                else:
                    tables[op.ns].pop(op.key, None)

    def scan(self, ns, start=None, stop=None, *, limit=None) -> Scan:
        with self._lock:
            items = sorted(
                (k, v)
                for k, v in self._tables()[ns].items()
                if (start is None or k >= start) and (stop is None or k < stop)
            )
        # Registered with the gate only so that close() ends it, as with the real engines.
        return self._gate.track(Scan(iter(itertools.islice(items, limit)), None))

    def stats(self) -> StorageStats:
        with self._lock:
            tables = self._tables()
            keys: dict[str, int | None] = {ns.value: len(t) for ns, t in tables.items()}
            size = sum(len(k) + len(v) for t in tables.values() for k, v in t.items())
        return StorageStats("memory", str(self._path), 0, keys, {"bytes_in_memory": size})

    def close(self) -> None:
        self._gate.close(self._free)

    def _free(self) -> None:
        with self._lock:
            self._data = None


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return resolve_settings("memory", settings, {})


def open_memory(path: Path, *, durability: str = "sync", settings: Mapping[str, Any] = {}):
    check_settings(settings)
    return MemoryEngine(Path(path))


SPEC = BackendSpec(
    name="memory",
    open=open_memory,
    description="in-process dict; nothing is kept after close (tests, request-path baselines)",
    capabilities=CAPABILITIES,
    check_settings=check_settings,
)


@hookimpl
def distribkv_storage_backends() -> list[BackendSpec]:
    return [SPEC]
