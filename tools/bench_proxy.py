#!/usr/bin/env python3
"""Direct and forwarded GET and SET on a two-shard cluster with ``routing = "proxy"``.

wrk (1 thread, 16 connections) is aimed first at the node that owns its keys (``*-direct``),
then at the other node, which forwards every request to the owner (``*-forwarded``). LMDB,
``durability = "async"``, 2,000 keys of 100 bytes, no replicas.

    .venv/bin/python tools/bench_proxy.py [--server granian] [--seconds 5] [--out FILE.json]

Needs wrk on PATH (``distribkv bench`` says how to get it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

from distribkv.bench.wrk import lua_script, run_wrk
from distribkv.client import Client

HOSTS = ("127.0.5.1", "127.0.5.2")
KEYS = 2000
# (workload, node wrk is aimed at, owner of the keys, read ratio)
WORKLOADS = [
    ("get-direct", "s1", "s1", 1.0),
    ("get-forwarded", "s0", "s1", 1.0),
    ("set-direct", "s1", "s1", 0.0),
    ("set-forwarded", "s0", "s1", 0.0),
]


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_config(work: Path, server: str) -> Path:
    lines = [
        "[cluster]",
        'routing = "proxy"',
        f'server = "{server}"',
        "[storage]",
        'backend = "lmdb"',
        f'data_dir = "{work / "data"}"',
        'durability = "async"',
    ]
    for idx, host in enumerate(HOSTS):
        lines += ["[[shards]]", f'name = "s{idx}"', f"idx = {idx}"]
        lines += [f'address = "{host}:{free_port(host)}"']
    path = work / "sharding.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(config: Path) -> tuple[subprocess.Popen, dict[str, str], dict[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distribkv", "launch", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("distribkv launch exited before the nodes were up")
        if line.startswith("SHARD"):
            header = line.split()
        elif line.startswith("all nodes are up"):
            break
        elif header and line.strip():
            row = dict(zip(header, line.split(), strict=False))
            rows[row["SHARD"]] = row
    else:
        raise SystemExit("the nodes were not up within 60 s")
    return (
        proc,
        {s: r["ADDRESS"] for s, r in rows.items()},
        {s: int(r["PID"]) for s, r in rows.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="granian", help="granian or waitress")
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk time per workload")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    proc, addresses, pids = launch(write_config(work, args.server))
    results: dict[str, float] = {}
    try:
        client = Client([addresses["s0"]])
        owned: dict[str, list[bytes]] = {"s0": [], "s1": []}
        i = 0
        while min(len(keys) for keys in owned.values()) < KEYS:
            key = b"bench-%d" % i
            owned[client.map.owner_of(key).name].append(key)
            i += 1
        client.set_many({key: b"v" * 100 for keys in owned.values() for key in keys[:KEYS]})
        client.close()
        for name, via, owner, read_ratio in WORKLOADS:
            keys_file = work / f"{name}.keys"
            quoted = (quote_from_bytes(key, safe="") for key in owned[owner][:KEYS])
            keys_file.write_text("\n".join(quoted) + "\n")
            script = lua_script(name, keys=KEYS, read_ratio=read_ratio, keys_file=str(keys_file))
            run = run_wrk(
                f"http://{addresses[via]}",
                script,
                seconds=args.seconds,
                connections=16,
                threads=1,
                server_pid=pids[via],
                workdir=work,
                name=name,
            )
            results[name] = run["requests"] / (run["duration_us"] / 1e6)
            print(f"{name:14} {results[name]:10,.0f} req/s", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    for kind in ("get", "set"):
        ratio = results[f"{kind}-forwarded"] / results[f"{kind}-direct"]
        print(f"{kind}: forwarded / direct = {ratio:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
