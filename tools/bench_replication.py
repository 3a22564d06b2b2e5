#!/usr/bin/env python3
"""Replication speed, measured in one run for each transport:

1. burst: 10,000 keys (``--burst N``) written to the leader in batches of 100; keys per second
   reaching the replica (from the first write until the replica has applied the last one);
2. steady load: 500 single-key writes per second for 10 s; for every 5th write, the time from
   its acknowledgement until a read from the replica returns it (p50 / p99 / max).

    python tools/bench_replication.py [--backend lmdb] [--transport log --transport queue]
                                      [--burst 10000]

Needs distribkv with the backend and distribkv-queue installed (python3 launch.py makes .venv:
.venv/bin/python tools/bench_replication.py). Nodes run with durability "async".
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

LEADER_HOST, REPLICA_HOST = "127.0.0.2", "127.0.0.22"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Conn:
    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def request(self, method: str, target: str, body: bytes | None = None, headers=None):
        self.conn.request(method, target, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, response.read()


def wait_healthy(address: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if Conn(address).request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{address} did not start")


def applied(address: str) -> int:
    status = json.loads(Conn(address).request("GET", "/status")[1])
    return status["replication"].get("applied_seq") or status["replication"].get("last_seq") or 0


def run(backend: str, transport: str, work: Path, burst_keys: int = 10_000) -> dict:
    leader = f"{LEADER_HOST}:{free_port(LEADER_HOST)}"
    replica = f"{REPLICA_HOST}:{free_port(REPLICA_HOST)}"
    config = work / f"{transport}.toml"
    config.write_text(
        f'[cluster]\nreplication = "{transport}"\n'
        f'[storage]\nbackend = "{backend}"\ndurability = "async"\n'
        f'data_dir = "{work / transport}"\n'
        f'[[shards]]\nname = "s0"\nidx = 0\naddress = "{leader}"\nreplicas = ["{replica}"]\n'
    )
    base = [sys.executable, "-m", "distribkv", "serve", "--config", str(config), "--shard", "s0"]
    procs = [subprocess.Popen(base, stderr=subprocess.DEVNULL)]
    wait_healthy(leader)
    procs.append(subprocess.Popen([*base, "--replica", "0"], stderr=subprocess.DEVNULL))
    try:
        wait_healthy(replica)
        time.sleep(0.5)
        # 1. burst
        conn = Conn(leader)
        started = time.monotonic()
        for start in range(0, burst_keys, 100):
            ops = [["set", b"burst-%05d" % i, b"v" * 100] for i in range(start, start + 100)]
            status, _ = conn.request(
                "POST",
                "/batch",
                msgpack.packb({"ops": ops}),
                {"Content-Type": "application/msgpack"},
            )
            assert status == 200
        written = time.monotonic() - started
        target = applied(leader)
        deadline = time.monotonic() + 300
        while applied(replica) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        burst = time.monotonic() - started
        # 2. steady load with visibility latency
        latencies: list[float] = []
        pending: list[tuple[bytes, float]] = []
        lock = threading.Lock()
        done = threading.Event()

        def observer() -> None:
            reader = Conn(replica)
            while not (done.is_set() and not pending):
                with lock:
                    item = pending[0] if pending else None
                if item is None:
                    time.sleep(0.001)
                    continue
                key, acked = item
                status, _ = reader.request("GET", f"/get?key={key.decode()}")
                if status == 200:
                    latencies.append(time.monotonic() - acked)
                    with lock:
                        pending.pop(0)

        watcher = threading.Thread(target=observer)
        watcher.start()
        writer = Conn(leader)
        period = 1 / 500
        next_at = time.monotonic()
        for i in range(5000):
            key = b"steady-%05d" % i
            writer.request("PUT", f"/set?key={key.decode()}", b"v" * 100)
            if i % 5 == 0:
                with lock:
                    pending.append((key, time.monotonic()))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        done.set()
        watcher.join(timeout=120)
        latencies.sort()
        return {
            "burst_write_s": written,
            "burst_keys_per_s": burst_keys / burst,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000,
            "samples": len(latencies),
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--transport", action="append")
    parser.add_argument(
        "--burst", type=int, default=10_000, help="keys in the burst (a multiple of 100)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distribkv-replbench-"))
    try:
        results = {
            t: run(args.backend, t, work, args.burst) for t in args.transport or ["log", "queue"]
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"backend {args.backend}, one leader and one replica, durability async,"
        f" burst of {args.burst:,} keys"
    )
    print(f"{'transport':10} {'burst keys/s':>13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        print(
            f"{name:10} {r['burst_keys_per_s']:13,.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
            f" {r['max_ms']:8.1f}"
        )
    if "log" in results and "queue" in results:
        ratio = results["log"]["burst_keys_per_s"] / results["queue"]["burst_keys_per_s"]
        print(f"log / queue burst throughput: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
