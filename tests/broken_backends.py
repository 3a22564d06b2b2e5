"""Deliberately broken storage backends: each one has a single fault the conformance suite
must catch (see test_conformance_catches_faults.py).

The memory-based ones wrap the in-memory reference engine. The persistent ones wrap the real
backend under test (named by DISTRIBKV_TEST_BACKEND), because their faults (torn writes across a
crash, skipped flushes) only exist on disk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distribkv.storage.api import BackendSpec, Put, Scan, StorageEngine
from distribkv.storage.errors import StorageFullError
from distribkv.storage.memory import MemoryEngine


class Wrapper(StorageEngine):
    def __init__(self, inner: StorageEngine):
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities

    def get(self, ns, key):
        return self.inner.get(ns, key)

    def get_many(self, ns, keys):
        return self.inner.get_many(ns, keys)

    def apply(self, ops, *, sync):
        self.inner.apply(ops, sync=sync)

    def scan(self, ns, start=None, stop=None, *, limit=None):
        return self.inner.scan(ns, start, stop, limit=limit)

    def stats(self):
        return self.inner.stats()

    def compact(self, ns=None):
        self.inner.compact(ns)

    def close(self):
        self.inner.close()


class StaleGet(Wrapper):
    """A read cache that is never invalidated: get returns the first value it saw."""

    def __init__(self, inner):
        super().__init__(inner)
        self.cache = {}

    def get(self, ns, key):
        if (ns, key) not in self.cache:
            self.cache[(ns, key)] = self.inner.get(ns, key)
        return self.cache[(ns, key)]


class NonAtomicApply(Wrapper):
    """Applies the ops of a batch one at a time, so readers can see half a batch."""

    def apply(self, ops, *, sync):
        for op in ops:
            self.inner.apply([op], sync=sync)
            time.sleep(0.0002)


class DropsDeletesInBatches(Wrapper):
    """Forgets Delete ops when they are part of a larger batch."""

    def apply(self, ops, *, sync):
        ops = list(ops)
        if len(ops) > 1:
            ops = [op for op in ops if type(op) is Put]
        self.inner.apply(ops, sync=sync)


class UnorderedScan(Wrapper):
    """Returns scan results in storage (insertion) order instead of key order."""

    def scan(self, ns, start=None, stop=None, *, limit=None):
        with self.inner.scan(ns, start, stop) as pairs:
            items = list(pairs)
        items.sort(key=lambda kv: kv[0][::-1])
        return Scan(iter(items[:limit] if limit is not None else items), None)


class LiveScan(MemoryEngine):
    """Iterates the live table instead of a snapshot."""

    def scan(self, ns, start=None, stop=None, *, limit=None):
        table = self._tables()[ns]

        def pairs():
            count = 0
            for key in sorted(table):
                if (start is None or key >= start) and (stop is None or key < stop):
                    if key in table and (limit is None or count < limit):
                        count += 1
                        yield key, table[key]

        return Scan(pairs(), None)


class IgnoresLimit(Wrapper):
    def scan(self, ns, start=None, stop=None, *, limit=None):
        return self.inner.scan(ns, start, stop)


class NativeErrorAfterClose(Wrapper):
    """Lets the engine's own exception escape after close."""

    def get(self, ns, key):
        try:
            return self.inner.get(ns, key)
        except Exception as exc:
            raise KeyError(key) from exc


class CloseTwiceFails(Wrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.closed = False

    def close(self):
        if self.closed:
            raise RuntimeError("already closed")
        self.closed = True
        self.inner.close()


class SplitApply(Wrapper):
    """Writes each op of a batch as its own transaction: a crash can tear a batch."""

    def apply(self, ops, *, sync):
        for op in ops:
            self.inner.apply([op], sync=sync)


class IgnoresSync(Wrapper):
    """Never flushes, whatever the caller asked for."""

    def apply(self, ops, *, sync):
        self.inner.apply(ops, sync=False)


class HoldsGilWhileSyncing(Wrapper):
    """Flushes as a native call that kept the GIL would: no other thread runs meanwhile. (Over
    the memory engine, which never lets go of the GIL either: a real engine's write would.)"""

    def apply(self, ops, *, sync):
        self.inner.apply(ops, sync=False)
        if sync:
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:  # a busy wait never lets go of the GIL
                pass


class StaysFull(Wrapper):
    """Once a write met a full disk, refuses every later one, as LevelDB's and RocksDB's own
    handles do, even after space is freed."""

    def __init__(self, inner):
        super().__init__(inner)
        self.full: str | None = None

    def apply(self, ops, *, sync):
        if self.full is not None:
            raise StorageFullError(self.full)
        try:
            self.inner.apply(ops, sync=sync)
        except StorageFullError as exc:
            self.full = str(exc)
            raise


def _memory_spec(name: str, wrap) -> BackendSpec:
    from distribkv.storage import memory

    def open_(path: Path, *, durability="sync", settings=None):
        if isinstance(wrap, type) and issubclass(wrap, MemoryEngine):
            return wrap(Path(path))
        return wrap(MemoryEngine(Path(path)))

    return BackendSpec(name, open_, f"broken: {name}", memory.CAPABILITIES)


def _synced_memory_spec(name: str, wrap) -> BackendSpec:
    """Over the memory engine, declared persistent: only for the suite's tests of how a sync
    behaves in the process, never for what survives a restart."""
    import attrs

    from distribkv.storage import memory

    capabilities = attrs.evolve(memory.CAPABILITIES, persistent=True)

    def open_(path: Path, *, durability="sync", settings=None):
        engine = wrap(MemoryEngine(Path(path)))
        engine.capabilities = capabilities
        return engine

    return BackendSpec(name, open_, f"broken: {name}", capabilities)


def _real_spec(name: str, wrap) -> BackendSpec:
    from distribkv.plugins import load_plugins

    base_name = os.environ.get("DISTRIBKV_TEST_BACKEND", "memory")
    base = load_plugins().storage_backend(base_name)

    def open_(path: Path, *, durability="sync", settings=None):
        return wrap(base.open(path, durability=durability, settings=settings or {}))

    return BackendSpec(name, open_, f"broken: {name} over {base_name}", base.capabilities)


STALE_GET = _memory_spec("stale-get", StaleGet)
NON_ATOMIC_APPLY = _memory_spec("non-atomic-apply", NonAtomicApply)
DROPS_DELETES = _memory_spec("drops-deletes", DropsDeletesInBatches)
UNORDERED_SCAN = _memory_spec("unordered-scan", UnorderedScan)
LIVE_SCAN = _memory_spec("live-scan", LiveScan)
IGNORES_LIMIT = _memory_spec("ignores-limit", IgnoresLimit)
NATIVE_ERROR_AFTER_CLOSE = _memory_spec("native-error", NativeErrorAfterClose)
CLOSE_TWICE_FAILS = _memory_spec("close-twice-fails", CloseTwiceFails)
HOLDS_GIL_WHILE_SYNCING = _synced_memory_spec("holds-gil-while-syncing", HoldsGilWhileSyncing)


def __getattr__(name: str) -> BackendSpec:
    # Built on first use: they need the backend under test, which is chosen at run time.
    if name == "SPLIT_APPLY":
        return _real_spec("split-apply", SplitApply)
    if name == "IGNORES_SYNC":
        return _real_spec("ignores-sync", IgnoresSync)
    if name == "STAYS_FULL":
        return _real_spec("stays-full", StaysFull)
    raise AttributeError(name)
