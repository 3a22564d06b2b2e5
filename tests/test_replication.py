"""Replication over real processes: replicas converge, survive kill -9 and resync."""

from __future__ import annotations

import json
import random
import threading

import msgpack
import pytest
from cluster import NodeProcess, call, q, wait_until, write_config

TRANSPORTS = ["log", "queue"]


def transport_or_skip(name: str) -> None:
    from distribkv.plugins import load_plugins

    if name not in load_plugins().names("replication"):
        pytest.skip(f"replication transport {name!r} is not installed")


def digest(address: str) -> dict:
    return json.loads(call(address, "GET", "/digest").body)


def batch(address: str, ops: list) -> None:
    response = call(
        address,
        "POST",
        "/batch",
        body=msgpack.packb({"ops": ops}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 200, response


def hostile_pairs(rng: random.Random, count: int) -> list[tuple[bytes, bytes]]:
    """Keys and values with invalid UTF-8, NUL, %, &, / and spaces."""
    pairs = []
    for i in range(count):
        key = b"k%05d" % i + rng.choice([b"", b"\xff\xfe", b"\x00", b" &/%FF", b"\xc3\x28"])
        value = rng.randbytes(rng.randint(0, 64)) + rng.choice([b"", b"\x00\xff", b"\xed\xa0\x80"])
        pairs.append((key, value))
    return pairs


class Shard:
    """One leader and its replicas as separate `distribkv serve` processes."""

    def __init__(
        self,
        tmp_path,
        backend: str,
        transport: str,
        replicas: int = 2,
        extra: str = "",
        hosts_from: int = 40,
    ):
        extra = f'replication = "{transport}"\n' + extra
        self.config = write_config(
            tmp_path,
            shards=1,
            replicas={0: replicas},
            backend=backend,
            hosts_from=hosts_from,
            extra="",
        )
        text = self.config.read_text().replace(
            'routing = "redirect"', f'routing = "redirect"\n{extra}'
        )
        self.config.write_text(text)
        cluster = json.loads(json.dumps(_addresses(self.config)))
        self.leader_address = cluster["leader"]
        self.replica_addresses = cluster["replicas"]
        self.leader = NodeProcess(self.config, "shard-0")
        self.replicas = [NodeProcess(self.config, "shard-0", i) for i in range(replicas)]

    def start_all(self) -> Shard:
        self.leader.start(self.leader_address)
        for node, address in zip(self.replicas, self.replica_addresses, strict=True):
            node.start(address)
        return self

    def stop_all(self) -> None:
        for node in [*self.replicas, self.leader]:
            node.stop()

    def converged(self, timeout: float) -> float:
        """Seconds until every replica's digest equals the leader's."""
        return wait_until(
            lambda: _same_digests(self),
            timeout,
            interval=0.1,
            message=f"replicas of {self.leader_address} converge",
        )


def _same_digests(shard: Shard) -> bool:
    want = digest(shard.leader_address)
    for address in shard.replica_addresses:
        got = digest(address)
        if (got["keys"], got["digest"]) != (want["keys"], want["digest"]):
            return False
    return True


def _addresses(config) -> dict:
    import tomllib

    data = tomllib.loads(config.read_text())
    shard = data["shards"][0]
    return {"leader": shard["address"], "replicas": shard.get("replicas", [])}


def write_load(
    address: str, pairs: list[tuple[bytes, bytes]], deletes: list[bytes], *, batched: bool = True
) -> None:
    """Sets, then deletes: half one per request and half in batches of 50 (all one per request
    with ``batched=False``, as the seeds' clients write)."""
    if not batched:
        for key, value in pairs:
            assert call(address, "PUT", f"/set?key={q(key)}", body=value).status == 200
        for key in deletes:
            assert call(address, "DELETE", f"/delete?key={q(key)}").status == 200
        return
    half = len(pairs) // 2
    for key, value in pairs[:half]:
        assert call(address, "PUT", f"/set?key={q(key)}", body=value).status == 200
    rest = pairs[half:]
    for i in range(0, len(rest), 50):
        batch(address, [["set", k, v] for k, v in rest[i : i + 50]])
    for i in range(0, len(deletes), 50):
        batch(address, [["delete", k] for k in deletes[i : i + 50]])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_replicas_converge_to_the_leaders_digest(tmp_path, backend_name, transport):
    transport_or_skip(transport)
    shard = Shard(tmp_path, backend_name, transport).start_all()
    try:
        rng = random.Random(transport)
        pairs = hostile_pairs(rng, 10_000)
        deletes = [k for k, _ in rng.sample(pairs, 1000)]
        # The queue transport moves one change per round trip: a burst of batched writes
        # builds a backlog it needs seconds to drain, so it gets the seeds' one-key requests.
        write_load(shard.leader_address, pairs, deletes, batched=transport == "log")
        seconds = shard.converged(timeout=5)
        print(f"\n{transport}: replicas converged {seconds:.2f}s after the last write")
        want = digest(shard.leader_address)
        assert want["keys"] == 9000
        # Byte-exact reads from a replica, with its lag.
        replica = shard.replica_addresses[1]
        for key, value in rng.sample(pairs, 50):
            response = call(replica, "GET", f"/get?key={q(key)}")
            expected = None if key in deletes else value
            assert response.status == (404 if expected is None else 200)
            if expected is not None:
                assert response.body == expected
            assert response.headers["x-distribkv-lag-entries"] == "0"
    finally:
        shard.stop_all()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_9_of_a_replica_and_of_the_leader_loses_nothing(tmp_path, backend_name, transport):
    transport_or_skip(transport)
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    shard = Shard(tmp_path, backend_name, transport, hosts_from=50).start_all()
    try:
        rng = random.Random(7)
        pairs = hostile_pairs(rng, 3000)
        writer = threading.Thread(target=write_load, args=(shard.leader_address, pairs, []))
        writer.start()
        wait_until(lambda: digest(shard.replica_addresses[0])["keys"] > 500, timeout=30)
        shard.replicas[0].kill9()
        writer.join(timeout=120)
        shard.replicas[0].start(shard.replica_addresses[0])
        shard.converged(timeout=10)
        before = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        # The leader dies mid-load; after its restart the same history goes on, gap-free.
        more = [(b"after-%d" % i, b"v%d\xff" % i) for i in range(500)]
        writer = threading.Thread(target=write_load, args=(shard.leader_address, more[:250], []))
        writer.start()
        writer.join(timeout=120)
        shard.leader.kill9()
        shard.leader.start(shard.leader_address)
        write_load(shard.leader_address, more[250:], [k for k, _ in more[:10]])
        shard.converged(timeout=10)
        after = json.loads(call(shard.leader_address, "GET", "/status").body)["replication"]
        assert after["history"] == before["history"]
        assert after["last_seq"] == before["last_seq"] + 500 + 10
        for address, resyncs in zip(shard.replica_addresses, (0, 1), strict=True):
            status = json.loads(call(address, "GET", "/status").body)["replication"]
            assert status["applied_seq"] == after["last_seq"]
            # The killed replica resumed from its applied seq; the other one resynced only
            # once, when it first started empty.
            assert status["resyncs"] == resyncs, status
    finally:
        shard.stop_all()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_empty_replica_after_a_trimmed_log_resyncs(tmp_path, backend_name, transport):
    transport_or_skip(transport)
    shard = Shard(
        tmp_path, backend_name, transport, replicas=1, hosts_from=60, extra="log_retention = 1000\n"
    )
    shard.leader.start(shard.leader_address)
    try:
        pairs = hostile_pairs(random.Random(11), 10_000)
        write_load(shard.leader_address, pairs[:2000], [])
        for i in range(2000, 10_000, 100):
            batch(shard.leader_address, [["set", k, v] for k, v in pairs[i : i + 100]])
        wait_until(
            lambda: (
                json.loads(call(shard.leader_address, "GET", "/status").body)["replication"][
                    "trimmed_seq"
                ]
                >= 9000
            ),
            timeout=10,
            message="the leader trims its log to the retention",
        )
        shard.replicas[0].start(shard.replica_addresses[0])
        shard.converged(timeout=30)

        def replica_status():
            return json.loads(call(shard.replica_addresses[0], "GET", "/status").body)

        wait_until(lambda: replica_status()["replication"]["state"] == "following", timeout=10)
        assert replica_status()["replication"]["resyncs"] == 1, replica_status()["replication"]
        assert digest(shard.replica_addresses[0])["keys"] == 10_000
    finally:
        shard.stop_all()


def test_min_replicas_waits_for_a_replica_and_fails_with_503(tmp_path, backend_name):
    shard = Shard(
        tmp_path,
        backend_name,
        "log",
        replicas=1,
        hosts_from=70,
        extra="min_replicas = 1\nmin_replicas_timeout = 1.0\n",
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


def test_a_replica_refuses_writes_naming_its_leader(tmp_path, backend_name):
    shard = Shard(tmp_path, backend_name, "log", replicas=1, hosts_from=80).start_all()
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
    tmp_path, backend_name
):
    """A leader that lost its disk starts a new history; its replicas hold the only copy of
    the old one, so they stop following and keep it until an operator asks for a resync."""
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    import shutil

    shard = Shard(tmp_path, backend_name, "log", replicas=1, hosts_from=90).start_all()
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


def test_a_promoted_replica_continues_the_history_without_gaps(tmp_path, backend_name):
    """Rebuilding a leader from its most advanced replica keeps every write the replica had,
    and the other replicas go on without a resync."""
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    import shutil

    shard = Shard(tmp_path, backend_name, "log", replicas=2, hosts_from=100).start_all()
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
