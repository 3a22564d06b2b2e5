"""A no-op endpoint served by a server plugin with a node's settings: the ceiling a node's
request path is measured against.

    python -m distribkv.bench.noop --server waitress --host 127.0.0.1 --port 8080 --threads 8

It logs like a node (one access-log line per request to standard error), and its endpoint is
served like the node's reads: inline (``Listen.inline``: it never waits), answered without WSGI
where the server can (``Listen.direct``, as the node's reads of stored keys are), else by a
bare WSGI application (as the node's fast paths are). Both carry the same per-request costs of
the server and the serving wrapper; only the read differs.
"""

from __future__ import annotations

import argparse
import logging
import signal

from distribkv.http.api import Listen
from distribkv.plugins import load_plugins

EMPTY_HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", "0")]
NOT_FOUND = b"not found\n"


class Noop:
    """``GET /noop``: 200 with an empty body; anything else is a 404."""

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/noop" and environ["REQUEST_METHOD"] == "GET":
            start_response("200 OK", EMPTY_HEADERS)
            return [b""]
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(NOT_FOUND)))],
        )
        return [NOT_FOUND]

    def direct(self, method, path, query, header, body, can_defer) -> tuple | None:
        return (200, EMPTY_HEADERS, b"") if path == "/noop" and method == "GET" else None


def noop_is_inline(method: str, path: str, query: str) -> bool:
    return method == "GET" and path == "/noop"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distribkv.bench.noop", description=__doc__)
    parser.add_argument("--server", default="waitress", help="server plugin (default: waitress)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--connection-limit", type=int, default=1024)
    parser.add_argument("--channel-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = Noop()
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
            direct=app.direct,
        ),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: handle.stop())
    handle.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
