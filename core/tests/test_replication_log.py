"""The leader's log in process: order, idempotent apply, trimming, divergence checks."""

from __future__ import annotations

import threading
import time

import pytest

from distribkv.plugins import load_plugins
from distribkv.replication.log import (
    APPLIED,
    FOLLOWS,
    LAST_SEQ,
    LeaderLog,
    apply_entries,
    encode_record,
    entry_check,
    seq_key,
)
from distribkv.replication.logtransport import divergence
from distribkv.storage.api import Delete, Namespace, Put
from distribkv.storage.errors import InvalidKeyError, StorageFullError
from distribkv.storage.store import open_store

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META


@pytest.fixture
def store(tmp_path):
    store = open_store(load_plugins().storage_backend("memory"), tmp_path)
    yield store
    store.close()


def put(key: bytes, value: bytes) -> Put:
    return Put(DATA, key, value)


def test_each_op_gets_the_next_seq_with_its_data_in_one_apply(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    assert leader.write([put(b"a", b"1"), Delete(DATA, b"b")]) == 2
    assert leader.write([put(b"a", b"2")]) == 3
    entries = leader.entries_after(0, max_entries=10, max_bytes=1 << 20)
    assert [(e[0], e[1], e[2], e[3]) for e in entries] == [
        (1, 1, b"a", b"1"),
        (2, 0, b"b", None),
        (3, 1, b"a", b"2"),
    ]
    assert store.get(LAST_SEQ, META) == seq_key(3)


def test_applying_a_batch_twice_changes_nothing_and_gaps_are_refused(store, tmp_path):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    for i in range(5):
        leader.write([put(b"k%d" % i, b"v")])
    entries = leader.entries_after(0, max_entries=10, max_bytes=1 << 20)
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
        leader.write([put(b"k%d" % i, b"v")])
    assert leader.trim() == 0  # no replica has reported yet, and 40 entries are under the cap
    leader.resyncing("r1", 20)  # r1 reloads a snapshot taken at seq 20
    for i in range(40, 100):
        leader.write([put(b"k%d" % i, b"v")])
    leader.acknowledge("r0", 90)
    leader.trim()
    assert leader.trimmed == 20  # the resync's floor wins over the retention cap
    leader.acknowledge("r1", 60)
    leader.trim()
    assert leader.trimmed == 60
    leader.acknowledge("r1", 95)
    leader.trim()
    assert leader.trimmed == 90


def test_a_leader_that_reused_sequence_numbers_is_detected(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    for i in range(100):
        leader.write([put(b"k%d" % i, b"v%d" % i)])
    raw = leader.entries_after(99, max_entries=1, max_bytes=1 << 20)[0]
    replica_check = str(entry_check(*raw[1:])).encode()
    assert divergence(leader, leader.history, 100, replica_check) is None
    # The leader loses its last 10 entries (same history), then takes other writes.
    store.apply(
        [Delete(LOG, seq_key(s)) for s in range(91, 101)] + [Put(META, LAST_SEQ, seq_key(90))],
        sync=False,
    )
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    assert "lost entries" in divergence(leader, leader.history, 100, replica_check)
    for i in range(15):
        leader.write([put(b"other%d" % i, b"x")])
    assert "reused sequence numbers" in divergence(leader, leader.history, 100, replica_check)
    assert "history" in divergence(leader, "someotherhistory", 100, replica_check)


def test_a_replica_directory_started_as_leader_continues_its_history(store):
    store.apply(
        [Put(META, FOLLOWS, b"abcdef0123456789"), Put(META, APPLIED, seq_key(42))], sync=False
    )
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    assert (leader.history, leader.last_seq, leader.trimmed) == ("abcdef0123456789", 42, 42)
    assert leader.write([put(b"x", b"y")]) == 43


class SlowApplies:
    """Wraps a store: each apply takes 2 ms (like an fsync) and is counted."""

    def __init__(self, store):
        self.store = store
        self.applies = 0

    def apply(self, ops, *, sync):
        self.applies += 1
        time.sleep(0.002)
        self.store.apply(ops, sync=sync)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _concurrent_writes(leader, threads: int, writes: int, bad: set[int] = frozenset()):
    errors: dict[tuple[int, int], Exception] = {}
    seqs: dict[tuple[int, int], int] = {}

    def run(t: int) -> None:
        for i in range(writes):
            key = b"x" * 600 if (t * writes + i) in bad else b"t%d-%d" % (t, i)
            try:
                seqs[t, i] = leader.write([put(key, b"%d" % i)])
            except BaseException as exc:  # noqa: BLE001 - recorded and checked by the test
                errors[t, i] = exc

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return seqs, errors


@pytest.mark.parametrize("group_commit", [True, False])
def test_concurrent_writes_share_applies_and_keep_one_order(store, group_commit):
    slow = SlowApplies(store)
    leader = LeaderLog(slow, sync=True, replicas=[], retention=10**6, group_commit=group_commit)
    seqs, errors = _concurrent_writes(leader, threads=16, writes=40)
    assert not errors
    # Every write got its own seq, together they are 1..640 with no gap, and the log holds
    # each write's op under its seq.
    assert sorted(seqs.values()) == list(range(1, 641))
    entries = {e[0]: e for e in leader.entries_after(0, max_entries=1000, max_bytes=1 << 24)}
    for (t, i), seq in seqs.items():
        assert entries[seq][2:4] == (b"t%d-%d" % (t, i), b"%d" % i)
        assert store.get(b"t%d-%d" % (t, i)) == b"%d" % i
    assert leader.committed_seq() == 640
    if group_commit:
        assert slow.applies <= 640 / 4  # 16 writers queue behind each 2 ms apply
    else:
        assert slow.applies == 640


def test_a_bad_write_in_a_group_fails_alone(store):
    leader = LeaderLog(SlowApplies(store), sync=True, replicas=[], retention=10**6)
    seqs, errors = _concurrent_writes(leader, threads=8, writes=20, bad={5, 77, 150})
    assert len(errors) == 3
    assert all(isinstance(e, InvalidKeyError) for e in errors.values())
    assert sorted(seqs.values()) == list(range(1, 158))


def test_a_write_that_cannot_be_encoded_fails_alone(store):
    leader = LeaderLog(SlowApplies(store), sync=True, replicas=[], retention=10**6)
    results: dict[str, object] = {}

    def write(name, value):
        try:
            results[name] = leader.write([put(name.encode(), value)])
        except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
            results[name] = exc

    workers = [threading.Thread(target=write, args=(f"good-{i}", b"v")) for i in range(6)] + [
        threading.Thread(target=write, args=("bad", object()))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert isinstance(results["bad"], Exception)
    assert sorted(v for k, v in results.items() if k != "bad") == list(range(1, 7))
    assert all(store.get(b"good-%d" % i) == b"v" for i in range(6))


class InterruptOnce(SlowApplies):
    """The first apply of a group of more than one write is interrupted before it happens."""

    def __init__(self, store):
        super().__init__(store)
        self.interrupted = 0

    def apply(self, ops, *, sync):
        if not self.interrupted and len(ops) > 3:  # a group: more than one write's ops
            self.interrupted += 1
            raise KeyboardInterrupt
        super().apply(ops, sync=sync)


def test_an_interrupted_group_fails_its_writes_and_later_writes_reuse_no_seq(store):
    slow = InterruptOnce(store)
    leader = LeaderLog(slow, sync=True, replicas=[], retention=10**6)
    seqs, failed = _concurrent_writes(leader, threads=8, writes=30)
    assert slow.interrupted == 1
    assert 1 < len(failed) <= 8 and len(failed) + len(seqs) == 240
    # The leader of the interrupted group got the interruption, the rest of it an error.
    assert sum(isinstance(e, KeyboardInterrupt) for e in failed.values()) == 1
    assert all(
        isinstance(e, RuntimeError) for e in failed.values() if not isinstance(e, KeyboardInterrupt)
    )
    # Nothing of the failed writes was applied; every acknowledged one holds its own seq.
    assert len(set(seqs.values())) == len(seqs)
    assert sorted(seqs.values()) == list(range(1, len(seqs) + 1))
    for t, i in failed:
        assert store.get(b"t%d-%d" % (t, i)) is None
    assert leader.committed_seq() == len(seqs)
    assert leader.write([put(b"after", b"v")]) == len(seqs) + 1


@pytest.mark.parametrize("group_commit", [True, False])
def test_deferred_and_waiting_writes_share_one_order_and_are_answered_after_their_apply(
    store, group_commit
):
    slow = SlowApplies(store)
    leader = LeaderLog(slow, sync=True, replicas=[], retention=10**6, group_commit=group_commit)
    answers: dict[bytes, tuple[int, object]] = {}
    answered = threading.Semaphore(0)

    def deferred(t: int) -> None:
        for i in range(40):
            key = b"d%d-%d" % (t, i)

            def done(seq, error, key=key):
                # Answered only once the write is readable (and, with sync, durable).
                answers[key] = (seq, error, store.get(key))
                answered.release()

            leader.submit([put(key, b"v")], done)

    seqs, errors = {}, {}

    def waiting(t: int) -> None:
        for i in range(40):
            try:
                seqs[t, i] = leader.write([put(b"w%d-%d" % (t, i), b"v")])
            except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
                errors[t, i] = exc

    threads = [threading.Thread(target=deferred, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=waiting, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for _ in range(160):
        assert answered.acquire(timeout=30), "a deferred write was never answered"
    assert not errors
    assert all(error is None and value == b"v" for _, error, value in answers.values())
    every = sorted([seq for seq, _, _ in answers.values()] + list(seqs.values()))
    assert every == list(range(1, 321))
    entries = {e[0]: e[2] for e in leader.entries_after(0, max_entries=1000, max_bytes=1 << 24)}
    assert all(entries[seq] == key for key, (seq, _, _) in answers.items())
    assert leader.committed_seq() == 320
    if group_commit:
        assert slow.applies < 320
    leader.close()


def test_a_deferred_write_refused_by_its_guard_is_never_queued(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=100)
    calls = []

    def refuse():
        raise RuntimeError("fenced")

    with pytest.raises(RuntimeError, match="fenced"):
        leader.submit([put(b"k", b"v")], lambda seq, error: calls.append(seq), guard=refuse)
    assert leader.committed_seq() == 0 and store.get(b"k") is None
    done = threading.Event()
    leader.submit([put(b"k", b"v")], lambda seq, error: (calls.append((seq, error)), done.set()))
    assert done.wait(10)
    assert calls == [(1, None)]
    leader.close()


def test_a_bad_deferred_write_fails_alone(store):
    leader = LeaderLog(SlowApplies(store), sync=True, replicas=[], retention=10**6)
    answers: dict[int, tuple[int, object]] = {}
    answered = threading.Semaphore(0)
    for i in range(30):
        key = b"x" * 600 if i in (3, 17) else b"k%d" % i

        def done(seq, error, i=i):
            answers[i] = (seq, error)
            answered.release()

        leader.submit([put(key, b"v")], done)
    for _ in range(30):
        assert answered.acquire(timeout=30)
    failed = sorted(i for i, (_, error) in answers.items() if error is not None)
    assert failed == [3, 17]
    assert all(isinstance(answers[i][1], InvalidKeyError) for i in failed)
    assert sorted(seq for seq, error in answers.values() if error is None) == list(range(1, 29))
    leader.close()


@pytest.mark.parametrize("group_commit", [True, False])
def test_deferred_writes_queued_when_the_log_closes_are_still_applied_and_answered(
    store, group_commit
):
    from distribkv.storage.errors import BackendClosedError

    leader = LeaderLog(
        SlowApplies(store), sync=True, replicas=[], retention=10**6, group_commit=group_commit
    )
    answers: list[tuple[int, object]] = []
    answered = threading.Semaphore(0)

    def done(seq, error):
        answers.append((seq, error))
        answered.release()

    # A waiting writer keeps leading groups while deferred writes queue up behind it.
    writer = threading.Thread(
        target=lambda: [leader.write([put(b"w%d" % i, b"v")]) for i in range(30)]
    )
    writer.start()
    for i in range(30):
        leader.submit([put(b"d%d" % i, b"v")], done)
    leader.close()
    for _ in range(30):
        assert answered.acquire(timeout=30), "a deferred write queued before close was lost"
    writer.join(timeout=30)
    assert [error for _, error in answers] == [None] * 30
    assert all(store.get(b"d%d" % i) == b"v" for i in range(30))
    assert leader.committed_seq() == 60
    with pytest.raises(BackendClosedError):
        leader.submit([put(b"late", b"v")], done)


def test_a_groups_entries_share_records_and_read_from_any_seq(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    leader.write([put(b"first", b"0")])
    ops = [put(b"k%d" % i, b"v%d" % i) if i % 5 else Delete(DATA, b"k%d" % i) for i in range(150)]
    assert leader.write(ops) == 151
    leader.write([put(b"last", b"x")])
    with store.scan(LOG) as pairs:
        records = [(raw_seq, len(raw)) for raw_seq, raw in pairs]
    # One record for each single write, and 64 + 64 + 22 entries for the write of 150 ops.
    assert [raw_seq for raw_seq, _ in records] == [seq_key(s) for s in (1, 65, 129, 151, 152)]
    every = leader.entries_after(0, max_entries=1000, max_bytes=1 << 24)
    assert [e[0] for e in every] == list(range(1, 153))
    assert [(e[1], e[2], e[3]) for e in every[1:151]] == [
        (1, op.key, op.value) if isinstance(op, Put) else (0, op.key, None) for op in ops
    ]
    for after in (0, 1, 2, 63, 64, 65, 66, 128, 150, 151):
        assert leader.entries_after(after, max_entries=7, max_bytes=1 << 20) == every[after:][:7]
    assert leader.entries_after(152, max_entries=7, max_bytes=1 << 20) == []
    # Bounded in bytes too, and at least one entry.
    assert len(leader.entries_after(10, max_entries=1000, max_bytes=1)) == 1
    for seq in (1, 2, 64, 65, 66, 129, 150, 151, 152):
        assert leader.check_at(seq) == entry_check(*every[seq - 1][1:]), seq
    assert leader.check_at(153) is None
    # With no replicas a trim removes every record.
    assert leader.trim() == 152
    assert leader.check_at(151) is None
    leader.write([put(b"after", b"y")])
    assert [e[0] for e in leader.entries_after(152, max_entries=10, max_bytes=1 << 20)] == [153]


def test_a_trim_to_the_middle_of_a_record_keeps_the_rest_of_it(store):
    leader = LeaderLog(store, sync=False, replicas=["r0"], retention=1000)
    leader.write([put(b"k%d" % i, b"v") for i in range(100)])  # records end at 64 and 100
    leader.acknowledge("r0", 70)
    leader.trim()
    assert leader.trimmed == 70
    with store.scan(LOG) as pairs:
        assert [raw_seq for raw_seq, _ in pairs] == [seq_key(100)]
    assert [e[0] for e in leader.entries_after(70, max_entries=100, max_bytes=1 << 20)] == list(
        range(71, 101)
    )
    assert leader.check_at(71) is not None


def test_large_values_get_records_of_their_own(store):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    big, medium = b"b" * 100_000, b"m" * 40_000
    ops = [put(b"a", medium), put(b"b", medium), put(b"c", big), put(b"d", b"x"), put(b"e", b"y")]
    assert leader.write(ops) == 5
    with store.scan(LOG) as pairs:
        # 40 KB + 40 KB would pass 64 KiB: a record each; the 100 KB value alone; then the rest.
        assert [raw_seq for raw_seq, _ in pairs] == [seq_key(s) for s in (1, 2, 3, 5)]
    assert [e[3] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 24)] == [
        op.value for op in ops
    ]


def test_entries_are_handed_out_in_order_without_repeats_or_holes(store):
    leader = LeaderLog(store, sync=False, replicas=["r0"], retention=1000)
    for i in range(1, 11):
        leader.write([put(b"k%d" % i, b"v%d" % i)])
    # A record that overlaps the ones before it never makes a seq come twice.
    overlapping = encode_record([put(b"k%d" % i, b"old") for i in (2, 3, 4)], 0)
    store.apply([Put(LOG, seq_key(4), overlapping)], sync=False)
    entries = leader.entries_after(0, max_entries=100, max_bytes=1 << 20)
    assert [e[0] for e in entries] == list(range(1, 11))
    # A hole stops the read before it instead of skipping a seq.
    store.apply([Delete(LOG, seq_key(7))], sync=False)
    assert [e[0] for e in leader.entries_after(0, max_entries=100, max_bytes=1 << 20)] == list(
        range(1, 7)
    )
    # An entry that is trimmed is not in the log, even while its record is kept.
    leader.write([put(b"k%d" % i, b"w") for i in range(11, 21)])  # one record: 11..20
    leader.acknowledge("r0", 15)
    leader.trim()
    assert leader.trimmed == 15
    assert leader.check_at(15) is None
    assert leader.check_at(16) is not None


def test_a_trim_deletes_the_records_there_are_and_every_seq_only_before_start_up(
    store, monkeypatch
):
    before = LeaderLog(store, sync=False, replicas=[], retention=1000)
    for i in range(10):
        before.write([put(b"old%d" % i, b"v")])  # records 1..10, then a restart
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    leader.write([put(b"k%d" % i, b"v") for i in range(20)])  # one record: 11..30
    for i in range(5):
        leader.write([put(b"s%d" % i, b"v")])  # records 31..35
    applied = []
    real_apply = store.apply

    def spy(ops, *, sync):
        applied.append(list(ops))
        return real_apply(ops, sync=sync)

    monkeypatch.setattr(store, "apply", spy)
    monkeypatch.setattr("distribkv.replication.log.TRIM_BATCH", 4)
    assert leader.trim() == 35
    deleted = [op.key for ops in applied for op in ops if type(op) is Delete]
    # Before start-up every seq's key, after it only the records' keys; 4 at most per apply.
    assert deleted == [seq_key(s) for s in (*range(1, 11), 30, 31, 32, 33, 34, 35)]
    assert all(len([op for op in ops if type(op) is Delete]) <= 4 for ops in applied)
    floors = [op.value for ops in applied for op in ops if type(op) is Put]
    assert floors == [seq_key(s) for s in (4, 8, 10, 33, 35)]
    with store.scan(LOG) as pairs:
        assert list(pairs) == []
    assert leader.trimmed == 35 and leader.trim() == 0


def test_records_of_an_interrupted_apply_are_trimmed_too(store, monkeypatch):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    leader.write([put(b"a", b"1")])
    real_apply = store.apply

    def interrupted(ops, *, sync):
        real_apply(ops, sync=sync)  # it happened, but the writer never learns it did
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        leader.write([put(b"b", b"2")])
    monkeypatch.setattr(store, "apply", real_apply)
    assert leader.write([put(b"c", b"3")]) == 3  # the next write reads the last seq again
    assert leader.trim() == 3
    with store.scan(LOG) as pairs:
        assert list(pairs) == []


def test_a_failed_trim_deletes_nothing_and_the_next_one_does_it_all(store, monkeypatch):
    leader = LeaderLog(store, sync=False, replicas=[], retention=1000)
    for i in range(5):
        leader.write([put(b"k%d" % i, b"v")])
    real_apply = store.apply

    def full(ops, *, sync):
        raise StorageFullError("disk full")

    monkeypatch.setattr(store, "apply", full)
    with pytest.raises(StorageFullError):
        leader.trim()
    assert leader.trimmed == 0  # the floor went back: the records are all still there
    assert [e[0] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 20)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    monkeypatch.setattr(store, "apply", real_apply)
    assert leader.trim() == 5
    with store.scan(LOG) as pairs:
        assert list(pairs) == []


def test_entries_of_a_group_not_yet_applied_are_not_handed_out(store):
    leader = LeaderLog(store, sync=False, replicas=["r0"], retention=1000)
    leader.write([put(b"a", b"1"), put(b"b", b"2")])
    # A group being applied: its record is readable before its apply returns (RocksDB: before
    # its WAL sync), and last_seq does not count it yet.
    store.apply(
        [Put(LOG, seq_key(4), encode_record([put(b"c", b"3"), put(b"d", b"4")], 0))], sync=False
    )
    assert [e[0] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 20)] == [1, 2]
    assert leader.entries_after(2, max_entries=10, max_bytes=1 << 20) == []
