"""A no-op endpoint served by a server plugin with a node's settings: the ceiling a node's
request path is measured against.

    python -m distribkv.bench.noop --server waitress --host 127.0.0.1 --port 8080 --threads 8

It logs like a node (one access-log line per request to standard error), and its endpoint is
served like the node's reads (``Listen.inline``: it never waits), so both carry the same
per-request costs of the server and the serving wrapper; only the application differs.
"""

from __future__ import annotations

import argparse
import logging
import signal

import falcon

from distribkv.http.api import Listen
from distribkv.plugins import load_plugins


class Noop:
    def on_get(self, req, resp):
        resp.data = b""


def noop_is_inline(method: str, path: str, query: str) -> bool:
    return method == "GET" and path == "/noop"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distribkv.bench.noop", description=__doc__)
    parser.add_argument("--server", default="waitress", help="server plugin (default: waitress)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--connection-limit", type=int, default=100)
    parser.add_argument("--channel-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = falcon.App()
    app.add_route("/noop", Noop())
    spec = load_plugins().http_server(args.server)
    handle = spec.create(
        app,
        Listen(
            args.host,
            args.port,
            threads=args.threads,
            connection_limit=args.connection_limit,
            channel_timeout=args.channel_timeout,
            inline=noop_is_inline,
        ),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: handle.stop())
    handle.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
