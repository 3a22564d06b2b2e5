"""Child processes of the conformance suites: a writer to kill -9, a syscall-audited writer,
and a placement of keys computed in a process of its own.

``python -m distribkv.testing.worker crash BACKEND DIR DURABILITY KEYS``
    applies batches forever; batch ``g`` sets KEYS data keys and the meta key ``gen`` to ``g``
    and is printed (``g``) only after ``apply`` returned, so the parent knows what was
    acknowledged when it kills the process.

``python -m distribkv.testing.worker sync-audit BACKEND DIR DURABILITY SYNC COUNT``
    opens the store, then between two marker syscalls (``chdir`` to a path that does not exist)
    applies COUNT single-key batches with ``sync=SYNC``; run it under strace.

``python -m distribkv.testing.worker placement SCHEME SHARDS COUNT``
    prints the shard of each of the first COUNT :func:`sample_keys` (comma-separated) under
    the hashing scheme SCHEME (an installed name or ``module:attribute``) with SHARDS shards of
    equal weight and the settings of ``DISTRIBKV_TEST_SETTINGS``.
"""

from __future__ import annotations

import json
import os
import random
import sys

from distribkv.hashing.api import ShardSlot
from distribkv.storage.api import Namespace, Put
from distribkv.storage.store import open_store
from distribkv.testing import resolve_backend, resolve_spec

#: JSON object of backend settings for the child.
SETTINGS_ENV = "DISTRIBKV_TEST_SETTINGS"
MARK_BEGIN = "/nonexistent-distribkv-audit-begin"
MARK_END = "/nonexistent-distribkv-audit-end"


def batch_for(gen: int, keys: int) -> list[Put]:
    value = b"gen-%d" % gen
    ops = [Put(Namespace.DATA, b"key-%03d" % i, value) for i in range(keys)]
    ops.append(Put(Namespace.META, b"gen", value))
    return ops


def crash(backend: str, path: str, durability: str, keys: int, settings: dict) -> None:
    store = open_store(resolve_backend(backend), path, durability=durability, settings=settings)
    start = store.get(b"gen", Namespace.META)
    gen = int(start.split(b"-")[1]) if start else 0
    print("ready", gen, flush=True)
    while True:  # ended by the parent's SIGKILL
        gen += 1
        store.apply(batch_for(gen, keys), sync=durability == "sync")
        print(gen, flush=True)


def mark(path: str) -> None:
    try:
        os.chdir(path)
    except FileNotFoundError:
        pass


def sync_audit(backend: str, path: str, durability: str, sync: bool, count: int, settings) -> None:
    store = open_store(resolve_backend(backend), path, durability=durability, settings=settings)
    store.put(b"warm-up", b"x", sync=False)
    mark(MARK_BEGIN)
    for i in range(count):
        store.put(b"audit-%d" % i, b"v" * 100, sync=sync)
    mark(MARK_END)
    store.close()


def sample_keys(count: int, seed: int = 1) -> list[bytes]:
    """``count`` random keys of 1 to 32 bytes, the same for the same seed in every process."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 32)) for _ in range(count)]


def equal_slots(count: int) -> list[ShardSlot]:
    return [ShardSlot(i, f"shard-{i}") for i in range(count)]


def placement(scheme: str, shards: int, count: int, settings: dict) -> str:
    placed = resolve_spec("hashing", scheme).create(equal_slots(shards), settings)
    return ",".join(str(placed.shard_for(key)) for key in sample_keys(count))


def main(argv: list[str]) -> None:
    settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    if argv[0] == "placement":
        scheme, shards, count = argv[1:]
        print(placement(scheme, int(shards), int(count), settings))
        return
    mode, backend, path, durability, *rest = argv
    if mode == "crash":
        crash(backend, path, durability, int(rest[0]), settings)
    elif mode == "sync-audit":
        sync_audit(backend, path, durability, rest[0] == "1", int(rest[1]), settings)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
