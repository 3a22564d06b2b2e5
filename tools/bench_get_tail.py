#!/usr/bin/env python3
"""GET latency of one node, run after run: p50, p99 and their ratio, for a look at the tail.

One node (``--backend``, ``--server``) on CPU 0 and wrk (one thread) on CPU 1, as
``distribkv bench --pin`` places them; ``--keys`` keys of 100 bytes loaded with ``set_many``,
then ``--rounds`` runs of uniform GETs (percentiles as ``distribkv bench`` computes them,
corrected for coordinated omission, and wrk's own). Run it with the code before and after a
change in turns.

On a machine with other work, ``--autogroup -20`` (root) gives the node's and wrk's scheduling
groups the highest weight: Linux schedules each session as one group, and every node runs in a
session of its own, so ``nice`` alone changes nothing.

    .venv/bin/python tools/bench_get_tail.py --backend lmdb --server granian --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from distribkv.bench import runner, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--server", default="granian")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--autogroup", type=int, default=None, help="nice value of the scheduling groups (root)"
    )
    args = parser.parse_args()
    runner.NODE_PREFIX[:] = ["taskset", "-c", "0"]
    wrk.WRK_PREFIX[:] = ["taskset", "-c", "1"]
    with tempfile.TemporaryDirectory(prefix="distribkv-tail-") as name:
        directory = Path(name)
        config = runner.write_cluster(
            directory,
            backend=args.backend,
            server=args.server,
            durability="async",
            host="127.0.0.1",
        )
        nodes = runner.start_nodes(config)
        address, node = nodes[0]
        try:
            if args.autogroup is not None:
                for pid in (node.pid, "self"):  # wrk is started from this session
                    Path(f"/proc/{pid}/autogroup").write_text(str(args.autogroup))
            runner.batch_load(address, [runner.key_name(i) for i in range(args.keys)], 100)
            for round_ in range(args.rounds):
                result = wrk.run_wrk(
                    f"http://{address}",
                    wrk.lua_script("get", keys=args.keys),
                    seconds=args.seconds,
                    connections=args.connections,
                    threads=1,
                    server_pid=node.pid,
                    workdir=directory,
                    name="get",
                )
                corrected = wrk.corrected_percentiles(result, args.connections)
                raw = wrk.raw_percentiles(result)
                rate = result["requests"] / (result["duration_us"] / 1e6)
                print(
                    f"{args.backend} {args.server} run {round_ + 1}: {rate:,.0f} GET/s,"
                    f" p50 {corrected['p50']:.3f} ms, p99 {corrected['p99']:.3f} ms,"
                    f" p99/p50 {corrected['p99'] / corrected['p50']:.1f}"
                    f" (wrk's own: p50 {raw['p50']:.3f}, p99 {raw['p99']:.3f},"
                    f" max {result['max_us'] / 1000:.1f} ms), node CPU {result['server_cpu']:.2f}",
                    flush=True,
                )
        finally:
            for _, child in nodes:
                child.stop()


if __name__ == "__main__":
    main()
