"""A leader's log as its parts work together (committer, records, replica progress), and the
trimmer that keeps going whatever goes wrong."""

from __future__ import annotations

from types import SimpleNamespace

from distribkv.replication.leader import LeaderLog, LeaderRole
from distribkv.replication.records import LAST_SEQ, entry_check, seq_key
from distribkv.storage.api import Delete, Namespace, Put

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META


def put(key: bytes, value: bytes) -> Put:
    return Put(DATA, key, value)


WAIT = 10.0


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


def test_the_trimmer_survives_a_failed_trim_and_shows_it(store, until):
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
        until(lambda: role.status()["trim_error"] is not None or len(calls) > 1, "no trim")
        until(lambda: leader.log.trimmed == 5, "the trimmer did not go on")
        assert role.status()["trim_error"] is None
    finally:
        role.stop(WAIT)
