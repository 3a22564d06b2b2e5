"""The access log: one line per request, written in batches by a thread of its own."""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import time

__all__ = ["AccessLog"]


class AccessLog:
    """One line per request, in the format of the node's log, written by a background thread
    in batches: a ``logging`` call per request costs more than serving a GET. Bounded: beyond
    ``max_pending`` unwritten lines, new ones are counted and dropped (and the count logged)."""

    def __init__(self, stream=None, *, interval: float = 0.1, max_pending: int = 100_000):
        self.stream = stream
        self.interval = interval
        self.max_pending = max_pending
        self.pending: collections.deque = collections.deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distribkv-access", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, remote: str, method: str, path: str, status: str, ms: float) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        self.pending.append((time.time(), remote, method, path, status, ms))

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the access log must never stop the node
                self.pending.clear()

    def flush(self) -> None:
        lines = []
        pending = self.pending
        second, stamp = -1, ""
        for _ in range(len(pending)):  # what is there now: one bounded batch
            try:
                at, remote, method, path, status, ms = pending.popleft()
            except IndexError:  # another flush (close) took it
                break
            if not path.isprintable():  # a decoded %0A must not start a line of its own
                path = path.encode("unicode_escape").decode("ascii")
            if int(at) != second:  # one strftime per second of lines, not one per line
                second = int(at)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            lines.append(
                f"{stamp},{int(at * 1000) % 1000:03d} INFO distribkv.access:"
                f" {remote} {method} {path} {status} {ms:.1f}ms\n"
            )
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            lines.append(f"WARNING distribkv.access: {dropped} access-log lines dropped\n")
        if lines:
            stream = self.stream or sys.stderr
            try:
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError):
                pass  # nowhere to write: the node goes on serving

    def close(self) -> None:
        self._wake.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - closing the log must not fail the shutdown
            pass
