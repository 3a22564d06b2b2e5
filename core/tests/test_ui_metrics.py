"""The cluster page's rates: requests, errors and latency quantiles from two scrapes of a node's
``/metrics``, written here by prometheus-client itself in the families a node exports."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from distribkv.ui.metrics import Delta, Scrape, parse, quantile

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


class Node:
    """The two request families of a node, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distribkv_http_requests",
            "requests",
            ["route", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "distribkv_http_request_duration_seconds",
            "latency",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def serve(self, route: str, code: str, seconds: float, times: int = 1) -> None:
        for _ in range(times):
            self.requests.labels(route=route, code=code).inc()
            self.duration.labels(route=route).observe(seconds)

    def scrape(self, at: float) -> Scrape:
        return parse(generate_latest(self.registry).decode(), at)


def test_rates_count_the_key_value_requests_only():
    node = Node()
    node.serve("/get", "200", 0.002, times=10)
    before = node.scrape(at=100.0)
    node.serve("/get", "200", 0.002, times=30)
    node.serve("/set", "200", 0.02, times=8)
    node.serve("/set", "503", 0.02, times=2)
    # The page's polling, health checks and the nodes' own traffic are not the cluster's work.
    for route in ("/status", "/metrics", "/ui/data", "/ui", "/healthz", "/replication/pull"):
        node.serve(route, "200", 0.7, times=50)
    rates = node.scrape(at=102.0).since(before).rates()
    assert rates["rps"] == 20.0  # 40 requests in 2 s
    assert rates["errors_per_s"] == 1.0
    # 30 of 40 requests are under 5 ms, all under 50 ms: the 0.7 s ones are not counted.
    assert 1.0 < rates["p50_ms"] <= 5.0
    assert 10.0 < rates["p99_ms"] <= 50.0


def test_a_restarted_node_gives_no_rate_for_that_interval():
    node = Node()
    node.serve("/get", "200", 0.002, times=10)
    before = node.scrape(at=1.0)
    restarted = Node()
    restarted.serve("/get", "200", 0.002, times=3)
    assert restarted.scrape(at=3.0).since(before) is None
    assert node.scrape(at=1.0).since(before) is None  # no time passed


def test_quantiles_interpolate_inside_a_bucket_as_prometheus_does():
    buckets = ((0.1, 50.0), (0.2, 100.0), (math.inf, 100.0))
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.25, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.198)
    # Beyond the last finite bound: that bound, the most a histogram can tell.
    assert quantile(0.99, ((0.1, 10.0), (math.inf, 20.0))) == pytest.approx(0.1)
    assert quantile(0.5, ((0.1, 0.0), (math.inf, 0.0))) is None
    assert quantile(0.5, ()) is None


def test_the_clusters_rates_add_the_nodes():
    one = Delta(2.0, 20.0, 0.0, ((0.01, 20.0), (math.inf, 20.0)))
    two = Delta(2.0, 60.0, 4.0, ((0.01, 0.0), (0.1, 60.0), (math.inf, 60.0)))
    total = Delta.total([one, two])
    assert total is not None
    rates = total.rates()
    assert rates["rps"] == 40.0 and rates["errors_per_s"] == 2.0
    assert 10.0 < rates["p99_ms"] <= 100.0  # 3 of 4 requests are the slower node's
    assert Delta.total([]) is None
    assert Delta(2.0, 0.0, 0.0, ((math.inf, 0.0),)).rates()["p50_ms"] is None


def test_text_without_the_request_families_is_refused_with_what_is_missing():
    with pytest.raises(ValueError, match="distribkv_http_request_duration_seconds"):
        parse("# TYPE distribkv_http_requests counter\ndistribkv_http_requests_total 3\n", 0)
    with pytest.raises(ValueError, match="no distribkv_http_request"):
        parse("", 0)
    with pytest.raises(ValueError):
        parse("this is { not prometheus text\n", 0)
