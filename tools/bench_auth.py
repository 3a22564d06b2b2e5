#!/usr/bin/env python3
"""GET throughput of a node with ``[auth]`` against the same node without it.

Two one-node clusters on one server, LMDB, ``durability = "async"``, 2,000 keys of 100 bytes:
one without ``[auth]``, one with three role tokens and the cluster token, whose GETs carry
``Authorization: Bearer`` (a ``read`` token: the last of the three tokens compared). wrk (1
thread, 16 connections) alternates between them, ``--rounds`` times, so that both see the
same machine; the ratios are of the medians, of GETs per second and of GETs per second of the
node's CPU (less disturbed by other work on the machine).

    .venv/bin/python tools/bench_auth.py [--server granian] [--seconds 3] [--rounds 3]

Needs wrk on PATH (``distribkv bench`` says how to get it).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

from distribkv.bench.wrk import lua_script, run_wrk
from distribkv.client import Client
from distribkv.testing.cluster import allocate_hosts

KEYS = 2000
CLUSTER_TOKEN = "c" * 32
TOKENS = {"ops": ("admin", "a" * 32), "app": ("write", "w" * 32), "viewer": ("read", "r" * 32)}


def write_config(work: Path, server: str, address: str, auth: bool) -> Path:
    work.mkdir(parents=True)
    lines = [
        "[cluster]",
        f'server = "{server}"',
        "[storage]",
        'backend = "lmdb"',
        f'data_dir = "{work / "data"}"',
        'durability = "async"',
        "[[shards]]",
        'name = "s0"',
        "idx = 0",
        f'address = "{address}"',
    ]
    if auth:
        entries = []
        for name, (role, secret) in TOKENS.items():
            (work / name).write_text(secret)
            (work / name).chmod(0o600)
            entries.append(f'{{name = "{name}", role = "{role}", token_file = "{name}"}}')
        lines += ["[auth]", f"tokens = [{', '.join(entries)}]"]
    path = work / "sharding.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(config: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "DISTRIBKV_CLUSTER_TOKEN": CLUSTER_TOKEN}
    cmd = [sys.executable, "-m", "distribkv", "serve", "--config", str(config), "--shard", "s0"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            Client([address], token=TOKENS["ops"][1], timeout=1, retries=0).close()
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the node at {address} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="granian", help="granian or waitress")
    parser.add_argument("--seconds", type=float, default=3.0, help="wrk time per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument(
        "--control",
        action="store_true",
        help="the 'on' node without [auth] too (its GETs still carry the header): the ratio"
        " that noise and the order of the runs alone give",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    nodes = {}
    with allocate_hosts() as hosts:
        try:
            for label, auth in (("off", False), ("on", True)):
                address = hosts.address()
                config = write_config(work / label, args.server, address, auth and not args.control)
                nodes[label] = (address, serve(config, address))
            keys = [b"bench-%d" % i for i in range(KEYS)]
            for address, _ in nodes.values():
                with Client([address], token=TOKENS["app"][1]) as client:
                    client.set_many({key: b"v" * 100 for key in keys})
            keys_file = work / "keys"
            keys_file.write_text("\n".join(quote_from_bytes(k, safe="") for k in keys) + "\n")
            base = lua_script("get", keys=KEYS, keys_file=str(keys_file))
            header = f'wrk.headers["Authorization"] = "Bearer {TOKENS["viewer"][1]}"\n'
            rates: dict[str, list[float]] = {"off": [], "on": []}
            # GETs per second of the node's CPU: what the check costs, less disturbed by
            # other work on the machine than GETs per second of the clock.
            per_cpu: dict[str, list[float]] = {"off": [], "on": []}
            for round_ in range(args.rounds):
                for label, (address, proc) in nodes.items():
                    run = run_wrk(
                        f"http://{address}",
                        (header if label == "on" else "") + base,
                        seconds=args.seconds,
                        connections=16,
                        threads=1,
                        server_pid=proc.pid,
                        workdir=work,
                        name=f"get-{label}-{round_}",
                    )
                    errors = run["errors"]["status"] + run["errors"]["connect"]
                    rate = run["requests"] / (run["duration_us"] / 1e6)
                    rates[label].append(rate)
                    cpu = rate / run["server_cpu"] if run["server_cpu"] else float("nan")
                    per_cpu[label].append(cpu)
                    print(
                        f"auth {label:3} round {round_}: {rate:10,.0f} GET/s,"
                        f" {cpu:10,.0f} GET per node CPU-second",
                        flush=True,
                    )
                    if errors:
                        raise SystemExit(f"auth {label}: {errors} failed requests")
        finally:
            for _, proc in nodes.values():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"{args.server}: GET/s auth on {on:,.0f}, off {off:,.0f}; on / off = {on / off:.3f}")
    on, off = statistics.median(per_cpu["on"]), statistics.median(per_cpu["off"])
    print(
        f"{args.server}: GET per node CPU-second auth on {on:,.0f}, off {off:,.0f};"
        f" on / off = {on / off:.3f}"
    )


if __name__ == "__main__":
    main()
