"""The leader's log in storage: records, seqs, reading and trimming."""

from __future__ import annotations

import pytest

from distribkv.replication.logstore import LogStore
from distribkv.replication.records import (
    APPLIED,
    FOLLOWS,
    LAST_SEQ,
    encode_record,
    entry_check,
    seq_key,
)
from distribkv.storage.api import Delete, Namespace, Put
from distribkv.storage.errors import StorageFullError

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META


def put(key: bytes, value: bytes) -> Put:
    return Put(DATA, key, value)


def write(log: LogStore, ops) -> int:
    """Append one write; its last seq."""
    return log.append([ops])[0]


def test_each_op_gets_the_next_seq_with_its_data_in_one_apply(store):
    leader = LogStore(store, sync=False)
    assert write(leader, [put(b"a", b"1"), Delete(DATA, b"b")]) == 2
    assert write(leader, [put(b"a", b"2")]) == 3
    entries = leader.entries_after(0, max_entries=10, max_bytes=1 << 20)
    assert [(e[0], e[1], e[2], e[3]) for e in entries] == [
        (1, 1, b"a", b"1"),
        (2, 0, b"b", None),
        (3, 1, b"a", b"2"),
    ]
    assert store.get(LAST_SEQ, META) == seq_key(3)


def test_a_replica_directory_started_as_leader_continues_its_history(store):
    store.apply(
        [Put(META, FOLLOWS, b"abcdef0123456789"), Put(META, APPLIED, seq_key(42))], sync=False
    )
    leader = LogStore(store, sync=False)
    assert (leader.history, leader.last_seq, leader.trimmed) == ("abcdef0123456789", 42, 42)
    assert write(leader, [put(b"x", b"y")]) == 43


def test_a_groups_entries_share_records_and_read_from_any_seq(store):
    leader = LogStore(store, sync=False)
    write(leader, [put(b"first", b"0")])
    ops = [put(b"k%d" % i, b"v%d" % i) if i % 5 else Delete(DATA, b"k%d" % i) for i in range(150)]
    assert write(leader, ops) == 151
    write(leader, [put(b"last", b"x")])
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
    assert leader.trim(leader.last_seq) == 152
    assert leader.check_at(151) is None
    write(leader, [put(b"after", b"y")])
    assert [e[0] for e in leader.entries_after(152, max_entries=10, max_bytes=1 << 20)] == [153]


def test_a_trim_to_the_middle_of_a_record_keeps_the_rest_of_it(store):
    leader = LogStore(store, sync=False)
    write(leader, [put(b"k%d" % i, b"v") for i in range(100)])  # records end at 64 and 100
    leader.trim(70)
    assert leader.trimmed == 70
    with store.scan(LOG) as pairs:
        assert [raw_seq for raw_seq, _ in pairs] == [seq_key(100)]
    assert [e[0] for e in leader.entries_after(70, max_entries=100, max_bytes=1 << 20)] == list(
        range(71, 101)
    )
    assert leader.check_at(71) is not None


def test_large_values_get_records_of_their_own(store):
    leader = LogStore(store, sync=False)
    big, medium = b"b" * 100_000, b"m" * 40_000
    ops = [put(b"a", medium), put(b"b", medium), put(b"c", big), put(b"d", b"x"), put(b"e", b"y")]
    assert write(leader, ops) == 5
    with store.scan(LOG) as pairs:
        # 40 KB + 40 KB would pass 64 KiB: a record each; the 100 KB value alone; then the rest.
        assert [raw_seq for raw_seq, _ in pairs] == [seq_key(s) for s in (1, 2, 3, 5)]
    assert [e[3] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 24)] == [
        op.value for op in ops
    ]


def test_entries_are_handed_out_in_order_without_repeats_or_holes(store):
    leader = LogStore(store, sync=False)
    for i in range(1, 11):
        write(leader, [put(b"k%d" % i, b"v%d" % i)])
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
    write(leader, [put(b"k%d" % i, b"w") for i in range(11, 21)])  # one record: 11..20
    leader.trim(15)
    assert leader.trimmed == 15
    assert leader.check_at(15) is None
    assert leader.check_at(16) is not None


def test_a_trim_deletes_the_records_there_are_and_every_seq_only_before_start_up(
    store, monkeypatch
):
    before = LogStore(store, sync=False)
    for i in range(10):
        write(before, [put(b"old%d" % i, b"v")])  # records 1..10, then a restart
    leader = LogStore(store, sync=False)
    write(leader, [put(b"k%d" % i, b"v") for i in range(20)])  # one record: 11..30
    for i in range(5):
        write(leader, [put(b"s%d" % i, b"v")])  # records 31..35
    applied = []
    real_apply = store.apply

    def spy(ops, *, sync):
        applied.append(list(ops))
        return real_apply(ops, sync=sync)

    monkeypatch.setattr(store, "apply", spy)
    monkeypatch.setattr("distribkv.replication.logstore.TRIM_BATCH", 4)
    assert leader.trim(leader.last_seq) == 35
    deleted = [op.key for ops in applied for op in ops if type(op) is Delete]
    # Before start-up every seq's key, after it only the records' keys; 4 at most per apply.
    assert deleted == [seq_key(s) for s in (*range(1, 11), 30, 31, 32, 33, 34, 35)]
    assert all(len([op for op in ops if type(op) is Delete]) <= 4 for ops in applied)
    floors = [op.value for ops in applied for op in ops if type(op) is Put]
    assert floors == [seq_key(s) for s in (4, 8, 10, 33, 35)]
    with store.scan(LOG) as pairs:
        assert list(pairs) == []
    assert leader.trimmed == 35 and leader.trim(leader.last_seq) == 0


def test_records_of_an_interrupted_apply_are_trimmed_too(store, monkeypatch):
    leader = LogStore(store, sync=False)
    write(leader, [put(b"a", b"1")])
    real_apply = store.apply

    def interrupted(ops, *, sync):
        real_apply(ops, sync=sync)  # it happened, but the writer never learns it did
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(leader, [put(b"b", b"2")])
    leader.interrupted()  # as the committer says of an apply it saw interrupted
    monkeypatch.setattr(store, "apply", real_apply)
    assert write(leader, [put(b"c", b"3")]) == 3  # the next write reads the last seq again
    assert leader.trim(leader.last_seq) == 3
    with store.scan(LOG) as pairs:
        assert list(pairs) == []


def test_a_failed_trim_deletes_nothing_and_the_next_one_does_it_all(store, monkeypatch):
    leader = LogStore(store, sync=False)
    for i in range(5):
        write(leader, [put(b"k%d" % i, b"v")])
    real_apply = store.apply

    def full(ops, *, sync):
        raise StorageFullError("disk full")

    monkeypatch.setattr(store, "apply", full)
    with pytest.raises(StorageFullError):
        leader.trim(leader.last_seq)
    assert leader.trimmed == 0  # the floor went back: the records are all still there
    assert [e[0] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 20)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    monkeypatch.setattr(store, "apply", real_apply)
    assert leader.trim(leader.last_seq) == 5
    with store.scan(LOG) as pairs:
        assert list(pairs) == []


def test_entries_of_a_group_not_yet_applied_are_not_handed_out(store):
    leader = LogStore(store, sync=False)
    write(leader, [put(b"a", b"1"), put(b"b", b"2")])
    # A group being applied: its record is readable before its apply returns (RocksDB: before
    # its WAL sync), and last_seq does not count it yet.
    store.apply(
        [Put(LOG, seq_key(4), encode_record([put(b"c", b"3"), put(b"d", b"4")], 0))], sync=False
    )
    assert [e[0] for e in leader.entries_after(0, max_entries=10, max_bytes=1 << 20)] == [1, 2]
    assert leader.entries_after(2, max_entries=10, max_bytes=1 << 20) == []


def test_a_stopping_node_ends_every_wait_for_entries_at_once(store):
    import threading

    log = LogStore(store, sync=False)
    write(log, [put(b"k", b"v")])
    assert log.wait_for_entries(0, timeout=10)  # an entry after 0: no wait
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(log.wait_for_entries(1, 30)))
    waiter.start()
    log.stop_waiting()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and results == [False]
    assert log.stopping
    assert log.wait_for_entries(1, timeout=30) is False  # returns at once from now on
