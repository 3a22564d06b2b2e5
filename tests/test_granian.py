"""The node served by the ``granian`` plugin: the HTTP behaviour of test_node, plus the plugin's
own promises (exact bind, refusal of a taken address, drain on SIGTERM)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from cluster import Cluster, NodeProcess, alive, call, q, wait_until, write_config

pytest.importorskip("distribkv_granian")

# The same tests as over waitress, collected again here with this module's clusters.
from test_node import (  # noqa: F401
    test_a_body_over_a_limit_is_refused_by_its_length_before_it_is_sent,
    test_a_key_set_through_any_node_is_read_through_any_node,
    test_a_method_a_route_does_not_take_is_405_naming_the_allowed_ones,
    test_a_replica_refuses_writes_and_points_to_its_leader,
    test_a_request_routed_with_another_map_gets_409,
    test_a_value_over_the_limit_is_refused_with_413_whether_sent_at_once_or_not,
    test_a_wrong_shard_request_is_redirected_to_the_owner,
    test_bad_requests_get_real_status_codes_with_json,
    test_batch_in_msgpack_and_json,
    test_delete_removes_the_key,
    test_each_request_writes_one_access_log_line,
    test_keys_and_values_round_trip_byte_exactly,
    test_proxy_mode_forwards_and_returns_the_owners_status,
    test_values_in_the_query_string_are_bytes_too,
)

GRANIAN = '[cluster]\nserver = "granian"\n'


def granian_config(directory, **kwargs):
    path = write_config(directory, **kwargs)
    text = path.read_text().replace("[cluster]\n", GRANIAN, 1)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def redirect_cluster(tmp_path_factory, backend_name):
    path = granian_config(
        tmp_path_factory.mktemp("granian-redirect"),
        shards=2,
        replicas={0: 1},
        backend=backend_name,
        extra="max_value_size = 100000",
        hosts_from=180,
    )
    cluster = Cluster(path).start()
    yield cluster
    assert cluster.stop() == 0, "".join(cluster.output)
    assert not [pid for pid in cluster.pids if alive(pid)]


@pytest.fixture(scope="module")
def proxy_cluster(tmp_path_factory, backend_name):
    path = granian_config(
        tmp_path_factory.mktemp("granian-proxy"),
        shards=3,
        replicas={1: 1},
        backend=backend_name,
        routing="proxy",
        hashing="ring",
        hosts_from=190,
    )
    cluster = Cluster(path).start()
    yield cluster
    assert cluster.stop() == 0, "".join(cluster.output)


def test_the_nodes_are_served_by_granian(redirect_cluster):
    response = call(redirect_cluster.address("shard-0"), "GET", "/healthz")
    assert response.status == 200
    assert response.headers.get("server") == "granian"


def test_an_address_in_use_is_refused_with_its_name(redirect_cluster, tmp_path):
    # Another data directory, so that only the address is shared with the running node.
    taken = redirect_cluster.address("shard-1")
    other = tmp_path / "sharding.toml"
    other.write_text(
        redirect_cluster.config.read_text().replace('data_dir = "data"', f'data_dir = "{tmp_path}"')
    )
    result = subprocess.run(
        [sys.executable, "-m", "distribkv", "serve", "--config", str(other), "--shard", "shard-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot serve on {taken} with granian: Address already in use" in result.stderr
    assert call(taken, "GET", "/healthz").status == 200


def test_sigterm_drains_in_flight_writes_and_nothing_acknowledged_is_lost(tmp_path, backend_name):
    path = granian_config(tmp_path, shards=1, backend=backend_name, hosts_from=200)
    address = path.read_text().split('address = "')[1].split('"')[0]
    node = NodeProcess(path, "shard-0").start(address)
    acknowledged: list[bytes] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        for i in range(5000):  # bounded; ends early when the node stops answering
            if stop.is_set():
                return
            key = f"drain-{worker}-{i}".encode()
            try:
                status = call(address, "PUT", f"/set?key={q(key)}", body=key, timeout=5).status
            except OSError:
                return
            if status == 200:
                acknowledged.append(key)
            elif status != 503:
                raise AssertionError(f"unexpected status {status}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 200, 30, message="200 writes acknowledged")
    assert node.stop() == 0
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    log = node.log_path.read_text()
    assert "stopped serving" in log, log[-2000:]

    node.start(address)
    try:
        missing = [
            key for key in acknowledged if call(address, "GET", f"/get?key={q(key)}").status != 200
        ]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    finally:
        assert node.stop() == 0
