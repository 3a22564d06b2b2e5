#!/usr/bin/env python3
"""Where a GET and a SET spend their time inside the node process, without the HTTP server: the
node's WSGI application and a no-op Falcon application are called in-process with the same
request environ, through the same serving wrapper, and timed (optionally under cProfile).

    python tools/profile_get.py [--backend lmdb] [--calls 50000] [--profile] [--profile-set]

The server's own cost per request is what the two have in common; the difference is what the
GET path adds, and what can be removed from it. The GET is also timed the way granian serves
it, through ``Listen.direct`` (no environ), alone and through the serving wrapper. The SET is
deferred, as on a server that finishes answers later (granian), through WSGI and through
``Listen.direct``: its own cost is what the request's thread spends; the cost until answered
includes the committer thread that applies the writes in groups.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import falcon

from distribkv.config import parse_config
from distribkv.http.api import DEFER
from distribkv.http.app import create_app
from distribkv.http.wrapper import ServingWrapper
from distribkv.node import Node
from distribkv.plugins import load_plugins

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


class Answers:
    """A deferring server's side of ``environ[DEFER]``: counts the finished answers."""

    def __init__(self):
        self.finished = 0
        self.statuses: dict[str, int] = {}
        self._lock = threading.Lock()

    def defer(self):
        return self

    def finish(self, status, headers, body):
        with self._lock:
            self.finished += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1


def environ(path: str, query: str, *, method: str = "GET", body: bytes = b"", defer=None) -> dict:
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.2",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.2:8080",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if body:
        env["CONTENT_LENGTH"] = str(len(body))
    if defer is not None:
        env[DEFER] = defer
    return env


def per_call(app, path: str, queries: list[str], calls: int, **request) -> float:
    def start_response(status, headers, exc_info=None):
        return None

    started = time.perf_counter()
    for i in range(calls):
        app(environ(path, queries[i % len(queries)], **request), start_response)
    return (time.perf_counter() - started) / calls * 1e6


def per_direct(direct, queries: list[str], calls: int) -> float:
    header = {}.get
    started = time.perf_counter()
    for i in range(calls):
        if direct("GET", "/get", queries[i % len(queries)], header, b"", False) is None:
            raise SystemExit("a direct GET gave no answer")
    return (time.perf_counter() - started) / calls * 1e6


def deferred_sets(app, queries: list[str], calls: int) -> tuple[float, float]:
    """PUT /set as a deferring server runs it: the request's own cost, and the cost per write
    until the committer thread has answered every one."""
    answers = Answers()
    started = time.perf_counter()
    own = per_call(app, "/set", queries, calls, method="PUT", body=b"v" * 100, defer=answers.defer)
    return own, until_answered(answers, calls, started, "deferred writes")


def until_answered(answers: Answers, calls: int, started: float, what: str) -> float:
    """Microseconds per write from ``started`` until all ``calls`` are answered (200 each)."""
    deadline = time.monotonic() + 60
    while answers.finished < calls and time.monotonic() < deadline:
        time.sleep(0.001)
    total = (time.perf_counter() - started) / calls * 1e6
    if answers.statuses != {"200 OK": calls}:
        raise SystemExit(f"{what} answered {answers.statuses}")
    return total


def deferred_direct_sets(app, node_app, queries: list[str], calls: int) -> tuple[float, float]:
    """:func:`deferred_sets` the way granian serves them, through ``Listen.direct`` and the
    serving wrapper (no environ)."""
    answers = Answers()
    header = {}.get
    value = b"v" * 100
    started = time.perf_counter()
    for i in range(calls):
        query = queries[i % len(queries)]
        app.direct(node_app.direct, "PUT", "/set", query, header, value, "-", answers.defer)
    own = (time.perf_counter() - started) / calls * 1e6
    return own, until_answered(answers, calls, started, "deferred direct writes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true", help="print the GET path's profile")
    parser.add_argument(
        "--profile-set", action="store_true", help="print the deferred SET path's profile"
    )
    args = parser.parse_args()
    # The node logs its access lines as it does when serving.
    devnull = open(os.devnull, "w")
    logging.basicConfig(level=logging.INFO, stream=devnull)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sharding.toml"
        path.write_text(CONFIG.format(backend=args.backend, data=tmp))
        node = Node(parse_config(path.read_text(), path), "s0", registry=load_plugins()).open()
        try:
            for i in range(args.keys):
                node.set(b"bench-%d" % i, b"v" * 100)
            node_app = create_app(node)
            app = ServingWrapper(node_app)
            noop_app = falcon.App()
            noop_app.add_route("/noop", Noop())
            noop = ServingWrapper(noop_app)
            for wrapper in (app, noop):
                if wrapper.access is not None:  # lines formatted as when serving, not shown
                    wrapper.access.stream = devnull
            queries = [f"key=bench-{i}" for i in range(args.keys)]
            for _ in range(2):  # warm, then measure
                noop_us = per_call(noop, "/noop", [""], args.calls)
                health_us = per_call(app, "/healthz", [""], args.calls)
                get_us = per_call(app, "/get", queries, args.calls)
                direct_us = per_direct(node_app.direct, queries, args.calls)
                served_us = per_direct(
                    lambda method, path, query, header, body, can_defer: app.direct(
                        node_app.direct, method, path, query, header, body, "127.0.0.1"
                    ),
                    queries,
                    args.calls,
                )
                set_us, set_total_us = deferred_sets(app, queries, args.calls)
                dset_us, dset_total_us = deferred_direct_sets(app, node_app, queries, args.calls)
            print(
                f"bare Falcon no-op {noop_us:.1f} us/call, the node's /healthz {health_us:.1f} us,"
                f" GET {get_us:.1f} us; a direct GET (Listen.direct) {direct_us:.1f} us,"
                f" {served_us:.1f} us through the serving wrapper (in-flight count, access-log"
                f" line); deferred SET {set_us:.1f} us ({set_total_us:.1f} us per write until"
                f" answered), {dset_us:.1f} us through Listen.direct ({dset_total_us:.1f} us)"
            )
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                per_call(app, "/get", queries, args.calls)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            if args.profile_set:
                profiler = cProfile.Profile()
                profiler.enable()
                deferred_sets(app, queries, args.calls)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            app.close()
            noop.close()
        finally:
            node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
