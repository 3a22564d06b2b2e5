"""Child processes of the conformance suite: a writer to kill -9, and a syscall-audited writer.

``python -m distribkv.testing.worker crash BACKEND DIR DURABILITY KEYS``
    applies batches forever; batch ``g`` sets KEYS data keys and the meta key ``gen`` to ``g``
    and is printed (``g``) only after ``apply`` returned, so the parent knows what was
    acknowledged when it kills the process.

``python -m distribkv.testing.worker sync-audit BACKEND DIR DURABILITY SYNC COUNT``
    opens the store, then between two marker syscalls (``chdir`` to a path that does not exist)
    applies COUNT single-key batches with ``sync=SYNC``; run it under strace.
"""

from __future__ import annotations

import json
import os
import sys

from distribkv.storage.api import Namespace, Put
from distribkv.storage.store import open_store
from distribkv.testing import resolve_backend

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


def main(argv: list[str]) -> None:
    mode, backend, path, durability, *rest = argv
    settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    if mode == "crash":
        crash(backend, path, durability, int(rest[0]), settings)
    elif mode == "sync-audit":
        sync_audit(backend, path, durability, rest[0] == "1", int(rest[1]), settings)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
