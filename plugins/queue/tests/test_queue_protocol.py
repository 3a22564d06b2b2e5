"""The seeds' wire protocol on a leader, as a replica of the Go original would use it."""

from __future__ import annotations

import base64
import logging
from urllib.parse import urlencode

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


def next_key(client, replica=None, *, binary=False):
    qs = f"replica={replica}" if replica else ""
    if binary:  # reads KeyB64 and ValueB64, so bytes that are not UTF-8 are no trouble
        qs += "&binary=1" if qs else "binary=1"
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
    doc = next_key(client, binary=True)
    assert base64.b64decode(doc["KeyB64"]) == b"\xff\x00key"
    assert base64.b64decode(doc["ValueB64"]) == b"\x00\xfe value"
    assert doc["Op"] == "set"
    assert ack(client, doc).text == "ok"
    doc = next_key(client, binary=True)
    assert doc["Op"] == "delete" and base64.b64decode(doc["KeyB64"]) == b"\xff\x00key"


def test_a_key_overwritten_while_in_flight_is_not_lost(leader):
    node, client = leader
    node.set(b"k", b"old")
    doc = next_key(client)
    node.set(b"k", b"new")  # overwritten before the replica acknowledged "old"
    assert ack(client, doc).text == "ok"
    doc = next_key(client)
    assert (doc["Key"], doc["Value"]) == ("k", "new")


def seed_replica_rounds(client, replica: str, rounds: int) -> dict[str, int]:
    """A stand-in for a replica of the Go seeds: it reads Key and Value as JSON text (bytes
    that are not UTF-8 arrive as U+FFFD, as Go's encoding/json makes them), acknowledges what
    it read, and counts what it did; an empty Key is where it would sleep."""
    counts = {"changes": 0, "refused": 0, "empty": 0}
    for _ in range(rounds):
        doc = client.simulate_get("/next-replication-key", query_string=f"replica={replica}").json
        if not doc["Key"]:
            counts["empty"] += 1
            continue
        query = urlencode({"key": doc["Key"], "value": doc["Value"], "replica": replica})
        answer = client.simulate_get("/delete-replication-key", query_string=query)
        counts["changes" if answer.status_code == 200 else "refused"] += 1
    return counts


def test_a_seed_replica_is_blocked_calmly_at_a_change_it_cannot_represent(leader, caplog):
    node, client = leader
    node.set(b"ok", b"fine")
    node.set(b"bad", b"\xff\xfe not utf-8")
    node.set(b"later", b"v")
    caplog.set_level(logging.ERROR)
    counts = seed_replica_rounds(client, "seed", 50)
    # It took the first change, then met the one it cannot store: no acknowledgement of a
    # mangled value is ever attempted, and it is told the queue is empty, 49 times in a row.
    assert counts == {"changes": 1, "refused": 0, "empty": 49}
    from distribkv_queue import QueueLeaderRole

    blocked = QueueLeaderRole(node).status()["blocked"]  # what /status shows under replication
    assert blocked["seed"]["seq"] == 2 and "UTF-8" in blocked["seed"]["reason"]
    assert sum("blocked at seq 2" in r.getMessage() for r in caplog.records) == 1
    # A binary-safe replica (it names its history) is not held up.
    history = node.leader_log.history
    seen = []
    for after in range(3):
        qs = f"replica=replica-0&after={after}&history={history}"
        doc = client.simulate_get("/next-replication-key", query_string=qs).json
        seen.append(base64.b64decode(doc["ValueB64"]))
    assert seen == [b"fine", b"\xff\xfe not utf-8", b"v"]
