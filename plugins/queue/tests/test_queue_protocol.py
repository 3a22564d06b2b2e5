"""The seeds' wire protocol on a leader, as a replica of the Go original would use it."""

from __future__ import annotations

import base64

import falcon.testing
import pytest

from distribkv.config import parse_config
from distribkv.http.app import create_app
from distribkv.node import Node
from distribkv.plugins import load_plugins

CONFIG = """
[cluster]
replication = "queue"
[storage]
backend = "memory"
[[shards]]
name = "s0"
idx = 0
address = "127.0.0.2:8080"
replicas = ["127.0.0.22:8080", "127.0.0.23:8080"]
"""


@pytest.fixture
def leader(tmp_path):
    path = tmp_path / "sharding.toml"
    path.write_text(CONFIG)
    node = Node(parse_config(CONFIG, path), "s0", registry=load_plugins(), environ={}).open()
    client = falcon.testing.TestClient(create_app(node))
    yield node, client
    node.close()


def next_key(client, replica=None):
    qs = f"replica={replica}" if replica else ""
    response = client.simulate_get("/next-replication-key", query_string=qs)
    assert response.status_code == 200
    return response.json


def ack(client, doc, replica=None, **override):
    params = {"key": base64.b64decode(doc["KeyB64"]), "value": base64.b64decode(doc["ValueB64"])}
    params.update(override)
    from urllib.parse import quote_from_bytes

    qs = "&".join(f"{k}={quote_from_bytes(v, safe='')}" for k, v in params.items())
    if replica:
        qs += f"&replica={replica}"
    return client.simulate_get("/delete-replication-key", query_string=qs)


def test_a_seed_replica_drains_the_queue_with_next_and_delete(leader):
    node, client = leader
    node.set(b"USA", b"Washington")
    node.set(b"Soviet", b"Moscow")
    first = next_key(client)
    assert (first["Key"], first["Value"], first["Err"]) == ("USA", "Washington", None)
    assert next_key(client)["Key"] == "USA"  # not acknowledged yet: the same change again
    assert ack(client, first).text == "ok"
    second = next_key(client)
    assert second["Key"] == "Soviet"
    wrong = ack(client, second, value=b"Leningrad")
    assert wrong.status_code == 417
    assert ack(client, second).text == "ok"
    assert next_key(client)["Key"] == ""  # nothing left


def test_each_replica_receives_every_change(leader):
    node, client = leader
    for i in range(3):
        node.set(b"k%d" % i, b"v%d" % i)
    for replica in ("replica-0", "replica-1"):
        seen = []
        for _ in range(3):
            doc = next_key(client, replica)
            seen.append(doc["Key"])
            assert ack(client, doc, replica).text == "ok"
        assert seen == ["k0", "k1", "k2"]


def test_deletes_and_binary_keys_and_values_replicate_exactly(leader):
    node, client = leader
    node.set(b"\xff\x00key", b"\x00\xfe value")
    node.delete(b"\xff\x00key")
    doc = next_key(client)
    assert base64.b64decode(doc["KeyB64"]) == b"\xff\x00key"
    assert base64.b64decode(doc["ValueB64"]) == b"\x00\xfe value"
    assert doc["Op"] == "set"
    assert ack(client, doc).text == "ok"
    doc = next_key(client)
    assert doc["Op"] == "delete" and base64.b64decode(doc["KeyB64"]) == b"\xff\x00key"


def test_a_key_overwritten_while_in_flight_is_not_lost(leader):
    node, client = leader
    node.set(b"k", b"old")
    doc = next_key(client)
    node.set(b"k", b"new")  # overwritten before the replica acknowledged "old"
    assert ack(client, doc).text == "ok"
    doc = next_key(client)
    assert (doc["Key"], doc["Value"]) == ("k", "new")
