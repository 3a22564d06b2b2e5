"""The replication-transport conformance suite: every transport must pass all of it.

Import it into a test module of the transport's distribution and name the transport::

    # tests/test_conformance.py
    from distribkv.testing.replication_suite import *  # noqa: F403

    pytest -p distribkv.testing --distribkv-transport=mytransport --distribkv-backend=lmdb tests/

(or define a ``transport_name`` fixture in that module, see :mod:`distribkv.testing`). The
transport must be installed: the suite runs a shard's leader and replicas as `distribkv serve`
processes, which find it by name, on the backend under test.

It checks that replicas converge to the leader's ``/digest`` after thousands of writes and
deletes whose keys and values hold bytes that break careless encodings (invalid UTF-8, NUL,
``%FF``, ``&``, ``/``, spaces); that reads from a replica are byte-exact; that a replica and
then the leader killed with SIGKILL lose nothing and go on with the same history, without a
gap; and that an empty replica that asks for history the leader has trimmed resyncs. It reads
the ``replication`` section of ``/status`` (``history``, ``last_seq``, ``trimmed_seq``,
``applied_seq``, ``resyncs``, ``state``), which a transport built on the core's leader log and
follower (:mod:`distribkv.replication`) reports.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import msgpack
import pytest

from distribkv.testing.cluster import (
    Connection,
    HostRange,
    NodeProcess,
    call,
    node_addresses,
    q,
    stop_all,
    wait_until,
    write_config,
)

__all__ = [
    "batched_writes",
    "convergence_timeout",
    "test_a_replica_and_then_the_leader_killed_with_sigkill_lose_nothing",
    "test_an_empty_replica_after_a_trimmed_log_resyncs",
    "test_replicas_converge_to_the_leaders_digest_byte_exactly",
]


def digest(address: str) -> dict:
    """The node's ``/digest``: its key count and a digest of every key and value."""
    return json.loads(call(address, "GET", "/digest").body)


def replication_status(address: str) -> dict:
    return json.loads(call(address, "GET", "/status").body)["replication"]


def batch(address: str, ops: list, connection: Connection | None = None) -> None:
    """One msgpack ``/batch`` request, which must succeed."""
    send = connection.call if connection is not None else lambda *a, **k: call(address, *a, **k)
    response = send(
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
        directory: Path,
        hosts: HostRange,
        backend: str,
        transport: str,
        replicas: int = 2,
        cluster_extra: str = "",
    ):
        self.config = write_config(
            directory,
            hosts=hosts,
            shards=1,
            replicas={0: replicas},
            backend=backend,
            replication=transport,
            cluster_extra=cluster_extra,
        )
        addresses = node_addresses(self.config)
        self.leader_address = addresses["shard-0/leader"]
        self.replica_addresses = [addresses[f"shard-0/replica-{i}"] for i in range(replicas)]
        self.leader = NodeProcess(self.config, "shard-0")
        self.replicas = [NodeProcess(self.config, "shard-0", i) for i in range(replicas)]

    def start_all(self) -> Shard:
        self.leader.start(self.leader_address)
        for node, address in zip(self.replicas, self.replica_addresses, strict=True):
            node.start(address)
        return self

    def stop_all(self) -> None:
        stop_all([*self.replicas, self.leader])

    def converged(self, timeout: float) -> float:
        """Seconds until every replica's digest equals the leader's."""
        return wait_until(
            self.same_digests,
            timeout,
            interval=0.1,
            message=f"replicas of {self.leader_address} converge",
        )

    def caught_up(self, stall: float, limit: float = 300.0) -> float:
        """Seconds until every replica's digest equals the leader's, waiting as long as the
        replicas make progress: fails once none applied anything new for ``stall`` seconds
        (or after ``limit``). How fast a backlog drains depends on what else the machine runs;
        a replica that stops is caught either way."""
        started = time.monotonic()
        last, moved = self.progress(), started
        while not self.same_digests():
            now = time.monotonic()
            assert now - started < limit, f"replicas of {self.leader_address}: over {limit}s"
            current = self.progress()
            if current != last:
                last, moved = current, now
            assert now - moved < stall, (
                f"replicas of {self.leader_address} made no progress for {stall}s: {current}"
            )
            time.sleep(0.1)
        return time.monotonic() - started

    def progress(self) -> list[tuple[int, int]]:
        """Each replica's applied seq and key count."""
        return [
            (replication_status(address)["applied_seq"], digest(address)["keys"])
            for address in self.replica_addresses
        ]

    def same_digests(self) -> bool:
        want = digest(self.leader_address)
        for address in self.replica_addresses:
            got = digest(address)
            if (got["keys"], got["digest"]) != (want["keys"], want["digest"]):
                return False
        return True


def write_load(
    address: str,
    pairs: Iterable[tuple[bytes, bytes]],
    deletes: Iterable[bytes],
    *,
    batched: bool = True,
) -> None:
    """Sets, then deletes, on one keep-alive connection: half of the sets one per request and
    half in batches of 50, deletes in batches of 50 (all one per request with ``batched=False``,
    as the seeds' clients write)."""
    pairs, deletes = list(pairs), list(deletes)
    with Connection(address) as connection:
        single = pairs if not batched else pairs[: len(pairs) // 2]
        for key, value in single:
            assert connection.call("PUT", f"/set?key={q(key)}", body=value).status == 200
        if not batched:
            for key in deletes:
                assert connection.call("DELETE", f"/delete?key={q(key)}").status == 200
            return
        rest = pairs[len(single) :]
        for i in range(0, len(rest), 50):
            batch(address, [["set", k, v] for k, v in rest[i : i + 50]], connection)
        for i in range(0, len(deletes), 50):
            batch(address, [["delete", k] for k in deletes[i : i + 50]], connection)


@pytest.fixture(scope="session")
def convergence_timeout() -> float:
    """Seconds from the last acknowledged write until every replica matches the leader (what
    the built-in transports keep to on two cores); a transport's test module may say more."""
    return 5.0


@pytest.fixture(scope="session")
def batched_writes() -> bool:
    """Whether the convergence test writes half of its keys and its deletes in batches of 50.
    A transport that moves one change per round trip (as the seeds' queue does) can ask for
    one write per request instead: a burst of batches builds a backlog it takes seconds to
    drain."""
    return True


def needs_persistence(backend_spec, backend_name: str) -> None:
    if not backend_spec.capabilities.persistent:
        pytest.skip(f"backend {backend_name!r} keeps nothing across a restart")


#: Keys the convergence test writes (a tenth of them deleted after).
CONVERGENCE_KEYS = 4_000


# How soon replicas match after the last write is a measure of the transport, which other
# processes that keep the cores busy (parallel test workers) would distort: run apart.
@pytest.mark.serial
def test_replicas_converge_to_the_leaders_digest_byte_exactly(
    tmp_path, hosts, backend_name, transport_name, batched_writes, convergence_timeout
):
    shard = Shard(tmp_path, hosts, backend_name, transport_name).start_all()
    try:
        rng = random.Random(transport_name)
        # Sequential writes to a leader with two replicas take milliseconds each on two
        # cores (the replicas' long-polls and applies share them): 4,000 keys keep the test
        # near 20 s for a transport that moves one write per round trip.
        pairs = hostile_pairs(rng, CONVERGENCE_KEYS)
        deletes = [k for k, _ in rng.sample(pairs, CONVERGENCE_KEYS // 10)]
        write_load(shard.leader_address, pairs, deletes, batched=batched_writes)
        seconds = shard.converged(timeout=convergence_timeout)
        print(f"\n{transport_name}: replicas converged {seconds:.2f}s after the last write")
        want = digest(shard.leader_address)
        assert want["keys"] == len(pairs) - len(deletes)
        # Byte-exact reads from a replica, with its lag.
        replica = shard.replica_addresses[1]
        deleted = set(deletes)
        for key, value in rng.sample(pairs, 50):
            response = call(replica, "GET", f"/get?key={q(key)}")
            expected = None if key in deleted else value
            assert response.status == (404 if expected is None else 200)
            if expected is not None:
                assert response.body == expected
            assert response.headers["x-distribkv-lag-entries"] == "0"
    finally:
        shard.stop_all()


def test_a_replica_and_then_the_leader_killed_with_sigkill_lose_nothing(
    tmp_path, hosts, backend_name, backend_spec, transport_name
):
    needs_persistence(backend_spec, backend_name)
    shard = Shard(tmp_path, hosts, backend_name, transport_name).start_all()
    try:
        rng = random.Random(7)
        pairs = hostile_pairs(rng, 3000)
        writer = threading.Thread(target=write_load, args=(shard.leader_address, pairs, []))
        writer.start()
        wait_until(lambda: digest(shard.replica_addresses[0])["keys"] > 500, timeout=30)
        shard.replicas[0].kill9()
        writer.join(timeout=120)
        shard.replicas[0].start(shard.replica_addresses[0])
        shard.caught_up(stall=10)
        before = replication_status(shard.leader_address)
        # The leader dies after a load; after its restart the same history goes on, gap-free.
        more = [(b"after-%d" % i, b"v%d\xff" % i) for i in range(500)]
        write_load(shard.leader_address, more[:250], [])
        shard.leader.kill9()
        shard.leader.start(shard.leader_address)
        write_load(shard.leader_address, more[250:], [k for k, _ in more[:10]])
        shard.caught_up(stall=10)
        after = replication_status(shard.leader_address)
        assert after["history"] == before["history"]
        assert after["last_seq"] == before["last_seq"] + 500 + 10
        for address, resyncs in zip(shard.replica_addresses, (0, 1), strict=True):
            # A replica counts an entry as applied just after its data lands.
            def applied(address: str = address) -> bool:
                return bool(replication_status(address)["applied_seq"] == after["last_seq"])

            wait_until(
                applied,
                timeout=10,
                message=f"{address} applied seq {after['last_seq']}",
            )
            status = replication_status(address)
            # The killed replica resumed from its applied seq; the other one resynced only
            # once, when it first started empty.
            assert status["resyncs"] == resyncs, status
    finally:
        shard.stop_all()


def test_an_empty_replica_after_a_trimmed_log_resyncs(
    tmp_path, hosts, backend_name, transport_name
):
    shard = Shard(
        tmp_path,
        hosts,
        backend_name,
        transport_name,
        replicas=1,
        cluster_extra="log_retention = 1000",
    )
    shard.leader.start(shard.leader_address)
    try:
        pairs = hostile_pairs(random.Random(11), 10_000)
        write_load(shard.leader_address, pairs[:2000], [])
        with Connection(shard.leader_address) as connection:
            for i in range(2000, 10_000, 100):
                batch(
                    shard.leader_address,
                    [["set", k, v] for k, v in pairs[i : i + 100]],
                    connection,
                )
        wait_until(
            lambda: replication_status(shard.leader_address)["trimmed_seq"] >= 9000,
            timeout=10,
            message="the leader trims its log to the retention",
        )
        shard.replicas[0].start(shard.replica_addresses[0])
        shard.caught_up(stall=30)
        replica = shard.replica_addresses[0]
        wait_until(lambda: replication_status(replica)["state"] == "following", timeout=10)
        assert replication_status(replica)["resyncs"] == 1, replication_status(replica)
        assert digest(replica)["keys"] == 10_000
    finally:
        shard.stop_all()
