"""What a node counts while it serves: plain ints and lists, read when ``/metrics`` is scraped.

Counting happens on the hot path (every request ends in
:meth:`distribkv.http.wrapper.ServingWrapper._finished`), so a request that ends only appends
its status and its latency to two lists of its route, under the lock the wrapper takes anyway
for its in-flight count; every :data:`FOLD_AT` requests of a route, and at each scrape, the
lists are folded into the counts in bulk (a ``Counter`` of the statuses, the latencies sorted
and cut at the bucket bounds). Per request that is about 40% of the instructions of counting
each one into a dict and a ``bisect`` (callgrind), with no object per request, no lock of its
own, and nothing of ``prometheus_client`` (whose ``Histogram.observe`` takes a lock and costs
several times more). :mod:`distribkv.metrics.collector` turns these counts into metric
families at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable

__all__ = [
    "FOLD_AT",
    "GROUP_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "OTHER",
    "Buckets",
    "NodeCounts",
    "RequestCounts",
    "RouteCounts",
]

#: Upper bounds (seconds) of the request and apply latency buckets: 0.25 ms to 10 s.
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Upper bounds of the group-commit group size (writes per storage apply).
GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Requests a route keeps unfolded at most: the request that makes this many folds them (some
#: tens of microseconds), and a scrape folds the rest.
FOLD_AT = 256
#: The route label of every path that is not one of the node's routes.
OTHER = "other"


class Buckets:
    """A histogram as plain numbers: ``counts[i]`` observations in bucket ``i`` (the last one
    is +Inf) and their ``sum``. Not locked: its one writer at a time is the caller's to
    ensure (the wrapper's lock, the committer's one group at a time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: list[float]) -> None:
        """:meth:`observe` each of ``values`` (sorted here, in place)."""
        values.sort()
        counts = self.counts
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(values, bound)  # the values <= bound, as observe() counts
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self.sum += sum(values)

    def snapshot(self) -> tuple[list[tuple[str, int]], int, float]:
        """Cumulative ``(le, count)`` pairs ending with +Inf, the total count and the sum,
        as Prometheus histograms give them."""
        counts = list(self.counts)
        total = self.sum
        cumulative = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            cumulative.append((_le(bound), running))
        running += counts[-1]
        cumulative.append(("+Inf", running))
        return cumulative, running, total


def _le(bound: float) -> str:
    return repr(float(bound))


class RouteCounts:
    """One route's requests: how many ended with each status, and their latency."""

    __slots__ = ("codes", "latency", "seconds", "statuses")

    def __init__(self):
        #: By status as the server gave it: ``"200"`` or a WSGI status line ``"200 OK"``;
        #: the first three characters are the code (see :meth:`RequestCounts.by_code`).
        self.codes: dict[str, int] = {}
        self.latency = Buckets(LATENCY_BUCKETS)
        #: The statuses and latencies of the requests that ended since the last :meth:`fold`.
        self.statuses: list[str] = []
        self.seconds: list[float] = []

    def fold(self) -> None:
        """Count the requests that ended since the last fold into :attr:`codes` and
        :attr:`latency` (under the lock of the lists' writers)."""
        statuses, seconds = self.statuses, self.seconds
        if not statuses:
            return
        self.statuses, self.seconds = [], []
        codes = self.codes
        for status, count in Counter(statuses).items():
            codes[status] = codes.get(status, 0) + count
        self.latency.observe_many(seconds)


class RequestCounts:
    """Requests by route (one of the node's route paths, or :data:`OTHER`), status and
    latency: the counts behind ``distribkv_http_requests_total`` and
    ``distribkv_http_request_duration_seconds``. A raw path is never a label: any path that
    is not a route counts as :data:`OTHER`, so a client cannot make series up."""

    def __init__(self, routes: Iterable[str]):
        self.routes: dict[str, RouteCounts] = {path: RouteCounts() for path in routes}
        self.other = RouteCounts()
        #: The lock of every writer (the serving wrapper takes it as its own) and of a fold.
        self.lock = threading.Lock()

    def count(self, path: str, status: str, seconds: float) -> None:
        """One request ended (the caller holds :attr:`lock`). The serving wrapper does the
        same inline (``ServingWrapper._finished``): keep both alike."""
        route = self.routes.get(path) or self.other
        statuses = route.statuses
        statuses.append(status)
        route.seconds.append(seconds)
        if len(statuses) >= FOLD_AT:
            route.fold()

    def each(self) -> Iterable[tuple[str, RouteCounts]]:
        """Every route's counts, folded first (takes :attr:`lock`)."""
        everything = [*self.routes.items(), (OTHER, self.other)]
        with self.lock:
            for _, route in everything:
                route.fold()
        yield from everything

    @staticmethod
    def by_code(route: RouteCounts) -> dict[str, int]:
        """The route's counts by three-digit code (``"-"``: the request ended without an
        answer from the node, e.g. the client went away)."""
        out: dict[str, int] = {}
        for status, count in list(route.codes.items()):
            code = status[:3] if status[:3].isdigit() else "-"
            out[code] = out.get(code, 0) + count
        return out


class NodeCounts:
    """Everything a node counts for its metrics, besides what it can read at scrape time.

    The counters off the hot path (routing, replication, reshard) take :attr:`lock`: a
    redirect or a forward costs far more than the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        #: Set by the node's application once it knows its routes.
        self.requests: RequestCounts | None = None
        #: Redirects answered, by reason: "wrong_shard", "not_leader" (a write to a replica,
        #: or a leader-only read).
        self.redirects: dict[str, int] = {}
        #: Requests forwarded (``routing = "proxy"``) by target shard, and those that failed:
        #: by (shard, reason), reason "timeout", "unreachable" or "busy" (too many waiting).
        self.forwards: dict[str, int] = {}
        self.forward_failures: dict[tuple[str, str], int] = {}
        #: Forwarded requests this node refused with 421 (the maps disagree).
        self.misdirected = 0
        #: Group commit: writes per storage apply, and how long each apply (with its fsync
        #: under ``durability = "sync"``) took.
        self.commit_groups = Buckets(GROUP_SIZE_BUCKETS)
        self.commit_seconds = Buckets(LATENCY_BUCKETS)
        #: Full resyncs this node did as a replica.
        self.resyncs = 0
        #: Keys a reshard copied away from this node (pages and log entries it served), and
        #: keys it received as a new owner.
        self.reshard_keys_sent = 0
        self.reshard_keys_received = 0

    def add(self, table: dict, key, count: int = 1) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + count

    def bump(self, name: str, count: int = 1) -> None:
        """Add ``count`` to the int attribute ``name``."""
        with self.lock:
            setattr(self, name, getattr(self, name) + count)

    def committed(self, writes: int, seconds: float) -> None:
        """One group-commit apply (called by the one thread applying groups at a time)."""
        self.commit_groups.observe(writes)
        self.commit_seconds.observe(seconds)
