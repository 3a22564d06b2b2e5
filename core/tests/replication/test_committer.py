"""The group committer: concurrent writes share applies, keep one order, and fail alone."""

from __future__ import annotations

import threading
import time

import pytest

from distribkv.replication.committer import GroupCommitter
from distribkv.replication.logstore import LogStore
from distribkv.storage.api import Namespace, Put
from distribkv.storage.errors import InvalidKeyError

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META


def put(key: bytes, value: bytes) -> Put:
    return Put(DATA, key, value)


def committer(store, *, sync: bool = True, group_commit: bool = True) -> GroupCommitter:
    return GroupCommitter(LogStore(store, sync=sync), group_commit=group_commit)


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
    leader = committer(slow, group_commit=group_commit)
    seqs, errors = _concurrent_writes(leader, threads=16, writes=40)
    assert not errors
    # Every write got its own seq, together they are 1..640 with no gap, and the log holds
    # each write's op under its seq.
    assert sorted(seqs.values()) == list(range(1, 641))
    entries = {e[0]: e for e in leader.log.entries_after(0, max_entries=1000, max_bytes=1 << 24)}
    for (t, i), seq in seqs.items():
        assert entries[seq][2:4] == (b"t%d-%d" % (t, i), b"%d" % i)
        assert store.get(b"t%d-%d" % (t, i)) == b"%d" % i
    assert leader.committed_seq() == 640
    if group_commit:
        assert slow.applies <= 640 / 4  # 16 writers queue behind each 2 ms apply
    else:
        assert slow.applies == 640


def test_a_bad_write_in_a_group_fails_alone(store):
    leader = committer(SlowApplies(store))
    seqs, errors = _concurrent_writes(leader, threads=8, writes=20, bad={5, 77, 150})
    assert len(errors) == 3
    assert all(isinstance(e, InvalidKeyError) for e in errors.values())
    assert sorted(seqs.values()) == list(range(1, 158))


def test_a_write_that_cannot_be_encoded_fails_alone(store):
    leader = committer(SlowApplies(store))
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
    leader = committer(slow)
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
    leader = committer(slow, group_commit=group_commit)
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
    entries = {e[0]: e[2] for e in leader.log.entries_after(0, max_entries=1000, max_bytes=1 << 24)}
    assert all(entries[seq] == key for key, (seq, _, _) in answers.items())
    assert leader.committed_seq() == 320
    if group_commit:
        assert slow.applies < 320
    leader.close()


def test_a_deferred_write_refused_by_its_guard_is_never_queued(store):
    leader = committer(store, sync=False)
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
    leader = committer(SlowApplies(store))
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
def test_writes_queued_when_the_log_closes_are_applied_and_later_ones_refused(store, group_commit):
    from distribkv.storage.errors import BackendClosedError

    leader = committer(SlowApplies(store), group_commit=group_commit)
    answers: list[tuple[int, object]] = []
    answered = threading.Semaphore(0)

    def done(seq, error):
        answers.append((seq, error))
        answered.release()

    # A waiting writer keeps leading groups while deferred writes queue up behind it.
    written: list[int] = []
    refused: list[BaseException] = []

    def write_on() -> None:
        for i in range(30):
            try:
                written.append(leader.write([put(b"w%d" % i, b"v")]))
            except BackendClosedError as exc:
                refused.append(exc)  # after close: refused, not queued

    writer = threading.Thread(target=write_on)
    writer.start()
    for i in range(30):
        leader.submit([put(b"d%d" % i, b"v")], done)
    leader.close()
    # close() returned: whatever was queued is applied, and nothing more will be.
    seq = leader.committed_seq()
    for _ in range(30):
        assert answered.acquire(timeout=30), "a deferred write queued before close was lost"
    writer.join(timeout=30)
    assert [error for _, error in answers] == [None] * 30
    assert all(store.get(b"d%d" % i) == b"v" for i in range(30))
    assert len(written) + len(refused) == 30
    assert seq == leader.committed_seq() == 30 + len(written)
    with pytest.raises(BackendClosedError):
        leader.submit([put(b"late", b"v")], done)
    with pytest.raises(BackendClosedError):
        leader.write([put(b"late", b"v")])
