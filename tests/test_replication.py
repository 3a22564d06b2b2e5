"""Replication over real processes with the core's ``log`` transport, beyond the transport
conformance suite (distribkv.testing.replication_suite, which core/tests and plugins/queue/tests
run on both transports): min_replicas, replicas that refuse writes, a leader back with an empty
disk, and a replica promoted to leader."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from distribkv.testing.cluster import call, wait_until
from distribkv.testing.replication_suite import Shard, batch, digest


def test_min_replicas_waits_for_a_replica_and_fails_with_503(tmp_path, hosts, backend_name):
    shard = Shard(
        tmp_path,
        hosts,
        backend_name,
        "log",
        replicas=1,
        cluster_extra="min_replicas = 1\nmin_replicas_timeout = 1.0",
    ).start_all()
    try:
        assert call(shard.leader_address, "PUT", "/set?key=a", body=b"1").status == 200
        # Acknowledged with min_replicas = 1: the replica has it already.
        assert call(shard.replica_addresses[0], "GET", "/get?key=a").body == b"1"
        shard.replicas[0].stop()
        response = call(shard.leader_address, "PUT", "/set?key=b", body=b"2")
        assert response.status == 503
        body = json.loads(response.body)
        assert body["error"] == "not replicated" and "may not be replicated" in body["detail"]
        # The write stays on the leader and reaches the replica when it is back.
        assert call(shard.leader_address, "GET", "/get?key=b").body == b"2"
        shard.replicas[0].start(shard.replica_addresses[0])
        shard.converged(timeout=10)
    finally:
        shard.stop_all()


def test_a_replica_refuses_writes_naming_its_leader(tmp_path, hosts, backend_name):
    shard = Shard(tmp_path, hosts, backend_name, "log", replicas=1).start_all()
    try:
        response = call(shard.replica_addresses[0], "PUT", "/set?key=x", body=b"v")
        assert response.status == 307
        assert response.headers["location"] == f"http://{shard.leader_address}/set?key=x"
        refused = json.loads(response.body)
        assert refused["error"] == "not the leader"
        assert "is a replica" in refused["detail"] and shard.leader_address in refused["detail"]
        leader_read = call(
            shard.replica_addresses[0], "GET", "/get?key=x", headers={"X-Distribkv-Read": "leader"}
        )
        assert leader_read.status == 307
        assert json.loads(leader_read.body)["error"] == "not the leader"
    finally:
        shard.stop_all()


def test_replicas_keep_their_data_when_the_leader_comes_back_with_an_empty_disk(
    tmp_path, hosts, backend_name
):
    """A leader that lost its disk starts a new history; its replicas hold the only copy of
    the old one, so they stop following and keep it until an operator asks for a resync."""
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    shard = Shard(tmp_path, hosts, backend_name, "log", replicas=1).start_all()
    replica = shard.replica_addresses[0]
    try:
        for i in range(0, 200, 50):
            batch(shard.leader_address, [["set", b"old-%d" % j, b"v"] for j in range(i, i + 50)])
        shard.converged(timeout=10)
        first = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        shard.leader.stop()
        shutil.rmtree(tmp_path / "data" / "shard-0" / "leader")
        shard.leader.start(shard.leader_address)
        batch(shard.leader_address, [["set", b"new-%d" % j, b"w"] for j in range(10)])
        second = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        assert second["history"] != first["history"] and second["last_seq"] == 10

        def replica_state():
            return json.loads(call(replica, "GET", "/status").body)["replication"]

        wait_until(lambda: replica_state()["state"] == "diverged", timeout=10)
        assert "history" in replica_state()["diverged"]
        assert digest(replica)["keys"] == 200
        assert call(replica, "GET", "/get?key=old-7").body == b"v"
        # The operator chooses the new history for this replica.
        assert call(replica, "POST", "/replication/resync").status == 202
        # The resync records the history it follows after its last page: the data can match
        # the leader's a moment before.
        wait_until(lambda: replica_state()["follows_history"] == second["history"], timeout=10)
        shard.converged(timeout=10)
        assert digest(replica)["keys"] == 10
    finally:
        shard.stop_all()


def test_a_promoted_replica_continues_the_history_without_gaps(tmp_path, hosts, backend_name):
    """Rebuilding a leader from its most advanced replica keeps every write the replica had,
    and the other replicas go on without a resync."""
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    shard = Shard(tmp_path, hosts, backend_name, "log", replicas=2).start_all()
    try:
        for i in range(0, 200, 50):
            batch(shard.leader_address, [["set", b"k-%d" % j, b"v"] for j in range(i, i + 50)])
        shard.converged(timeout=10)
        before = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        shard.stop_all()
        data = tmp_path / "data" / "shard-0"
        shutil.rmtree(data / "leader")
        shutil.copytree(data / "replica-0", data / "leader")
        shard.start_all()
        batch(shard.leader_address, [["set", b"after-%d" % j, b"w"] for j in range(10)])
        shard.converged(timeout=10)
        after = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        assert after["history"] == before["history"]
        assert after["last_seq"] == before["last_seq"] + 10
        assert digest(shard.leader_address)["keys"] == 210
        for address in shard.replica_addresses:

            def status(address=address):
                return json.loads(call(address, "GET", "/status").body)["replication"]

            # A replica counts an entry as applied just after its data lands.
            wait_until(lambda: status()["applied_seq"] == after["last_seq"], timeout=10)
            assert status()["resyncs"] == 0
    finally:
        shard.stop_all()


def test_a_leader_stops_at_once_while_its_replicas_poll(tmp_path, hosts, backend_name):
    """A replica waits for new entries in a long-poll (2 s) and polls again as soon as it has
    its answer: a stopping leader answers the polls at once (503 to the later ones) instead
    of draining behind them."""
    shard = Shard(tmp_path, hosts, backend_name, "log", replicas=2).start_all()
    try:
        batch(shard.leader_address, [["set", b"k%d" % i, b"v"] for i in range(10)])
        shard.converged(timeout=10)
        started = time.monotonic()
        assert shard.leader.stop() == 0
        seconds = time.monotonic() - started
        print(f"a leader with 2 replicas polling stopped in {seconds:.2f}s")
        assert seconds < 1.5, f"the leader took {seconds:.1f}s to stop"
        log = shard.leader.log_path.read_text()
        assert "requests still running" not in log, log[-2000:]
    finally:
        shard.stop_all()
