#!/usr/bin/env python3
"""Where a GET spends its time inside the node process, without the HTTP server: the node's
WSGI application and a no-op Falcon application are called in-process with the same request
environ, through the same serving wrapper, and timed (optionally under cProfile).

    python tools/profile_get.py [--backend lmdb] [--calls 50000] [--profile]

The server's own cost per request is what the two have in common; the difference is what the
GET path adds, and what can be removed from it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

import falcon

from distribkv.config import parse_config
from distribkv.http.app import create_app, forwarding_pool
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.server import ServingWrapper

CONFIG = """
[storage]
backend = "{backend}"
data_dir = "{data}"
durability = "async"
[[shards]]
name = "s0"
idx = 0
address = "127.0.0.2:8080"
"""


class Noop:
    def on_get(self, req, resp):
        resp.data = b""


def environ(path: str, query: str) -> dict:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.2",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.2:8080",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def per_call(app, path: str, queries: list[str], calls: int) -> float:
    def start_response(status, headers, exc_info=None):
        return None

    started = time.perf_counter()
    for i in range(calls):
        app(environ(path, queries[i % len(queries)]), start_response)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true", help="print the GET path's profile")
    args = parser.parse_args()
    # The node logs its access lines as it does when serving.
    logging.basicConfig(level=logging.INFO, stream=open("/dev/null", "w"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sharding.toml"
        path.write_text(CONFIG.format(backend=args.backend, data=tmp))
        node = Node(parse_config(path.read_text(), path), "s0", registry=load_plugins()).open()
        try:
            for i in range(args.keys):
                node.set(b"bench-%d" % i, b"v" * 100)
            app = ServingWrapper(create_app(node, forwarding_pool(node)))
            noop_app = falcon.App()
            noop_app.add_route("/noop", Noop())
            noop = ServingWrapper(noop_app)
            queries = [f"key=bench-{i}" for i in range(args.keys)]
            for _ in range(2):  # warm, then measure
                noop_us = per_call(noop, "/noop", [""], args.calls)
                health_us = per_call(app, "/healthz", [""], args.calls)
                get_us = per_call(app, "/get", queries, args.calls)
            print(
                f"bare no-op {noop_us:.1f} us/call, the node's /healthz {health_us:.1f} us,"
                f" GET {get_us:.1f} us"
            )
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                per_call(app, "/get", queries, args.calls)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            app.close()
            noop.close()
        finally:
            node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
