"""The leader's log in storage: sequence numbers, log records, reading and trimming them.

:meth:`LogStore.append` writes a group of writes as ONE storage apply: their data ops, the log
records of their entries (see :mod:`distribkv.replication.records`) and the new last seq, so
the log can never disagree with the data. Who calls it, and when, is the group committer's
business (:mod:`distribkv.replication.committer`); how far the log may be trimmed is the
replicas' (:mod:`distribkv.replication.progress`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence

from distribkv.replication.records import (
    APPLIED,
    FOLLOWS,
    HISTORY,
    LAST_SEQ,
    RECORD_BYTES,
    RECORD_ENTRIES,
    RESYNC,
    TRIMMED,
    Entry,
    decode_record,
    encode_record,
    ensure_history,
    entry_check,
    read_seq,
    seq_key,
)
from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.errors import StorageError
from distribkv.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["TRIM_BATCH", "LogStore"]

META, LOG = Namespace.META, Namespace.LOG
#: Most log records one trim deletes in one storage apply.
TRIM_BATCH = 1000


class LogStore:
    """One leader's log: its history id, last and trimmed seq, and the records in storage."""

    def __init__(self, store: Store, *, sync: bool):
        self.store = store
        self.sync = sync
        self.history = ensure_history(store, sync=sync)
        self._adopt_followed_history()
        self.last_seq = read_seq(store, LAST_SEQ)
        self.trimmed = read_seq(store, TRIMMED)
        self.last_write_ms = int(time.time() * 1000)
        # The keys of the log records written since start-up, oldest first, so that a trim
        # deletes the records there are (one per group commit), not every seq. Below
        # ``_unlisted_upto`` records may exist that are not listed (written before start-up, or
        # by an interrupted apply): a trim deletes every seq there.
        self._records: collections.deque[int] = collections.deque()
        self._unlisted_upto = self.last_seq
        # An interrupted apply may or may not have happened: the next one reads the last seq
        # from storage before it gives out any.
        self._seq_unknown = False
        self._appended = threading.Condition(threading.Lock())
        # Threads waiting for new entries: an append notifies only when there are some (they
        # count themselves in before they look at last_seq, which an append sets before
        # :meth:`announce` looks at this count).
        self._waiters = 0
        self._stopping = False

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

    # --- writing ----------------------------------------------------------------------------

    def append(self, writes: Sequence[Sequence[Op]]) -> list[int]:
        """Apply ``writes`` in order with their log records and the new last seq, as one
        storage apply (durable on return with ``sync``); the last seq of each write. If it
        raises, nothing of it counts: no seq was given out."""
        if self._seq_unknown:
            # An engine that stopped taking writes (a full disk) recovers first, so that the
            # last seq read is the one the recovered engine holds.
            self.store.recover()
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
        for ops in writes:
            for op in ops:
                size = len(op.key) + (len(op.value) if type(op) is Put else 0)
                if record and (len(record) == RECORD_ENTRIES or record_bytes + size > RECORD_BYTES):
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
        try:
            self.store.apply(batch, sync=self.sync)
        except StorageError:
            # Refused, or failed in the engine: a write that failed while it was being synced
            # can be readable (and may or may not survive a reopen), so the next append takes
            # the last seq from storage rather than from memory.
            self._seq_unknown = True
            raise
        self._records.extend(records)
        self.last_seq = seq
        self.last_write_ms = now_ms
        return seqs

    def interrupted(self) -> None:
        """An append was interrupted (not refused): it may or may not have been applied, so
        the next one reads the last seq from storage first, and no seq is given out twice."""
        self._seq_unknown = True

    def announce(self) -> None:
        """Wake the threads waiting in :meth:`wait_for_entries` (after an append)."""
        if self._waiters:
            with self._appended:
                self._appended.notify_all()

    # --- reading ----------------------------------------------------------------------------

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

    def entries_after(self, after: int, *, max_entries: int, max_bytes: int) -> list[Entry]:
        """Entries with seq > after, in order, bounded in count and bytes (at least one); only
        applied ones (<= last_seq). A group's records can be readable before its apply returns
        (RocksDB: before its WAL sync), and nothing is handed out before it is acknowledged."""
        out: list[Entry] = []
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

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop_waiting` was called: the node is stopping."""
        return self._stopping

    def stop_waiting(self) -> None:
        """The node is stopping: every :meth:`wait_for_entries` ends now, and later ones return
        at once, so that no replica's long-poll holds up the node's drain."""
        with self._appended:
            self._stopping = True
            self._appended.notify_all()

    def wait_for_entries(self, after: int, timeout: float) -> bool:
        """Block until the log has an entry after ``after`` (True), ``timeout`` passes or the
        node is stopping (False)."""
        deadline = time.monotonic() + timeout
        with self._appended:
            self._waiters += 1
            try:
                while self.last_seq <= after and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._appended.wait(remaining)
            finally:
                self._waiters -= 1
        return self.last_seq > after

    def lag_seconds(self, acked: int) -> float | None:
        """How old the oldest entry a replica at ``acked`` has not applied is (0 when caught
        up; None when unknown)."""
        if acked < 0:
            return None
        if acked >= self.last_seq:
            return 0.0
        entry = self.entry_at(acked + 1)
        if entry is None:
            return None
        return max(0.0, time.time() - entry[3] / 1000)

    # --- trimming ---------------------------------------------------------------------------

    def trim(self, target: int) -> int:
        """Remove the entries up to ``target`` (never past the last seq); returns how many."""
        target = min(target, self.last_seq)
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
