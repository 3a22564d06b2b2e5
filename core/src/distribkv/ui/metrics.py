"""Throughput and latency of a node from two scrapes of its ``/metrics``.

A node's ``/metrics`` (Prometheus text) carries two families the page needs:
``distribkv_http_requests_total{route, code}``, a counter, and
``distribkv_http_request_duration_seconds{route}``, a histogram. Both only grow, so what
happened between two scrapes is their difference: requests per second, errors (5xx) per second,
and the latency quantiles of the histogram's bucket differences (interpolated inside a bucket as
Prometheus's ``histogram_quantile`` does). Differences of several nodes add up to the cluster's.

Only the key-value requests are counted (``/get``, ``/set``, ``/delete``, ``/batch``, including
those answered with a redirect): not the page's own polling (``/status``, ``/metrics``,
``/ui/data``), health checks, nor the nodes' traffic among themselves, whose replication
long-polls would make the latency of an idle cluster seconds long.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Delta", "Scrape", "parse", "quantile"]

REQUESTS = "distribkv_http_requests"
DURATION = "distribkv_http_request_duration_seconds"

#: The routes whose requests are the cluster's work: what clients ask of it.
COUNTED = frozenset({"/get", "/set", "/delete", "/batch"})


def counted(route: str) -> bool:
    return route in COUNTED


@attrs.frozen
class Scrape:
    """One node's counters at one moment (``at``: this process's monotonic clock)."""

    at: float
    requests: float
    errors: float
    #: The latency histogram summed over the counted routes: (upper bound, cumulative count),
    #: by increasing bound, the last one +Inf.
    buckets: tuple[tuple[float, float], ...]

    def since(self, before: Scrape) -> Delta | None:
        """What happened from ``before`` to this scrape; None if a counter went down (the node
        restarted in between) or no time passed."""
        seconds = self.at - before.at
        if seconds <= 0 or self.requests < before.requests or self.errors < before.errors:
            return None
        earlier = dict(before.buckets)
        buckets = []
        for bound, count in self.buckets:
            diff = count - earlier.get(bound, 0.0)
            if diff < 0:
                return None
            buckets.append((bound, diff))
        return Delta(
            seconds, self.requests - before.requests, self.errors - before.errors, tuple(buckets)
        )


@attrs.frozen
class Delta:
    """Requests, errors and the latency histogram over ``seconds``."""

    seconds: float
    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...]

    def rates(self) -> dict[str, float | None]:
        """Requests and errors per second, and the 50th and 99th percentile latency in ms
        (None without requests)."""
        p50 = quantile(0.5, self.buckets)
        p99 = quantile(0.99, self.buckets)
        return {
            "rps": round(self.requests / self.seconds, 2),
            "errors_per_s": round(self.errors / self.seconds, 2),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }

    @staticmethod
    def total(deltas: Iterable[Delta]) -> Delta | None:
        """The deltas of several nodes over about the same interval, as one (their rates add;
        the interval is their mean)."""
        deltas = list(deltas)
        if not deltas:
            return None
        buckets: dict[float, float] = {}
        for delta in deltas:
            for bound, count in delta.buckets:
                buckets[bound] = buckets.get(bound, 0.0) + count
        return Delta(
            sum(d.seconds for d in deltas) / len(deltas),
            sum(d.requests for d in deltas),
            sum(d.errors for d in deltas),
            tuple(sorted(buckets.items())),
        )


def parse(text: str, at: float) -> Scrape:
    """The counted requests of a node's ``/metrics`` text. Raises ValueError when the text is
    not Prometheus text or lacks the request families."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    seen = set()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # noqa: BLE001 - the parser raises what it meets (ValueError, ...)
        raise ValueError(f"not Prometheus text: {exc}") from None
    for family in families:
        if family.name == REQUESTS:
            seen.add(REQUESTS)
            for sample in family.samples:
                if sample.name != REQUESTS + "_total" or not counted(
                    sample.labels.get("route", "")
                ):
                    continue
                requests += sample.value
                if sample.labels.get("code", "").startswith("5"):
                    errors += sample.value
        elif family.name == DURATION:
            seen.add(DURATION)
            for sample in family.samples:
                if sample.name != DURATION + "_bucket" or not counted(
                    sample.labels.get("route", "")
                ):
                    continue
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    missing = {REQUESTS, DURATION} - seen
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))} in the metrics")
    return Scrape(at, requests, errors, tuple(sorted(buckets.items())))


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated linearly inside its bucket
    (the lowest bucket from 0); a quantile in the +Inf bucket is the highest finite bound.
    None for an empty histogram."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
