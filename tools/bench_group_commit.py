#!/usr/bin/env python3
"""Durable SET throughput with group commit against one fsync per write, in one run.

    python tools/bench_group_commit.py [--backend lmdb] [--server waitress] [--connections 16]
                                       [--seconds 10] [--rounds 3]

Starts single-node clusters on the same disk: ``durability = "sync"`` with ``[storage]
group_commit = true`` (the default), the same with ``false``, and ``durability = "async"`` (no
fsync: the ceiling of the request path), and drives SET on each with wrk (random keys, 100-byte
values), in interleaved rounds. Prints requests per second (the median of the rounds) and the
ratios. Needs wrk (apt-get install wrk); run with the .venv that ``python3 launch.py`` makes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_node import HOST, LUA, free_port, wait_healthy, wrk

SERVE = [sys.executable, "-m", "distribkv", "serve"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument(
        "--server", default="waitress", help="server plugin of the nodes (default: waitress)"
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; the median is reported"
    )
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument(
        "--dir", default=".", help="where the data directories go (a real disk; default: .)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="distribkv-bench-gc-", dir=args.dir))
    script = work / "set.lua"
    script.write_text(LUA.replace("{keys}", str(args.keys)).replace("{kind}", "set"))
    nodes = {}
    procs = []
    try:
        for mode in ("group", "single", "async"):
            port = free_port(HOST)
            config = work / f"{mode}.toml"
            config.write_text(
                f'[cluster]\nserver = "{args.server}"\n'
                f'[storage]\nbackend = "{args.backend}"\n'
                f'durability = "{"async" if mode == "async" else "sync"}"\n'
                f'data_dir = "data-{mode}"\n'
                f"group_commit = {'false' if mode == 'single' else 'true'}\n"
                f'[[shards]]\nname = "s0"\nidx = 0\naddress = "{HOST}:{port}"\n'
            )
            procs.append(
                subprocess.Popen(
                    [*SERVE, "--config", str(config), "--shard", "s0"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            nodes[mode] = port
        for port in nodes.values():
            wait_healthy(f"http://{HOST}:{port}/healthz")
        results: dict[str, list[float]] = {mode: [] for mode in nodes}
        for _ in range(args.rounds):
            for mode, port in nodes.items():
                rate = wrk(f"http://{HOST}:{port}", script, args.connections, args.seconds)
                results[mode].append(rate)
                print(f"{mode:6} {rate:10,.0f} SET/s", flush=True)
        group = statistics.median(results["group"])
        single = statistics.median(results["single"])
        print(
            f"\nbackend {args.backend}, server {args.server}, durability sync,"
            f" {args.connections} connections,"
            f" median of {args.rounds} interleaved rounds of {args.seconds}s each"
        )
        print(f"one fsync per write  {single:10,.0f} SET/s  1.00")
        print(f"group commit         {group:10,.0f} SET/s  {group / single:.2f}x")
        no_sync = statistics.median(results["async"])
        print(
            f"durability async     {no_sync:10,.0f} SET/s  {no_sync / single:.2f}x"
            " (the request path's ceiling: no fsync at all)"
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
