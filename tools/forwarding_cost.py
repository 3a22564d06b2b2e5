#!/usr/bin/env python3
"""What a forwarded GET costs each node: CPU per request of the forwarding node (the "front")
and of the owner, and how many reads the owner got per request.

The layout of ``distribkv bench --workloads get-forwarded --pin``: two shards with a replica
each, LMDB, ``durability = "sync"``, ``routing = "proxy"``, 10,000 keys of 100 bytes that all
belong to the second shard; every node on CPU 0 and wrk (1 thread) on CPU 1 with ``--pin``.
wrk's GETs go first to the owner (``owner``), then to the first shard's leader, which forwards
them (``forwarded``). CPU comes from ``/proc`` before and after each run; the owner's requests
by route from its ``/metrics``.

    .venv/bin/python tools/forwarding_cost.py [--server granian] [--seconds 4]
        [--connections 16] [--pin]

Needs wrk on PATH (``distribkv bench`` says how to get it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

from distribkv.bench import runner, wrk
from distribkv.bench.runner import batch_load, owned_keys, start_nodes, write_cluster
from distribkv.bench.wrk import lua_script, raw_percentiles, run_wrk

KEYS = 10_000
_REQUESTS = re.compile(r'distribkv_http_requests_total\{code="(\d+)",route="([^"]+)"\} ([0-9.e+]+)')


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_by_route(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    routes: dict[str, float] = {}
    for code, route, count in _REQUESTS.findall(text):
        if code == "200":
            routes[route] = routes.get(route, 0.0) + float(count)
    return routes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="granian", choices=("granian", "waitress"))
    parser.add_argument("--seconds", type=float, default=4.0, help="per wrk run (default 4)")
    parser.add_argument("--connections", type=int, default=16, help="wrk's (default 16)")
    parser.add_argument("--pin", action="store_true", help="nodes on CPU 0, wrk on CPU 1")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.connections < 1:
        parser.error("--seconds must be positive and --connections at least 1")
    if args.pin:
        runner.NODE_PREFIX[:] = ["taskset", "-c", "0"]
        wrk.WRK_PREFIX = ["taskset", "-c", "1"]
    with tempfile.TemporaryDirectory(prefix="distribkv-forwarding-cost-") as work:
        directory = Path(work)
        config = write_cluster(
            directory,
            backend="lmdb",
            server=args.server,
            durability="sync",
            host="127.0.0.1",
            shards=2,
            replicas=1,
            routing="proxy",
        )
        nodes = start_nodes(config, replicas=True)
        (front, front_node), (owner, owner_node) = nodes[0], nodes[1]
        try:
            keys = owned_keys(owner, KEYS)
            keys_path = directory / "keys.txt"
            keys_path.write_bytes(b"\n".join(keys) + b"\n")
            batch_load(owner, keys, 100)
            for label, address, node in (
                ("owner", owner, owner_node),
                ("forwarded", front, front_node),
            ):
                script = lua_script(
                    f"get-{label}",
                    keys=len(keys),
                    value_size=100,
                    read_ratio=1.0,
                    keys_file=str(keys_path),
                )
                routes_before = requests_by_route(owner)
                cpu_before = cpu_seconds(front_node.pid), cpu_seconds(owner_node.pid)
                result = run_wrk(
                    f"http://{address}",
                    script,
                    seconds=args.seconds,
                    connections=args.connections,
                    threads=1,
                    server_pid=node.pid,
                    workdir=directory,
                    name=label,
                )
                cpu_after = cpu_seconds(front_node.pid), cpu_seconds(owner_node.pid)
                routes = {
                    route: count - routes_before.get(route, 0.0)
                    for route, count in requests_by_route(owner).items()
                    if count - routes_before.get(route, 0.0) >= 1
                }
                done = result["requests"]
                if not done:
                    print(f"{args.server} {label}: no request was answered", file=sys.stderr)
                    return 1
                rate = done / (result["duration_us"] / 1e6)
                front_us = 1e6 * (cpu_after[0] - cpu_before[0]) / done
                owner_us = 1e6 * (cpu_after[1] - cpu_before[1]) / done
                latency = raw_percentiles(result)
                line = (
                    f"{args.server} {label}: {rate:,.0f} GET/s, p50 {latency['p50']:.3f} ms,"
                    f" p99 {latency['p99']:.3f} ms; CPU per GET: owner {owner_us:.1f} µs"
                )
                if label == "forwarded":
                    together = routes.get("/forwarding/get", 0.0)
                    alone = routes.get("/get", 0.0)
                    line += f", front {front_us:.1f} µs; the owner got {together:,.0f} requests"
                    line += f" of reads ({done / together:.1f} reads each)" if together else ""
                    line += f" and {alone:,.0f} single reads"
                print(line, flush=True)
        finally:
            for _, child in nodes:
                child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
