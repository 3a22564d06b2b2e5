"""The Python client against real clusters: client-side routing, batches, map changes."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from cluster import Cluster, write_config

from distribkv.client import Client, RequestError, Unavailable


@pytest.fixture(scope="module")
def ring_cluster(tmp_path_factory, backend_name):
    path = write_config(
        tmp_path_factory.mktemp("client"),
        shards=3,
        replicas={0: 1},
        backend=backend_name,
        hashing="ring",
        hosts_from=110,
        extra="max_value_size = 1000",
    )
    cluster = Cluster(path).start()
    yield cluster
    assert cluster.stop() == 0


def test_with_a_current_map_no_request_needs_a_redirect(ring_cluster):
    rng = random.Random(5)
    pairs = {b"key-%d\xff\x00" % i: rng.randbytes(rng.randint(0, 200)) for i in range(300)}
    with Client([ring_cluster.address("shard-2")]) as client:
        items = list(pairs.items())
        for key, value in items[:100]:
            client.set(key, value)
        client.set_many(dict(items[100:]))
        assert {k: client.get(k) for k in list(pairs)[:50]} == dict(items[:50])
        assert client.get_many(pairs) == pairs
        client.delete(items[0][0])
        client.delete_many([k for k, _ in items[1:10]])
        assert client.get_many([k for k, _ in items[:12]]) == {
            **{k: None for k, _ in items[:10]},
            **dict(items[10:12]),
        }
        assert client.get(b"never written") is None
        assert client.redirects == 0


def test_errors_are_typed(ring_cluster):
    with Client([ring_cluster.address("shard-0")]) as client:
        with pytest.raises(RequestError) as info:
            client.set(b"big", b"x" * 1001)
        assert info.value.status == 413
    with pytest.raises(Unavailable):
        Client(["127.0.0.1:1"], timeout=1)


def test_reads_from_replicas_are_served_by_replicas(ring_cluster):
    with Client([ring_cluster.address("shard-1")], read_from_replicas=True) as client:
        keys = [b"r-%d" % i for i in range(60)]
        client.set_many({k: k for k in keys})
        # Replicas may lag a moment: every read eventually sees the write.
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and client.get_many(keys) != {k: k for k in keys}:
            time.sleep(0.05)
        assert client.get_many(keys) == {k: k for k in keys}


def test_after_the_map_changes_the_client_recovers_unnoticed(tmp_path, backend_name):
    three = write_config(
        tmp_path, shards=3, backend=backend_name, hosts_from=120, file_name="three.toml"
    )
    text = three.read_text()
    two = tmp_path / "two.toml"
    two.write_text(text[: text.index('[[shards]]\nname = "shard-2"')])
    with Cluster(two) as cluster:
        client = Client([cluster.address("shard-0")])
        client.set_many({b"before-%d" % i: b"v" for i in range(50)})
        assert client.map.fingerprint
        old = client.map.fingerprint
    with Cluster(three):
        # The caller notices nothing: the first request meets the new map, the client fetches
        # it and retries.
        for i in range(50):
            client.set(b"after-%d" % i, b"w%d" % i)
        assert client.get_many([b"after-%d" % i for i in range(50)]) == {
            b"after-%d" % i: b"w%d" % i for i in range(50)
        }
        assert client.map.fingerprint != old
        assert len(client.map.shards) == 3
        client.close()


def test_the_command_line_uses_the_client(ring_cluster):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "distribkv", *args], capture_output=True, timeout=60
        )

    node_a, node_b = ring_cluster.address("shard-0"), ring_cluster.address("shard-2")
    assert run("set", "cli key", "cli value", "--node", node_a).returncode == 0
    result = run("get", "cli key", "--node", node_b)
    assert (result.returncode, result.stdout) == (0, b"cli value")
    assert run("delete", "cli key", "--node", node_b).returncode == 0
    missing = run("get", "cli key", "--node", node_a)
    assert missing.returncode == 1 and b"is not set" in missing.stderr
    assert run("set", "00ff", "0001", "--hex", "--node", node_a).returncode == 0
    assert run("get", "00ff", "--hex", "--node", node_b).stdout == b"\x00\x01"
    # Arguments that are not UTF-8 are taken as the exact bytes given.
    assert run("set", b"raw \xff key", b"raw \xfe value", "--node", node_a).returncode == 0
    assert run("get", b"raw \xff key", "--node", node_b).stdout == b"raw \xfe value"
