"""A replica's side: applying entries in order, and a follower loop that never ends on an
error (it shows it, and tries again with backoff)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from distribkv.plugins import load_plugins
from distribkv.replication.follower import Follower, LeaderSource, LeaderUnavailable, Pulled
from distribkv.replication.follower import apply_entries as apply
from distribkv.replication.leader import LeaderLog
from distribkv.replication.records import FOLLOWS
from distribkv.storage.api import Namespace, Put
from distribkv.storage.store import open_store

META = Namespace.META
WAIT = 10.0


def test_applying_a_batch_twice_changes_nothing_and_gaps_are_refused(store, tmp_path):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    for i in range(5):
        leader.committer.write([Put(Namespace.DATA, b"k%d" % i, b"v")])
    entries = leader.log.entries_after(0, max_entries=10, max_bytes=1 << 20)
    replica = open_store(load_plugins().storage_backend("memory"), tmp_path / "r")
    assert apply(replica, entries[:3], 0, sync=False) == 3
    assert apply(replica, entries, 3, sync=False) == 5
    assert apply(replica, entries, 5, sync=False) == 5
    with pytest.raises(ValueError, match="gap"):
        apply(replica, entries[4:], 2, sync=False)
    replica.close()


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


def test_an_unexpected_error_in_the_follower_is_shown_and_retried_never_ending_it(store, until):
    store.put(FOLLOWS, b"h", ns=META, sync=False)  # it follows history "h" already
    node = SimpleNamespace(store=store, sync=False, name="s0/replica-0")
    source = Flaky()
    follower = Follower(node, source, wait=0.01)
    follower.start()
    try:
        until(lambda: follower.status()["state"] == "retrying", "the error was not shown")
        assert follower.status()["last_error"].startswith("KeyError")
        source.looked.set()
        until(lambda: store.get(b"k") == b"v", "the follower did not go on")
        until(lambda: follower.status()["state"] == "following", "no recovery shown")
        assert follower.status()["last_error"] is None
    finally:
        follower.stop(WAIT)


def test_a_leader_that_cannot_be_reached_is_retried_with_backoff(store, until):
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
        until(lambda: source.pulls >= 3, "the leader was not retried")
        assert follower.status()["state"] == "retrying"
        assert "connection refused" in follower.status()["last_error"]
    finally:
        follower.stop(WAIT)
    assert source.pulls < 40  # backoff: not a busy loop (50 ms doubling, in ~0.5 s)


def test_a_resync_shows_its_progress_while_it_runs_and_after(store, tmp_path, until, caplog):
    """A new replica reloads the leader's data page by page; ``status()["resync"]`` counts
    the keys and bytes copied against the leader's total while it runs, and keeps the last
    resync's figures once it is done. Its start and its end are logged once each."""
    from distribkv.replication.snapshot import snapshot_page

    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    for i in range(25):
        leader.committer.write([Put(Namespace.DATA, b"key-%02d" % i, b"v" * 10)])

    class Paged(LeaderSource):
        """The leader's snapshot in pages of 10 keys; the second page waits for the test."""

        def __init__(self):
            self.pages = 0
            self.looked = threading.Event()

        def pull(self, after, history, wait, check):
            time.sleep(0.01)
            return Pulled(leader.history, 25, 0, [])

        def snapshot_page(self, after_key):
            self.pages += 1
            if self.pages == 2:
                self.looked.wait(WAIT)
            return snapshot_page(leader, after_key, limit=10, max_bytes=1 << 20)

    replica = open_store(load_plugins().storage_backend("memory"), tmp_path / "r")
    source = Paged()
    follower = Follower(SimpleNamespace(store=replica, sync=False, name="r"), source, wait=0.01)
    with caplog.at_level("INFO", logger="distribkv.replication.follower"):
        follower.start()
        try:
            until(lambda: source.pages == 2, "the second page was not asked for")
            running = follower.status()
            assert running["state"] == "resyncing" and not running["readable"]
            progress = running["resync"]
            assert progress["active"] and progress["outcome"] == "running"
            assert progress["reason"] == "a new replica"
            assert (progress["keys_total"], progress["keys_copied"]) == (25, 10)
            assert progress["bytes_copied"] == 10 * (len(b"key-00") + 10)
            assert progress["finished_at"] is None and progress["started_at"] > 0
            source.looked.set()
            until(lambda: follower.status()["state"] == "following", "the resync did not end")
            done = follower.status()["resync"]
            assert not done["active"] and done["outcome"] == "done"
            assert (done["keys_copied"], done["keys_total"]) == (25, 25)
            assert done["bytes_copied"] == 25 * 16 and done["finished_at"] >= done["started_at"]
            assert done["keys_per_s"] > 0
        finally:
            follower.stop(WAIT)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("resync started (a new replica)" in line for line in lines) == 1
    assert sum("resync done: 25 keys (400 bytes)" in line for line in lines) == 1
    replica.close()
