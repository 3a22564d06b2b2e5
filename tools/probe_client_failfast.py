#!/usr/bin/env python3
"""How long the Python client's calls take while a node is hung (SIGSTOP), call by call.

A cluster of two shards (memory backend, static coordination), shard-0 with one replica. For
each case one node is stopped with SIGSTOP (and resumed with SIGCONT afterwards, whatever
happens), then the case's calls are timed one after another:

- ``construct``: ``Client([stopped leader, another node])``;
- ``get``/``set``: reads and writes of a key of shard-0 while its leader is stopped;
- ``replica-read``: reads with ``read_preference="replica"`` while the replica is stopped;
- ``leader-preferred``: reads with ``read_preference="leader_preferred"`` while the leader is
  stopped.

    .venv/bin/python tools/probe_client_failfast.py [--timeout 5] [--calls 3] [--out FILE.json]

It uses only what every version of the client has (``Client(nodes, timeout=...,
read_preference=...)``), so the same script measures any checkout:
``PYTHONPATH=OTHER/core/src .venv/bin/python tools/probe_client_failfast.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from distribkv.client import Client, ClientError
from distribkv.testing.cluster import Cluster, allocate_hosts, call, wait_until, write_config


def timed(action: Callable[[], object]) -> dict:
    started = time.monotonic()
    try:
        action()
        outcome = "ok"
    except (ClientError, OSError) as exc:  # the probe reports failures too
        outcome = type(exc).__name__
    return {"seconds": round(time.monotonic() - started, 3), "outcome": outcome}


def pid_of(address: str) -> int:
    return json.loads(call(address, "GET", "/status").body)["pid"]


class Stopped:
    """SIGSTOP the node at ``address`` for the ``with`` block; SIGCONT it on the way out."""

    def __init__(self, address: str):
        self.pid = pid_of(address)

    def __enter__(self) -> Stopped:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


def key_of(client: Client, shard: str) -> bytes:
    for i in range(10_000):
        key = b"probe-%d" % i
        if client.map.owner_of(key).name == shard:
            return key
    raise RuntimeError(f"no key of {shard} among 10,000")


def probe(timeout: float, calls: int) -> dict:
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as work, allocate_hosts() as hosts:
        config = write_config(Path(work), hosts=hosts, shards=2, replicas={0: 1})
        with Cluster(config, "--max-restarts", "0") as cluster:
            leader = cluster.address("shard-0")
            replica = cluster.address("shard-0", "replica-0")
            other = cluster.address("shard-1")
            with Client([other], timeout=timeout) as setup:
                key = key_of(setup, "shard-0")
                setup.set(key, b"value")
            wait_until(
                lambda: call(replica, "GET", f"/get?key={key.decode()}").status == 200,
                30,
                message="the replica did not get the key",
            )

            with Stopped(leader):
                results["construct"] = [
                    timed(lambda: Client([leader, other], timeout=timeout).close())
                ]
            cases = [
                ("get", leader, "leader", lambda c: c.get(key)),
                ("set", leader, "leader", lambda c: c.set(key, b"value")),
                ("replica-read", replica, "replica", lambda c: c.get(key)),
                ("leader-preferred", leader, "leader_preferred", lambda c: c.get(key)),
            ]
            for name, down, preference, action in cases:
                client = Client([other], timeout=timeout, read_preference=preference)
                try:
                    client.get(key)  # connections are open, the map is fetched
                    with Stopped(down):
                        results[name] = [
                            timed(lambda a=action, c=client: a(c)) for _ in range(calls)
                        ]
                finally:
                    client.close()
            assert cluster.stop() == 0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="the client's timeout (5)")
    parser.add_argument("--calls", type=int, default=3, help="calls per case, in a row (3)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = probe(args.timeout, args.calls)
    print(f"timeout={args.timeout:g}s; seconds (outcome) of each call in a row")
    for name, rows in results.items():
        cells = ", ".join(f"{r['seconds']:.3f} ({r['outcome']})" for r in rows)
        print(f"  {name:17} {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps({"timeout": args.timeout, **results}, indent=1))


if __name__ == "__main__":
    main()
