"""In-process tests of the node's metrics: the plain counts, what ``/metrics`` shows of them,
``[server] metrics = false``, and the listener of ``[server] metrics_port`` with and without
``[auth]``. The series of running clusters, on both servers and scraped by Prometheus, are in
tests/test_metrics.py."""

from __future__ import annotations

import http.client
import random
from pathlib import Path

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distribkv import __version__
from distribkv.config import parse_config
from distribkv.http.app import create_app
from distribkv.http.wrapper import ServingWrapper
from distribkv.metrics.counts import FOLD_AT, LATENCY_BUCKETS, OTHER, Buckets, RequestCounts
from distribkv.metrics.exposition import MetricsListener
from distribkv.node import Node
from distribkv.plugins import load_plugins

CONFIG = """
[storage]
backend = "memory"
[server]
{server}
{auth}
[[shards]]
name = "s0"
idx = 0
address = "{address}"
"""
TOKEN = "cluster-token-" + "c" * 16
READER = "reader-token-" + "r" * 16


def make_node(tmp_path: Path, hosts, *, server: str = "", auth: bool = False) -> Node:
    auth_table = ""
    if auth:
        reader = tmp_path / "reader"
        reader.write_text(READER)
        reader.chmod(0o600)
        auth_table = '[auth]\ntokens = [{name = "viewer", role = "read", token_file = "reader"}]\n'
    path = tmp_path / "sharding.toml"
    path.write_text(CONFIG.format(address=hosts.address(), server=server, auth=auth_table))
    environ = {"DISTRIBKV_CLUSTER_TOKEN": TOKEN} if auth else {}
    return Node(
        parse_config(path.read_text(), path), "s0", registry=load_plugins(), environ=environ
    ).open()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, by name and sorted labels (the library's parser: what it
    cannot parse fails the test)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_buckets_are_cumulative_and_end_with_inf():
    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 5.0):
        buckets.observe(value)
    cumulative, count, total = buckets.snapshot()
    assert cumulative == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert count == 4 and total == pytest.approx(5.65)


def test_folded_latencies_fall_in_the_buckets_observe_puts_them_in():
    rng = random.Random(5)
    bounds = (0.1, 0.5, 1.0)
    values = [
        rng.choice((0.1, 0.5, 1.0, 0.0, 3.0)) + rng.choice((0.0, 1e-9, -1e-9)) for _ in range(500)
    ]
    one, bulk = Buckets(bounds), Buckets(bounds)
    for value in values:
        one.observe(value)
    bulk.observe_many(list(values))
    assert bulk.counts == one.counts and sum(bulk.counts) == len(values)
    assert bulk.sum == pytest.approx(one.sum)


def test_request_counts_fold_in_runs_and_at_each_read():
    counts = RequestCounts(["/get"])
    total = 3 * FOLD_AT + 7  # three folds as requests end, and the rest when read
    for i in range(total):
        counts.count("/get", "200" if i % 3 else "404 Not Found", 0.0001 if i % 2 else 0.3)
    route = counts.routes["/get"]
    assert len(route.statuses) == 7 == len(route.seconds)
    routes = dict(counts.each())
    assert route.statuses == [] and route.seconds == []
    assert RequestCounts.by_code(routes["/get"]) == {"200": 2 * total // 3, "404": total // 3 + 1}
    latency = routes["/get"].latency
    assert sum(latency.counts) == total
    assert latency.counts[0] == total // 2  # 0.1 ms: the first bucket
    assert latency.counts[LATENCY_BUCKETS.index(0.5)] == total - total // 2  # 0.3 s


def test_request_counts_put_unknown_paths_under_other_and_codes_by_three_digits():
    counts = RequestCounts(["/get"])
    counts.count("/get", "200", 0.0001)
    counts.count("/get", "200 OK", 0.002)
    counts.count("/get", "404 Not Found", 20.0)
    counts.count("/get/../../etc", "404", 0.001)
    counts.count("/anything", "-", 0.001)
    routes = dict(counts.each())
    assert set(routes) == {"/get", OTHER}
    assert RequestCounts.by_code(routes["/get"]) == {"200": 2, "404": 1}
    assert RequestCounts.by_code(routes[OTHER]) == {"404": 1, "-": 1}
    latency = routes["/get"].latency
    assert latency.counts[0] == 1 and latency.counts[-1] == 1  # 0.1 ms, and over 10 s
    assert len(latency.counts) == len(LATENCY_BUCKETS) + 1


def test_requests_through_the_serving_wrapper_show_in_metrics(tmp_path, hosts):
    node = make_node(tmp_path, hosts)
    app = create_app(node)
    wrapper = ServingWrapper(app)
    assert wrapper.requests is app.request_counts is not None
    try:
        client = falcon.testing.TestClient(wrapper)
        assert client.simulate_put("/set", query_string="key=a", body=b"1").status_code == 200
        for _ in range(3):
            assert client.simulate_get("/get", query_string="key=a").status_code == 200
        assert client.simulate_get("/get", query_string="key=zz").status_code == 404
        assert client.simulate_get("/no/such/path").status_code == 404
        response = client.simulate_get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        seen = samples(response.text)
        requests = "distribkv_http_requests_total"
        assert seen[requests, (("code", "200"), ("route", "/get"))] == 3
        assert seen[requests, (("code", "404"), ("route", "/get"))] == 1
        assert seen[requests, (("code", "200"), ("route", "/set"))] == 1
        assert seen[requests, (("code", "404"), ("route", "other"))] == 1
        duration = "distribkv_http_request_duration_seconds"
        assert seen[duration + "_count", (("route", "/get"),)] == 4
        assert seen[duration + "_bucket", (("le", "+Inf"), ("route", "/get"))] == 4
        assert seen["distribkv_commit_group_size_sum", ()] == 1
        assert seen["distribkv_storage_keys", ()] == 1
        assert seen["distribkv_node_leader", ()] == 1
        assert "no/such" not in response.text
        info = [labels for (name, labels) in seen if name == "distribkv_node_info"]
        assert dict(info[0]) == {
            "backend": "memory",
            "node": "s0/leader",
            "role": "leader",
            "server": "waitress",
            "shard": "s0",
            "version": __version__,
        }
        # Prometheus asks for OpenMetrics, and gets it.
        openmetrics = client.simulate_get(
            "/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"}
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")
    finally:
        wrapper.close()
        app.close()
        node.close()


def test_metrics_off_counts_nothing_and_serves_no_metrics(tmp_path, hosts):
    node = make_node(tmp_path, hosts, server="metrics = false")
    app = create_app(node)
    wrapper = ServingWrapper(app)
    try:
        assert node.metrics is None and app.metrics is None and wrapper.requests is None
        client = falcon.testing.TestClient(wrapper)
        assert client.simulate_get("/get", query_string="key=a").status_code == 404
        assert client.simulate_get("/metrics").status_code == 404
    finally:
        wrapper.close()
        app.close()
        node.close()


def fetch(address, target: str, headers: dict | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("auth", [False, True], ids=["open", "auth"])
def test_the_separate_listener_serves_metrics_as_the_node_port_does(tmp_path, hosts, auth):
    node = make_node(tmp_path, hosts, auth=auth)
    app = create_app(node)
    listener = MetricsListener(
        node.address.host, 0, app.metrics, authorizer=node.authorizer
    ).start()
    try:
        address = listener.address
        assert fetch(address, "/status")[0] == 404
        assert fetch(address, "/metrics", method="POST")[0] == 405
        status, body = fetch(address, "/metrics")
        if auth:
            # /status's role: admin by default; a read token is not enough.
            assert status == 401, body
            reader = {"Authorization": f"Bearer {READER}"}
            assert fetch(address, "/metrics", reader)[0] == 403
            status, body = fetch(address, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, body
        assert ("distribkv_node_leader", ()) in samples(body)
    finally:
        listener.stop()
        app.close()
        node.close()


def test_a_scraper_that_trickles_is_cut_off_and_others_are_served(tmp_path, hosts, monkeypatch):
    from distribkv.metrics import exposition

    monkeypatch.setattr(exposition, "REQUEST_TIMEOUT", 0.5)
    node = make_node(tmp_path, hosts)
    app = create_app(node)
    listener = MetricsListener(node.address.host, 0, app.metrics).start()
    try:
        import socket

        stuck = [socket.create_connection(listener.address, timeout=5) for _ in range(4)]
        for sock in stuck:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        for sock in stuck:  # each is closed after the timeout, without an answer
            assert sock.recv(100) == b""
            sock.close()
        assert fetch(listener.address, "/metrics")[0] == 200
    finally:
        listener.stop()
        app.close()
        node.close()
