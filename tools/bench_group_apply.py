#!/usr/bin/env python3
"""What one group of durable writes costs the storage engine, by group size, in process.

    python tools/bench_group_apply.py [--backend lmdb] [--rounds 300] [--dir .]

A leader applies a group of writes as one storage apply: each write's data and its log entry,
and the new last sequence number. This times that apply (the leader log's own, on a node opened
on the given disk, no HTTP) for groups of 1 to 16 writes of existing keys (100-byte values),
with ``durability = "sync"`` and ``"async"``, and prints the median time of a group and the
bound it sets: with nothing else to do per write, a group of N can go at most
``N x t(1) / t(N)`` times as fast as one write at a time. Group commit over HTTP reaches that
bound less the request path's own time per group (``tools/bench_group_commit.py``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from distribkv.config import parse_config
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.storage.api import Namespace, Put

CONFIG = """
[storage]
backend = "{backend}"
data_dir = "{data}"
durability = "{durability}"
[[shards]]
name = "s0"
idx = 0
address = "127.0.0.2:8080"
"""
SIZES = (1, 2, 4, 8, 16)
KEYS = 10_000


def group_times(backend: str, durability: str, rounds: int, where: str) -> dict[int, float]:
    """Median seconds per group apply, by group size."""
    with tempfile.TemporaryDirectory(prefix="distribkv-group-apply-", dir=where) as tmp:
        path = Path(tmp) / "sharding.toml"
        path.write_text(CONFIG.format(backend=backend, data=tmp, durability=durability))
        node = Node(parse_config(path.read_text(), path), "s0", registry=load_plugins()).open()
        try:
            node.store.apply(
                [Put(Namespace.DATA, b"bench-%d" % i, b"v" * 100) for i in range(KEYS)], sync=True
            )
            log_store = node.leader_log.log
            medians = {}
            for size in SIZES:
                times = []
                for _ in range(rounds):
                    keys = [b"bench-%d" % random.randrange(KEYS) for _ in range(size)]
                    group = [[Put(Namespace.DATA, key, b"w" * 100)] for key in keys]
                    started = time.perf_counter()
                    log_store.append(group)  # the apply a group's leader makes
                    times.append(time.perf_counter() - started)
                medians[size] = statistics.median(times)
            return medians
        finally:
            node.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--rounds", type=int, default=300, help="groups timed per size")
    parser.add_argument(
        "--dir", default=".", help="where the data directory goes (a real disk; default: .)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    results = {d: group_times(args.backend, d, args.rounds, args.dir) for d in ("sync", "async")}
    sync, relaxed = results["sync"], results["async"]
    print(f"backend {args.backend}, median of {args.rounds} group applies per size")
    print("writes  sync us/group  async us/group  sync bound vs one at a time")
    for size in SIZES:
        bound = size * sync[1] / sync[size]
        print(f"{size:6d}  {sync[size] * 1e6:13.0f}  {relaxed[size] * 1e6:14.0f}  {bound:26.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
