"""Which nodes are down for now: a circuit breaker per address, for the Python client.

A node that timed out or refused a connection is marked down for ``first`` seconds; while it
is, requests do not wait for it again but go to another node that can serve them, or fail at
once. When the time is up, one request (the probe) may go to it; the others still see it down
until the probe ends. A failed probe marks it down again for twice as long, up to ``most``
seconds; any answer marks it up and forgets its failures. The other requests that were under
way when it was marked down fail too, and count as the same failure.

Only nodes that are down are remembered, at most ``capacity`` of them (a client talks to the
nodes of one shard map, so the bound is never reached in practice; when it is, the node whose
down time ends first is forgotten, and is simply tried again).

The clock is injectable so that the doubling can be tested without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import attrs

__all__ = ["Breaker", "Down"]


@attrs.frozen
class Down:
    """A node marked down: why (``reason``), how many failures in a row, since when and until
    when (``time.monotonic()`` seconds), and ``retry_in``: seconds from the moment it was asked
    until a request may go to it again."""

    address: str
    reason: str
    failures: int
    since: float
    until: float
    retry_in: float

    def describe(self) -> str:
        times = "once" if self.failures == 1 else f"{self.failures} times in a row"
        return (
            f"{self.address} is marked down ({self.reason}, {times});"
            f" it is tried again in {self.retry_in:.1f}s"
        )


@attrs.define
class _Entry:
    reason: str
    failures: int
    since: float
    until: float
    probe_until: float = 0.0  # a probe is under way until then (at the latest)


class Breaker:
    """Thread-safe: one breaker is shared by every thread of a client."""

    def __init__(
        self,
        first: float = 2.0,
        most: float = 30.0,
        *,
        capacity: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        if first <= 0 or most < first:
            raise ValueError(f"down times need 0 < first <= most (first={first}, most={most})")
        self.first = first
        self.most = most
        self.capacity = capacity
        self.clock = clock
        self._down: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def down(self, address: str) -> Down | None:
        """The node's :class:`Down` while requests must not go to it (it is down, or a probe
        of it is under way), else None. Asks only: see :meth:`claim`."""
        with self._lock:
            entry = self._down.get(address)
            now = self.clock()
            if entry is None or now >= max(entry.until, entry.probe_until):
                return None
            return self._describe(address, entry, now)

    def claim(self, address: str, probe_for: float) -> Down | None:
        """None if a request may go to ``address`` now: it is up, or its down time is over and
        this request becomes the probe (for at most ``probe_for`` seconds: other requests see
        the node down until the probe reports with :meth:`failed`, :meth:`succeeded` or
        :meth:`released`, or that time is over). Otherwise the node's :class:`Down`."""
        with self._lock:
            entry = self._down.get(address)
            now = self.clock()
            if entry is None:
                return None
            if now < max(entry.until, entry.probe_until):
                return self._describe(address, entry, now)
            entry.probe_until = now + probe_for
            return None

    def failed(self, address: str, reason: str) -> Down:
        """The node gave no answer: mark it down, for twice as long as last time (up to
        ``most``). Requests that were under way when it was marked down fail too: while its
        down time lasts, their failures change nothing."""
        with self._lock:
            now = self.clock()
            entry = self._down.get(address)
            if entry is not None and now < entry.until:
                return self._describe(address, entry, now)
            failures = 1 if entry is None else entry.failures + 1
            period = min(self.most, self.first * 2 ** min(failures - 1, 32))
            if entry is None and len(self._down) >= self.capacity:
                del self._down[min(self._down, key=lambda a: self._down[a].until)]
            entry = self._down[address] = _Entry(reason, failures, now, now + period)
            return self._describe(address, entry, now)

    def succeeded(self, address: str) -> None:
        """The node answered: it is up."""
        with self._lock:
            self._down.pop(address, None)

    def released(self, address: str) -> None:
        """A probe ended without telling whether the node is up (the request was cut short by
        its caller's deadline): another request may probe it."""
        with self._lock:
            entry = self._down.get(address)
            if entry is not None:
                entry.probe_until = 0.0

    def snapshot(self) -> list[Down]:
        """Every node marked down now, soonest retried first."""
        with self._lock:
            now = self.clock()
            rows = [self._describe(a, e, now) for a, e in self._down.items()]
        return sorted(rows, key=lambda d: d.until)

    @staticmethod
    def _describe(address: str, entry: _Entry, now: float) -> Down:
        until = max(entry.until, entry.probe_until)
        return Down(
            address, entry.reason, entry.failures, entry.since, until, max(0.0, until - now)
        )
