"""Micro-benchmark: what bloom filters do for reads of missing keys.

    python -m distribkv.storage.bloombench [--backend leveldb --backend rocksdb] [--keys N]

For every installed backend that declares the ``bloom_filter`` capability it loads the same keys
twice, once with ``bloom_filter_bits = 0`` and once with the default 10 bits, compacts them into
table files with a small block cache, reopens, and times point reads of present keys and of
missing keys that fall inside the stored key range (so only a filter can rule them out). Each
figure is reported with its ratio to the filter-less run measured in the same process.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from distribkv.plugins import load_plugins
from distribkv.storage.api import Namespace, Put
from distribkv.storage.store import Store, open_store

# Small caches so that reads reach the table files rather than the block cache.
CACHE_SETTING = {"leveldb": "lru_cache_size", "rocksdb": "block_cache_size"}


def _load(store: Store, keys: int, value_size: int) -> None:
    rng = random.Random(0)
    batch = []
    for i in range(keys):
        batch.append(Put(Namespace.DATA, b"key-%09d" % (2 * i), rng.randbytes(value_size)))
        if len(batch) == 1000:
            store.apply(batch, sync=False)
            batch = []
    if batch:
        store.apply(batch, sync=False)
    store.compact()


def _rate(store: Store, keys: list[bytes], expect_found: bool) -> float:
    started = time.perf_counter()
    for key in keys:
        found = store.get(key) is not None
        if found != expect_found:
            raise AssertionError(f"{key!r}: found={found}, expected {expect_found}")
    return len(keys) / (time.perf_counter() - started)


def measure(name: str, keys: int, lookups: int, value_size: int, workdir: Path) -> dict:
    spec = load_plugins().storage_backend(name)
    rng = random.Random(1)
    present = [b"key-%09d" % (2 * rng.randrange(keys)) for _ in range(lookups)]
    missing = [b"key-%09d" % (2 * rng.randrange(keys) + 1) for _ in range(lookups)]
    rates = {}
    for bits in (0, 10):
        settings = {"bloom_filter_bits": bits}
        if name in CACHE_SETTING:
            settings[CACHE_SETTING[name]] = 1024 * 1024
        path = workdir / f"{name}-{bits}"
        store = open_store(spec, path, durability="async", settings=settings)
        _load(store, keys, value_size)
        store.close()
        store = open_store(spec, path, durability="async", settings=settings)
        _rate(store, missing[: lookups // 10], False)  # warm the index and filter blocks
        rates[bits] = {
            "missing": _rate(store, missing, False),
            "present": _rate(store, present, True),
        }
        store.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distribkv.storage.bloombench",
        description="Time point reads of missing and present keys with bloom filters off and on.",
    )
    parser.add_argument("--backend", action="append", help="backend to measure (repeatable)")
    parser.add_argument("--keys", type=int, default=200_000, help="keys to load (200000)")
    parser.add_argument("--lookups", type=int, default=100_000, help="reads per kind (100000)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value (100)")
    args = parser.parse_args(argv)
    registry = load_plugins()
    names = args.backend or [
        p.name for p in registry.provided("storage") if p.spec.capabilities.bloom_filter
    ]
    if not names:
        parser.error("no installed backend declares bloom filters (install leveldb or rocksdb)")
    header = f"{'backend':8} {'reads':8} {'no filter/s':>12} {'10 bits/s':>12} {'ratio':>6}"
    print(f"{args.keys} keys of {args.value_size} bytes, {args.lookups} reads each")
    print(header)
    with tempfile.TemporaryDirectory(prefix="distribkv-bloombench-") as workdir:
        for name in names:
            if sys.stdout.isatty():
                print(f"{name}: loading and compacting ...", end="\r", flush=True)
            rates = measure(name, args.keys, args.lookups, args.value_size, Path(workdir))
            if sys.stdout.isatty():
                print(" " * 40, end="\r")
            for kind in ("missing", "present"):
                off, on = rates[0][kind], rates[10][kind]
                print(f"{name:8} {kind:8} {off:12,.0f} {on:12,.0f} {on / off:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
