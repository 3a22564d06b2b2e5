"""A leader's log as its parts work together (committer, records, replica progress), and the
loops of both roles that keep going whatever goes wrong."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from distribkv.plugins import load_plugins
from distribkv.replication.follower import (
    Follower,
    LeaderSource,
    LeaderUnavailable,
    Pulled,
    apply_entries,
)
from distribkv.replication.leader import LeaderLog, LeaderRole
from distribkv.replication.records import FOLLOWS, LAST_SEQ, entry_check, seq_key
from distribkv.storage.api import Delete, Namespace, Put
from distribkv.storage.store import open_store

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META
WAIT = 10.0


@pytest.fixture
def store(tmp_path):
    store = open_store(load_plugins().storage_backend("memory"), tmp_path)
    yield store
    store.close()


def put(key: bytes, value: bytes) -> Put:
    return Put(DATA, key, value)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_applying_a_batch_twice_changes_nothing_and_gaps_are_refused(store, tmp_path):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    for i in range(5):
        leader.committer.write([put(b"k%d" % i, b"v")])
    entries = leader.log.entries_after(0, max_entries=10, max_bytes=1 << 20)
    replica = open_store(load_plugins().storage_backend("memory"), tmp_path / "r")
    assert apply_entries(replica, entries[:3], 0, sync=False) == 3
    assert apply_entries(replica, entries, 3, sync=False) == 5
    assert apply_entries(replica, entries, 5, sync=False) == 5
    with pytest.raises(ValueError, match="gap"):
        apply_entries(replica, entries[4:], 2, sync=False)
    replica.close()


def test_trimming_keeps_what_the_slowest_replica_and_a_resync_need(store):
    leader = LeaderLog(store, sync=False, replicas=["r0", "r1"], retention=50)
    for i in range(40):
        leader.committer.write([put(b"k%d" % i, b"v")])
    assert leader.trim() == 0  # no replica has reported yet, and 40 entries are under the cap
    leader.progress.resyncing("r1", 20)  # r1 reloads a snapshot taken at seq 20
    for i in range(40, 100):
        leader.committer.write([put(b"k%d" % i, b"v")])
    leader.progress.acknowledge("r0", 90)
    leader.trim()
    assert leader.log.trimmed == 20  # the resync's floor wins over the retention cap
    leader.progress.acknowledge("r1", 60)
    leader.trim()
    assert leader.log.trimmed == 60
    leader.progress.acknowledge("r1", 95)
    leader.trim()
    assert leader.log.trimmed == 90


def test_a_leader_that_reused_sequence_numbers_is_detected(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    for i in range(100):
        leader.committer.write([put(b"k%d" % i, b"v%d" % i)])
    raw = leader.log.entries_after(99, max_entries=1, max_bytes=1 << 20)[0]
    replica_check = str(entry_check(*raw[1:])).encode()
    assert leader.divergence(leader.history, 100, replica_check) is None
    # The leader loses its last 10 entries (same history), then takes other writes.
    store.apply(
        [Delete(LOG, seq_key(s)) for s in range(91, 101)] + [Put(META, LAST_SEQ, seq_key(90))],
        sync=False,
    )
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    assert "lost entries" in leader.divergence(leader.history, 100, replica_check)
    for i in range(15):
        leader.committer.write([put(b"other%d" % i, b"x")])
    assert "reused sequence numbers" in leader.divergence(leader.history, 100, replica_check)
    assert "history" in leader.divergence("someotherhistory", 100, replica_check)


class Flaky(LeaderSource):
    """A leader whose first answer is malformed (a field missing: the transport's KeyError),
    then a good one; the second pull waits until the test has looked at the replica's status."""

    def __init__(self):
        self.pulls = 0
        self.looked = threading.Event()

    def pull(self, after, history, wait, check):
        self.pulls += 1
        if self.pulls == 1:
            return Pulled(
                **{"history": "h", "last_seq": 1, "last_ms": {}["last_ms"], "entries": []}
            )
        if self.pulls == 2:
            self.looked.wait(WAIT)
            return Pulled("h", 1, 0, [(1, 1, b"k", b"v", 0)])
        time.sleep(0.01)
        return Pulled("h", 1, 0, [])

    def snapshot_page(self, after_key):
        raise AssertionError("no resync expected")


def test_an_unexpected_error_in_the_follower_is_shown_and_retried_never_ending_it(store):
    store.put(FOLLOWS, b"h", ns=META, sync=False)  # it follows history "h" already
    node = SimpleNamespace(store=store, sync=False, name="s0/replica-0")
    source = Flaky()
    follower = Follower(node, source, wait=0.01)
    follower.start()
    try:
        wait_until(lambda: follower.status()["state"] == "retrying", "the error was not shown")
        assert follower.status()["last_error"].startswith("KeyError")
        source.looked.set()
        wait_until(lambda: store.get(b"k") == b"v", "the follower did not go on")
        wait_until(lambda: follower.status()["state"] == "following", "no recovery shown")
        assert follower.status()["last_error"] is None
    finally:
        follower.stop(WAIT)


def test_a_leader_that_cannot_be_reached_is_retried_with_backoff(store):
    store.put(FOLLOWS, b"h", ns=META, sync=False)

    class Down(LeaderSource):
        pulls = 0

        def pull(self, after, history, wait, check):
            self.pulls += 1
            raise LeaderUnavailable("leader 127.0.0.1:1: connection refused")

        def snapshot_page(self, after_key):
            raise AssertionError("no resync expected")

    source = Down()
    follower = Follower(SimpleNamespace(store=store, sync=False, name="r"), source, wait=0.01)
    follower.start()
    try:
        wait_until(lambda: source.pulls >= 3, "the leader was not retried")
        assert follower.status()["state"] == "retrying"
        assert "connection refused" in follower.status()["last_error"]
    finally:
        follower.stop(WAIT)
    assert source.pulls < 40  # backoff: not a busy loop (50 ms doubling, in ~0.5 s)


def test_the_trimmer_survives_a_failed_trim_and_shows_it(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    for i in range(5):
        leader.committer.write([put(b"k%d" % i, b"v")])
    calls = []
    real_trim = leader.trim

    def trim():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an unexpected failure")
        return real_trim()

    leader.trim = trim
    node = SimpleNamespace(leader_log=leader, name="s0/leader")
    role = LeaderRole(node, interval=0.01)
    role.start()
    try:
        wait_until(lambda: role.status()["trim_error"] is not None or len(calls) > 1, "no trim")
        wait_until(lambda: leader.log.trimmed == 5, "the trimmer did not go on")
        assert role.status()["trim_error"] is None
    finally:
        role.stop(WAIT)
