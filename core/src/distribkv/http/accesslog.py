"""The access log: one line per request, written in batches by a thread of its own.

The thread formats lines in Python, holding the GIL, while the serving thread waits for it to
answer the next request: at 20,000 requests a second, a flush of one 0.1 s batch at once held
it for 2 to 5 ms, ten times a second, and a GET's p99 was that wait. So a batch is formatted and
written in chunks of :data:`CHUNK` lines (about 0.1 ms each), with a pause of :data:`PAUSE`
seconds between two chunks in which the serving thread has the GIL to itself.

A request's line waits in the queue as its :data:`FIELDS` fields, not as a tuple: a tuple is an
object the garbage collector tracks, and thousands of them waiting for the next flush made
every collection of the youngest generation walk them (and, once a flush freed them, a
collection walk 4,000 at once: 0.6 ms). Fields are strings and numbers, which it never tracks.
"""

from __future__ import annotations

import atexit
import collections
import json
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from itertools import repeat, starmap

from distribkv.logformat import JsonFormatter

__all__ = ["CHUNK", "FIELDS", "PAUSE", "AccessLog", "query_key"]

#: Lines formatted and written at a time (about 0.1 ms of the GIL in text, 0.2 ms in JSON).
CHUNK = 128
#: Seconds the thread sleeps between two chunks of a batch, letting go of the GIL. A write of
#: the stream lets go of it too, but on a busy core the thread takes it back before the
#: serving thread runs; a sleep hands it over. 1,000 chunks a second still write well over
#: 100,000 lines a second.
PAUSE = 0.0005
#: Fields of a queued line: time, remote, method, path, status, ms, size, key.
FIELDS = 8


class AccessLog:
    """One line per request, in the format of the node's log, written by a background thread
    in batches: a ``logging`` call per request costs more than serving a GET. Bounded: beyond
    ``max_pending`` unwritten lines, new ones are counted and dropped (and the count logged).

    A request costs the same in either format: :meth:`add` appends a tuple, and the thread
    formats it. With ``json`` (a :class:`~distribkv.logformat.JsonFormatter`) a line carries
    the formatter's fields (node, shard) and ``method``, ``path``, ``route`` (the path if
    ``routes`` has it, else null: a low-cardinality name), ``status``, ``duration_ms``,
    ``bytes`` (of the answer's body) and ``remote``; ``key`` only when the caller passes it
    (at debug level). Never a value.

    Every ``interval`` seconds the thread writes what is pending, ``chunk`` lines at a time
    with a ``pause`` between two chunks (see the module's docstring)."""

    def __init__(
        self,
        stream=None,
        *,
        interval: float = 0.1,
        chunk: int = CHUNK,
        pause: float = PAUSE,
        sleep: Callable[[float], object] = time.sleep,
        max_pending: int = 100_000,
        json: JsonFormatter | None = None,
        routes: Collection[str] = (),
    ):
        self.stream = stream
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 line, not {chunk}")
        self.interval = interval
        self.chunk = chunk
        self.pause = pause
        self._sleep = sleep
        self.max_pending = max_pending
        self.json = json
        self.routes = frozenset(routes)
        #: The queued lines, :data:`FIELDS` items each (one ``extend`` adds a line at once).
        self.pending: collections.deque = collections.deque()
        self.dropped = 0
        self._flushing = threading.Lock()  # one flush at a time takes a line's fields
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distribkv-access", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(
        self,
        remote: str,
        method: str,
        path: str,
        status: str,
        ms: float,
        size: int = -1,
        key: str | None = None,
    ) -> None:
        """A request ended: ``size`` is its answer's body in bytes (-1: not known), ``key``
        the key as the query string had it (percent-encoded), given only at debug level."""
        pending = self.pending
        if len(pending) >= self.max_pending * FIELDS:
            self.dropped += 1
            return
        # The tuple is freed as soon as its fields are in: no object per line stays queued.
        pending.extend((time.time(), remote, method, path, status, ms, size, key))

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the access log must never stop the node
                with self._flushing:
                    self.pending.clear()

    def flush(self) -> None:
        """Write what is pending now (one bounded batch), ``chunk`` lines at a time. Between
        two chunks the thread pauses, unless the log is closing (then the rest goes at once)."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        left = len(self.pending) // FIELDS
        while left > 0:
            count = min(left, self.chunk)
            left -= count
            self._write(
                self._json_lines(count) if self.json is not None else self._text_lines(count)
            )
            if left and self.pause > 0 and not self._wake.is_set():
                self._sleep(self.pause)
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            message = f"{dropped} access-log lines dropped"
            if self.json is not None:
                line = self.json.line(
                    time.time(), "WARNING", "distribkv.access", {"message": message}
                )
                self._write([line + "\n"])
            else:
                self._write([f"WARNING distribkv.access: {message}\n"])

    def _write(self, lines: list[str]) -> None:
        if lines:
            stream = self.stream or sys.stderr
            try:
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError):
                pass  # nowhere to write: the node goes on serving

    def _take(self, count: int) -> Iterator[tuple]:
        """The fields of the next ``count`` lines, a line at a time (under ``_flushing``: no
        one else takes fields meanwhile, so a line's are together)."""
        fields = starmap(self.pending.popleft, repeat((), count * FIELDS))  # a loop in C
        return zip(*(fields,) * FIELDS, strict=True)

    def _text_lines(self, count: int) -> list[str]:
        lines = []
        second, stamp = -1, ""
        for at, remote, method, path, status, ms, _size, key in self._take(count):
            if not path.isprintable():  # a decoded %0A must not start a line of its own
                path = path.encode("unicode_escape").decode("ascii")
            if int(at) != second:  # one strftime per second of lines, not one per line
                second = int(at)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            more = "" if key is None else f" key={key}"
            lines.append(
                f"{stamp},{int(at * 1000) % 1000:03d} INFO distribkv.access:"
                f" {remote} {method} {path} {status} {ms:.1f}ms{more}\n"
            )
        return lines

    def _json_lines(self, count: int) -> list[str]:
        lines = []
        formatter = self.json
        assert formatter is not None
        routes = self.routes
        dumps = json.dumps
        # Methods, routes and client addresses repeat: each is quoted once per batch.
        quoted: dict[str, str] = {}
        second, stamp = -1, ""
        # Everything but the time and the request is the same on every line: made once.
        head = '", "level": "INFO", "logger": "distribkv.access"' + formatter.prefix
        for at, remote, method, path, status, ms, size, key in self._take(count):
            if int(at) != second:
                second = int(at)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            if path in routes:
                quoted_path = quoted.get(path) or quoted.setdefault(path, dumps(path))
                route = quoted_path
            else:
                quoted_path, route = dumps(path), "null"
            line = (
                f'{{"time": "{stamp}.{int(at * 1000) % 1000:03d}Z{head}, "method":'
                f" {quoted.get(method) or quoted.setdefault(method, dumps(method))},"
                f' "path": {quoted_path}, "route": {route}, "status": {_status(status)},'
                f' "duration_ms": {ms:.3f}, "bytes": {size if size >= 0 else "null"},'
                f' "remote": {quoted.get(remote) or quoted.setdefault(remote, dumps(remote))}'
            )
            if key is not None:
                line += f', "key": {dumps(key)}'
            lines.append(line + "}\n")
        return lines

    def close(self) -> None:
        self._wake.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - closing the log must not fail the shutdown
            pass


def _status(status: str) -> str:
    """The status as a JSON number, or null when the request got none (``-``)."""
    return status if status.isdigit() else "null"


def query_key(query: str) -> str | None:
    """The ``key`` parameter of a query string as it is written there (percent-encoded: safe
    to put in a line), or None. Only for debug-level access lines."""
    for part in query.split("&"):
        if part.startswith("key="):
            return part[4:]
    return None
