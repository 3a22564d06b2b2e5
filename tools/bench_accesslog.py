#!/usr/bin/env python3
"""What the access log costs a request, in text and in JSON (``[server] log_format``).

Two shares, measured in this process without a server: the request thread's (a call of the
serving wrapper around an application that answers 100 bytes, which queues the line) and the
log thread's (formatting the queued lines and writing them to memory). Each figure is the
minimum over ``--rounds`` runs of ``--requests`` calls, so that other work on the machine
counts little; the ratios compare the two formats within one run.

    .venv/bin/python tools/bench_accesslog.py [--rounds 60] [--requests 5000]
"""

from __future__ import annotations

import argparse
import io
import logging
import time

from distribkv.http.wrapper import ServingWrapper
from distribkv.logformat import JsonFormatter

BODY = [b"x" * 100]
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/get",
    "QUERY_STRING": "key=abc",
    "REMOTE_ADDR": "127.0.0.1",
}


def app(environ, start_response):
    start_response("200 OK", [])
    return BODY


def measure(log_format: str, rounds: int, requests: int) -> tuple[float, float]:
    """(ns per wrapper call, ns per formatted line) in ``log_format``."""
    handler = logging.StreamHandler(io.StringIO())
    if log_format == "json":
        handler.setFormatter(JsonFormatter({"node": "shard-0/leader", "shard": "shard-0"}))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        wrapper = ServingWrapper(app)
    finally:
        root.removeHandler(handler)
    access = wrapper.access
    assert access is not None and (access.json is not None) == (log_format == "json")
    access.interval = 3600.0  # the test flushes by itself: no background flush in between
    access._wake.set()
    access._thread.join()
    access._wake.clear()
    access.pause = 0.0  # the formatting is measured, not the pauses between chunks

    def start_response(status, headers, exc_info=None):
        return None

    calls, lines = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            wrapper(ENVIRON, start_response)
        calls.append((time.perf_counter() - started) / requests)
        access.stream = io.StringIO()
        started = time.perf_counter()
        access.flush()
        lines.append((time.perf_counter() - started) / requests)
    return min(calls) * 1e9, min(lines) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    text = measure("text", args.rounds, args.requests)
    json_ = measure("json", args.rounds, args.requests)
    print(f"text: {text[0]:,.0f} ns a request, {text[1]:,.0f} ns a line")
    print(f"json: {json_[0]:,.0f} ns a request, {json_[1]:,.0f} ns a line")
    print(f"json/text: {json_[0] / text[0]:.2f}x a request, {json_[1] / text[1]:.2f}x a line")


if __name__ == "__main__":
    main()
