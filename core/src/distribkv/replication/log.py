"""The leader's replication log, and what every node keeps in its metadata.

Every mutation on a leader gets the next sequence number. The data change, its log entry
``(op, key, value, time)`` and the new last seq are written in ONE storage apply, so the log
can never disagree with the data. The entries of one apply (a group commit, or a batch) share log
records (at most ``RECORD_ENTRIES`` entries or about ``RECORD_BYTES`` each, so a large value
has a record of its own), stored under the seq of their last entry: a record of one entry is
the entry itself, a record of several is the list of them. A scan from seq N's key therefore
starts at the record that holds N. A random history id, made when a data directory is
created, tells replicas whether they follow the same history.

Replication transports only move entries; this module owns the order, the progress of every
replica (for trimming and for ``min_replicas``) and the snapshot pages of a full resync.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import msgpack
from xxhash import xxh3_64_intdigest

from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.errors import BackendClosedError
from distribkv.storage.store import Store

log = logging.getLogger(__name__)

META, LOG, DATA = Namespace.META, Namespace.LOG, Namespace.DATA
_SEQ = struct.Struct(">Q")

# Metadata keys.
LAST_SEQ = b"seq"  # leader: the last sequence number written
HISTORY = b"history"  # this data directory's history id
TRIMMED = b"trimmed"  # leader: entries <= this were removed from the log
APPLIED = b"applied"  # replica: the leader's last seq applied here
FOLLOWS = b"follows"  # replica: the history id of the leader it follows
RESYNC = b"resync"  # replica: a full resync is in progress (data is incomplete)
SNAPSHOT_SEQ = b"snapshot_seq"  # replica: consistent once applied >= this
APPLIED_CHECK = b"applied_check"  # replica: entry_check of the entry at APPLIED

OP_DELETE, OP_PUT = 0, 1
#: Most entries in one log record (the entries of a group commit share records).
RECORD_ENTRIES = 64
#: Most bytes of keys and values in one record of several entries (a larger entry has a
#: record of its own).
RECORD_BYTES = 64 * 1024
#: Most log records one trim deletes in one storage apply.
TRIM_BATCH = 1000


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


def read_seq(store: Store, key: bytes) -> int:
    raw = store.get(key, META)
    return 0 if raw is None else _SEQ.unpack(raw)[0]


def ensure_history(store: Store, *, sync: bool) -> str:
    """This data directory's history id, made on first use."""
    raw = store.get(HISTORY, META)
    if raw is None:
        raw = os.urandom(8).hex().encode()
        store.put(HISTORY, raw, ns=META, sync=sync)
    return raw.decode()


def _entry_fields(op: Op, now_ms: int) -> list:
    if type(op) is Put:
        return [OP_PUT, op.key, op.value, now_ms]
    return [OP_DELETE, op.key, None, now_ms]


def encode_record(ops: Sequence[Op], now_ms: int) -> bytes:
    """The log record of consecutive entries: one entry as itself, several as their list."""
    entries = [_entry_fields(op, now_ms) for op in ops]
    return msgpack.packb(entries[0] if len(entries) == 1 else entries, use_bin_type=True)


def decode_record(raw_seq: bytes, raw: bytes) -> tuple[int, list[list]]:
    """(seq of the first entry, the entries as [op, key, value, ts]) of one log record."""
    data = msgpack.unpackb(raw, raw=False)
    entries = data if data and type(data[0]) is list else [data]
    return _SEQ.unpack(raw_seq)[0] - len(entries) + 1, entries


def entry_check(op: int, key: bytes, value: bytes | None, ts: int) -> int:
    """A checksum of one entry: a replica sends the one it applied last, and the leader
    compares it with its own entry at that seq, so a leader that lost a suffix of its log and
    reused those sequence numbers is noticed instead of silently diverging."""
    return xxh3_64_intdigest(msgpack.packb([op, key, value, ts], use_bin_type=True))


def entry_op(op: int, key: bytes, value: bytes | None) -> Op:
    return Put(DATA, key, value) if op == OP_PUT else Delete(DATA, key)


class _Pending:
    """One write in the group-commit queue. A waiting writer holds ``wake`` until it may go
    on: its write is done, or it is the oldest queued one and leads the next group. A deferred
    write has a ``callback`` instead, called with the write once it is done."""

    __slots__ = ("callback", "done", "error", "ops", "seq", "wake")

    def __init__(self, ops: Sequence[Op], callback: Callable[[_Pending], None] | None = None):
        self.ops = ops
        self.seq = 0
        self.done = False
        self.error: BaseException | None = None
        self.callback = callback
        if callback is None:
            self.wake = threading.Lock()
            self.wake.acquire()
        else:
            self.wake = None


class ReplicaProgress:
    __slots__ = ("acked", "last_seen", "name", "retain")

    def __init__(self, name: str):
        self.name = name
        self.acked = -1  # unknown until the replica reports
        self.retain = -1  # a resyncing replica needs the log from here on
        self.last_seen = 0.0

    @property
    def floor(self) -> int:
        """The oldest entry this replica may still need (-1: unknown)."""
        return self.acked if self.acked >= 0 else self.retain


class LeaderLog:
    """Sequence numbers, the log, replica progress and its waiters, on one leader."""

    def __init__(
        self,
        store: Store,
        *,
        sync: bool,
        replicas: Sequence[str],
        retention: int,
        group_commit: bool = True,
    ):
        self.store = store
        self.sync = sync
        self.retention = retention
        self.history = ensure_history(store, sync=sync)
        self._adopt_followed_history()
        self.last_seq = read_seq(store, LAST_SEQ)
        self.trimmed = read_seq(store, TRIMMED)
        # The keys of the log records written since start-up, oldest first, so that a trim
        # deletes the records there are (one per group commit), not every seq. Below
        # ``_unlisted_upto`` records may exist that are not listed (written before start-up, or
        # by an interrupted apply): a trim deletes every seq there.
        self._records: collections.deque[int] = collections.deque()
        self._unlisted_upto = self.last_seq
        self.last_write_ms = int(time.time() * 1000)
        self.group_commit = group_commit
        self._queue_lock = threading.Lock()
        self._flushed = threading.Condition(self._queue_lock)
        self._queue: list[_Pending] = []
        self._flushing = False
        self._enqueued = 0  # writes queued so far
        self._completed = 0  # of those, applied or failed (always a prefix: groups are FIFO)
        self._seq_waiters = 0  # threads in committed_seq(), waiting on _flushed
        self._changed = threading.Condition(threading.Lock())
        # Threads waiting on _changed for new entries: a write notifies only when there are
        # some (they count themselves in before they look at last_seq, which a write sets
        # before it looks at this count).
        self._change_waiters = 0
        # Deferred writes have no thread of their own to lead a group: a committer thread,
        # started with the first one, leads when the oldest queued write is deferred.
        self._committer: threading.Thread | None = None
        self._commit_turns: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        # An interrupted apply may or may not have happened: the next one reads the last seq
        # from storage before it gives out any.
        self._seq_unknown = False
        self.progress = {name: ReplicaProgress(name) for name in replicas}
        #: Readers of the log that are not replicas (a reshard copying keys away): name ->
        #: (the oldest seq they still need, when the hold lapses). Not counted as replicas.
        self.holds: dict[str, tuple[int, float]] = {}

    def _adopt_followed_history(self) -> None:
        """A replica's data directory started as a leader continues the history it followed:
        same history id, next seq after the last one it applied. Replicas at that point go on
        without a resync; those behind it reload from this (more advanced) copy."""
        store = self.store
        follows = store.get(FOLLOWS, META)
        if follows is None or store.get(LAST_SEQ, META) is not None:
            return
        if store.get(RESYNC, META) is not None:
            return  # an interrupted resync: its data is incomplete, start a history of its own
        applied = read_seq(store, APPLIED)
        store.apply(
            [
                Put(META, HISTORY, follows),
                Put(META, LAST_SEQ, seq_key(applied)),
                Put(META, TRIMMED, seq_key(applied)),
                Delete(META, FOLLOWS),
                Delete(META, APPLIED),
            ],
            sync=True,
        )
        self.history = follows.decode()
        log.warning(
            "this data directory followed history %s up to seq %d; as a leader it"
            " continues that history",
            self.history,
            applied,
        )

    # --- writes ---------------------------------------------------------------------------

    def write(self, ops: Sequence[Op], *, guard: Callable[[], None] | None = None) -> int:
        """Apply data ops with their log entries and the new seq atomically; return the seq.

        Group commit: a write joins the queue. A writer that finds no group being applied
        leads: it takes the whole queue and applies it as ONE storage apply (one fsync with
        ``sync``), in queue order, while later writers queue up. Then it wakes each writer of
        its group, and hands the lead to the oldest queued writer, who applies the next group.
        Each writer is woken once, by a lock of its own: no herd of threads wakes up to find
        that only one of them may go on. Seqs are given at the apply, so the log order is the
        apply order. A failed group apply is retried write by write, so one bad write fails
        alone.

        ``guard`` runs under the queue lock first and may raise to refuse the write: a caller
        that changes what the guard checks and then reads :meth:`committed_seq` knows that
        every later write saw the change."""
        request = _Pending(ops)
        if self._enqueue(request, guard):
            request.wake.acquire()
        if not request.done:
            self._lead(request)
        if request.error is not None:
            raise request.error
        return request.seq

    def submit(
        self,
        ops: Sequence[Op],
        callback: Callable[[int, BaseException | None], None],
        *,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`write` without waiting: ``callback(seq, None)`` once the write is applied
        (durably with ``sync``), or ``callback(0, error)`` if it failed, from the thread that
        applied its group. ``guard`` and the order are as for :meth:`write`; a guard's error
        is raised here, and then nothing is queued."""
        self._enqueue(_Pending(ops, lambda done: callback(done.seq, done.error)), guard)

    def _enqueue(self, request: _Pending, guard: Callable[[], None] | None) -> bool:
        """Queue ``request``; True if a group is being applied (someone else leads next)."""
        with self._queue_lock:
            if guard is not None:
                guard()
            if request.callback is not None:
                if self._closed:
                    raise BackendClosedError("the leader's log is closed; the write was not queued")
                if self._committer is None:
                    committer = threading.Thread(
                        target=self._commit_deferred, name="distribkv-commit", daemon=True
                    )
                    committer.start()
                    self._committer = committer
            self._queue.append(request)
            self._enqueued += 1
            busy = self._flushing
            self._flushing = True
            if not busy and request.callback is not None:
                # Under the lock, so that close() cannot slip its stop in before this turn.
                self._commit_turns.put(True)
            return busy

    def _commit_deferred(self) -> None:
        """The committer thread: leads each group whose oldest write is a deferred one."""
        while self._commit_turns.get():
            try:
                self._lead(None)
            except BaseException:  # the group's writes got the error; go on
                log.exception("applying a group of deferred writes failed")

    def close(self) -> None:
        """Stop the committer thread. Deferred writes queued after this are refused; any the
        committer can no longer lead are led by whichever thread finishes the group before."""
        with self._queue_lock:
            self._closed = True
            committer = self._committer
            if committer is not None:
                self._commit_turns.put(False)
        if committer is not None:
            committer.join(timeout=10)

    def _lead(self, leader: _Pending | None) -> None:
        """Apply groups from the queue until the lead can be handed on: to a waiting writer,
        or to the committer thread. ``leader`` is the oldest queued write, or None for the
        committer thread."""
        while self._lead_group(leader):
            leader = None  # closed: no committer takes deferred writes any more

    def _lead_group(self, leader: _Pending | None) -> bool:
        """Apply one group: the whole queue, or its oldest write without group commit. True if
        the caller must lead the next one itself (a deferred write, and no committer)."""
        with self._queue_lock:
            if not self._queue:  # cannot happen: whoever leads, leads a queued write
                self._flushing = False
                return False
            if self.group_commit:
                group, self._queue = self._queue, []
            else:
                group = [self._queue.pop(0)]
        successor = None
        lead_next = False
        try:
            self._flush(group)
        finally:
            try:
                interrupted = [pending for pending in group if not pending.done]
                for pending in interrupted:
                    # Interrupted (not an error of the writes): the apply may or may not have
                    # happened; the next flush takes the last seq from storage first, so no
                    # seq is reused.
                    pending.error = RuntimeError("the write was interrupted")
                    pending.done = True
                if interrupted:
                    self._seq_unknown = True
            finally:
                # Whatever happened above, the group ends and the lead moves on.
                with self._queue_lock:
                    self._completed += len(group)
                    if self._queue:
                        successor = self._queue[0]
                        if successor.callback is not None:
                            if self._closed:
                                lead_next = True
                            else:
                                self._commit_turns.put(True)  # under the lock: see _enqueue
                    else:
                        self._flushing = False
                    if self._seq_waiters:
                        self._flushed.notify_all()
                # The next group first: it applies while this one's writers are answered.
                if successor is not None and successor.callback is None:
                    successor.wake.release()
                for pending in group:
                    if pending.callback is not None:
                        try:
                            pending.callback(pending)
                        except BaseException:  # one answer's failure stays its own
                            log.exception("finishing a deferred write failed")
                    elif pending is not leader:
                        pending.wake.release()
                if self._change_waiters:
                    with self._changed:
                        self._changed.notify_all()
        return lead_next

    def _flush(self, group: list[_Pending]) -> None:
        try:
            if self._seq_unknown:
                stored = read_seq(self.store, LAST_SEQ)
                # Unlisted first: a trim that sees the new last seq must see this too.
                self._unlisted_upto = max(self._unlisted_upto, stored)
                self.last_seq = stored
                self._seq_unknown = False
            now_ms = int(time.time() * 1000)
            seq = self.last_seq
            batch: list[Op] = []
            seqs = []
            records = []
            record: list[Op] = []
            record_bytes = 0
            for request in group:
                for op in request.ops:
                    size = len(op.key) + (len(op.value) if type(op) is Put else 0)
                    if record and (
                        len(record) == RECORD_ENTRIES or record_bytes + size > RECORD_BYTES
                    ):
                        batch.append(Put(LOG, seq_key(seq), encode_record(record, now_ms)))
                        records.append(seq)
                        record, record_bytes = [], 0
                    seq += 1
                    batch.append(op)
                    record.append(op)
                    record_bytes += size
                seqs.append(seq)
            if record:
                batch.append(Put(LOG, seq_key(seq), encode_record(record, now_ms)))
                records.append(seq)
            batch.append(Put(META, LAST_SEQ, seq_key(seq)))
            self.store.apply(batch, sync=self.sync)
        except Exception as exc:  # noqa: BLE001 - handed to the writer, which raises it
            if len(group) == 1:
                group[0].error = exc
                group[0].done = True
                return
            for request in group:  # find the write that failed; the others go through
                self._flush([request])
            return
        self._records.extend(records)
        self.last_seq = seq
        self.last_write_ms = now_ms
        for request, last in zip(group, seqs, strict=True):
            request.seq = last
            request.done = True

    def entry_at(self, seq: int) -> list | None:
        """The entry at ``seq`` as [op, key, value, ts], or None when it is not in the log
        (trimmed, even if its record is still kept for the entries after it)."""
        if seq <= self.trimmed:
            return None
        with self.store.scan(LOG, seq_key(seq), limit=1) as pairs:
            for raw_seq, raw in pairs:
                first, entries = decode_record(raw_seq, raw)
                return entries[seq - first] if first <= seq else None
        return None

    def check_at(self, seq: int) -> int | None:
        """entry_check of the entry at ``seq``, or None when it is not in the log."""
        entry = self.entry_at(seq)
        return None if entry is None else entry_check(*entry)

    def committed_seq(self) -> int:
        """The last seq, once every write queued before this call is applied: each of them
        has a seq <= the answer and is readable in storage."""
        with self._queue_lock:
            target = self._enqueued
            self._seq_waiters += 1
            try:
                while self._completed < target:
                    self._flushed.wait()
            finally:
                self._seq_waiters -= 1
            return self.last_seq

    # --- reading the log ------------------------------------------------------------------

    def entries_after(
        self, after: int, *, max_entries: int, max_bytes: int
    ) -> list[tuple[int, int, bytes, bytes | None, int]]:
        """Entries with seq > after, in order, bounded in count and bytes (at least one); only
        applied ones (<= last_seq). A group's records can be readable before its apply returns
        (RocksDB: before its WAL sync), and nothing is handed out before it is acknowledged."""
        out = []
        size = 0
        # Every record of an applied group is keyed <= last_seq, every other one above it.
        stop = seq_key(self.last_seq + 1)
        with self.store.scan(LOG, seq_key(after + 1), stop, limit=max_entries) as pairs:
            last = after
            for raw_seq, raw in pairs:
                first, entries = decode_record(raw_seq, raw)
                for seq, (op, key, value, ts) in enumerate(entries, first):
                    if seq <= last:
                        continue  # the record began before the entries asked for
                    if out and seq != last + 1:
                        # Records never leave holes; should one ever, stop rather than skip a
                        # seq. (Before the first entry a hole is a trimmed log: callers check.)
                        log.error("replication log: seq %d follows %d", seq, last)
                        return out
                    last = seq
                    size += len(key) + len(value or b"") + 24
                    if out and (size > max_bytes or len(out) >= max_entries):
                        return out
                    out.append((seq, op, key, value, ts))
        return out

    def wait_for_entries(self, after: int, timeout: float) -> bool:
        """Block until the log has an entry after ``after`` (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._change_waiters += 1
            try:
                while self.last_seq <= after:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._changed.wait(remaining)
            finally:
                self._change_waiters -= 1
        return True

    # --- replica progress -----------------------------------------------------------------

    def acknowledge(self, replica: str, applied: int) -> None:
        with self._changed:
            progress = self.progress.get(replica)
            if progress is None:
                progress = self.progress[replica] = ReplicaProgress(replica)
            progress.acked = max(progress.acked, applied) if progress.acked >= 0 else applied
            progress.last_seen = time.time()
            self._changed.notify_all()

    def resyncing(self, replica: str, from_seq: int) -> None:
        """A replica starts a full resync: keep the log after ``from_seq`` for it; it has
        acknowledged nothing of this history yet."""
        with self._changed:
            progress = self.progress.get(replica)
            if progress is None:
                progress = self.progress[replica] = ReplicaProgress(replica)
            progress.acked = -1
            progress.retain = from_seq
            progress.last_seen = time.time()

    def hold(self, name: str, after: int, ttl: float) -> None:
        """Keep the entries after ``after`` for ``name`` for ``ttl`` more seconds."""
        with self._changed:
            self.holds[name] = (after, time.monotonic() + ttl)

    def release(self, name: str) -> None:
        with self._changed:
            self.holds.pop(name, None)

    def wait_replicated(self, seq: int, count: int, timeout: float) -> bool:
        """Block until ``count`` replicas acknowledged ``seq`` (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(p.acked >= seq for p in self.progress.values()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def trim(self) -> int:
        """Remove entries every replica has (but keep at most ``retention``); returns count."""
        with self._changed:
            floors = [p.floor for p in self.progress.values()]
            resyncing = [p.retain for p in self.progress.values() if p.acked < 0 <= p.retain]
            now = time.monotonic()
            for name, (_, until) in list(self.holds.items()):
                if until < now:
                    del self.holds[name]
            resyncing += [after for after, _ in self.holds.values()]
        last = self.last_seq
        if not floors:
            floor = last  # no replicas: nobody needs the log
        elif min(floors) < 0:
            floor = self.trimmed  # a replica has not reported since start-up
        else:
            floor = min(floors)
        # Never keep more than `retention` entries, even for a replica that is far behind:
        # it then resyncs from a snapshot instead.
        target = max(floor, last - self.retention)
        # A replica in the middle of a resync (or a reshard's copy, while its hold lasts) needs
        # the log from its snapshot on, whatever the cap says; otherwise a busy leader could
        # make it start over forever.
        target = min([target, last, *resyncing])
        removed = 0
        records = self._records
        while self.trimmed < target:
            # Records are keyed by their last seq: this removes those that end at upto or before
            # (one that straddles upto stays, for the entries after it), by key, so that it
            # reads no record, however large its values.
            unlisted = min(target, self._unlisted_upto)
            if self.trimmed < unlisted:  # records not listed: every seq's key, in case
                upto = min(unlisted, self.trimmed + TRIM_BATCH)
                ops: list[Op] = [Delete(LOG, seq_key(s)) for s in range(self.trimmed + 1, upto + 1)]
                while records and records[0] <= upto:
                    records.popleft()  # deleted with the others
            else:
                upto, ops, deleted = target, [], self.trimmed
                while records and records[0] <= target:
                    if len(ops) == TRIM_BATCH:
                        upto = deleted  # the rest in the next apply
                        break
                    deleted = records.popleft()
                    ops.append(Delete(LOG, seq_key(deleted)))
            ops.append(Put(META, TRIMMED, seq_key(upto)))
            # Announce the new floor first, so a pull never finds a hole in what it was told.
            previous, self.trimmed = self.trimmed, upto
            try:
                self.store.apply(ops, sync=False)
            except BaseException:
                # Nothing was deleted: the floor goes back, and the next trim deletes every seq's
                # key up to upto (the records taken from the list above are still there).
                self._unlisted_upto = max(self._unlisted_upto, upto)
                self.trimmed = previous
                raise
            removed += upto - previous
        return removed

    def lag_seconds(self, acked: int) -> float | None:
        """How old the oldest entry a replica has not applied is (0 when caught up)."""
        if acked < 0:
            return None
        if acked >= self.last_seq:
            return 0.0
        entry = self.entry_at(acked + 1)
        if entry is None:
            return None
        return max(0.0, time.time() - entry[3] / 1000)

    def status(self) -> dict:
        now = time.time()
        replicas = {}
        with self._changed:
            progress = sorted(self.progress.items())
        for name, p in progress:
            lag = None if p.acked < 0 else self.last_seq - p.acked
            seconds = self.lag_seconds(p.acked)
            replicas[name] = {
                "applied_seq": None if p.acked < 0 else p.acked,
                "lag_entries": lag,
                "lag_seconds": None if seconds is None else round(seconds, 3),
                "last_seen_s_ago": None if not p.last_seen else round(now - p.last_seen, 3),
            }
        return {
            "history": self.history,
            "last_seq": self.last_seq,
            "trimmed_seq": self.trimmed,
            "replicas": replicas,
        }

    # --- snapshots for a full resync ------------------------------------------------------

    def snapshot_page(self, after_key: bytes | None, limit: int, max_bytes: int) -> dict:
        """One page of the data, with the seq read before it: a replica that loads every page
        and then applies the log from the first page's seq ends with the leader's state."""
        seq = self.committed_seq()
        pairs = []
        size = 0
        start = None if after_key is None else after_key + b"\x00"
        with self.store.scan(DATA, start, limit=limit) as scan:
            # Read after the scan's snapshot was taken: every write in the page is <= this.
            seq_after = self.committed_seq()
            for key, value in scan:
                pairs.append([key, value])
                size += len(key) + len(value)
                if size >= max_bytes:
                    break
        return {
            "history": self.history,
            "seq": seq,
            "seq_after": seq_after,
            "pairs": pairs,
            "done": len(pairs) < limit and size < max_bytes,
        }


def apply_entries(
    store: Store,
    entries: Iterable[tuple[int, int, bytes, bytes | None, int]],
    applied: int,
    *,
    sync: bool,
    extra: Sequence[Op] = (),
) -> int:
    """Apply replicated entries after ``applied`` with the new applied seq in one apply.

    Entries at or below ``applied`` are skipped, so a batch delivered twice changes nothing.
    A gap (an entry after ``applied + 1`` with nothing in between) raises ValueError.
    """
    ops: list[Op] = list(extra)
    seq = applied
    check = None
    for entry_seq, op, key, value, ts in entries:
        if entry_seq <= seq:
            continue
        if entry_seq != seq + 1:
            raise ValueError(f"gap in the replication log: expected seq {seq + 1}, got {entry_seq}")
        ops.append(entry_op(op, key, value))
        seq = entry_seq
        check = (op, key, value, ts)
    if seq == applied and not extra:
        return applied
    ops.append(Put(META, APPLIED, seq_key(seq)))
    if check is not None:
        ops.append(Put(META, APPLIED_CHECK, b"%d" % entry_check(*check)))
    store.apply(ops, sync=sync)
    return seq
