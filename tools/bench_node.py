#!/usr/bin/env python3
"""GET and SET throughput of one node, each as a ratio to a no-op Falcon endpoint served by the
same server with the same settings, measured in one run with wrk.

    python tools/bench_node.py [--backend lmdb] [--connections 16] [--seconds 10]

Needs wrk (apt-get install wrk) and distribkv with the backend installed (python3 launch.py
makes .venv with all of them: .venv/bin/python tools/bench_node.py). The node runs with
durability "async", so SET measures the request path rather than the disk's fsync latency.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.2"

NOOP_SERVER = """
import signal, sys, falcon
from distribkv.http.api import Listen
from distribkv.servers.waitress import WaitressHandle

class Noop:
    def on_get(self, req, resp):
        resp.data = b""

app = falcon.App()
app.add_route("/noop", Noop())
handle = WaitressHandle(app, Listen(sys.argv[1], int(sys.argv[2]), threads=8,
                        connection_limit=100, channel_timeout=30.0))
signal.signal(signal.SIGTERM, lambda *a: handle.stop())
handle.run()
"""

LUA = """
local keys = {keys}
local kind = "{kind}"
request = function()
  local k = math.random(1, keys)
  if kind == "get" then
    return wrk.format("GET", "/get?key=bench-" .. k)
  elseif kind == "set" then
    return wrk.format("GET", "/set?key=bench-" .. k .. "&value=" .. string.rep("v", 100))
  end
  return wrk.format("GET", "/noop")
end
"""


def free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def load_keys(host: str, port: int, count: int) -> None:
    """Every key once (so GET always finds a value), 1,000 per /batch request."""
    import http.client

    import msgpack

    conn = http.client.HTTPConnection(host, port, timeout=30)
    for start in range(1, count + 1, 1000):
        ops = [
            ["set", b"bench-%d" % i, b"v" * 100] for i in range(start, min(count, start + 999) + 1)
        ]
        conn.request(
            "POST",
            "/batch",
            body=msgpack.packb({"ops": ops}),
            headers={"Content-Type": "application/msgpack"},
        )
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"loading keys failed: HTTP {response.status}")
    conn.close()


def wrk(url: str, script: Path, connections: int, seconds: int) -> float:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="distribkv-bench-"))
    node_port, noop_port = free_port(HOST), free_port(HOST)
    config = work / "sharding.toml"
    config.write_text(
        f'[storage]\nbackend = "{args.backend}"\ndurability = "async"\n'
        f'[[shards]]\nname = "s0"\nidx = 0\naddress = "{HOST}:{node_port}"\n'
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distribkv", "serve", "--config", str(config), "--shard", "s0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen([sys.executable, "-c", NOOP_SERVER, HOST, str(noop_port)]),
    ]
    try:
        wait_healthy(f"http://{HOST}:{node_port}/healthz")
        wait_healthy(f"http://{HOST}:{noop_port}/noop")
        scripts = {}
        for kind in ("get", "set", "noop"):
            scripts[kind] = work / f"{kind}.lua"
            scripts[kind].write_text(LUA.replace("{keys}", str(args.keys)).replace("{kind}", kind))
        load_keys(HOST, node_port, args.keys)
        results = {}
        for kind in ("noop", "get", "set", "noop"):
            port = noop_port if kind == "noop" else node_port
            rate = wrk(f"http://{HOST}:{port}", scripts[kind], args.connections, args.seconds)
            results.setdefault(kind, []).append(rate)
            print(f"{kind:5} {rate:10,.0f} req/s", flush=True)
        noop = sum(results["noop"]) / len(results["noop"])
        print(
            f"\nbackend {args.backend}, waitress threads=8, {args.connections} keep-alive "
            f"connections, {args.seconds}s each (noop measured before and after)"
        )
        print(f"no-op endpoint  {noop:10,.0f} req/s  1.00")
        for kind in ("get", "set"):
            rate = results[kind][0]
            print(f"{kind.upper():15} {rate:10,.0f} req/s  {rate / noop:.2f} of no-op")
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
