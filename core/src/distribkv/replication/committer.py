"""The group committer: concurrent writes share one storage apply (one fsync with
``durability = "sync"``), and every write gets its seq in the order of the applies.

A write joins a queue. A writer that finds no group being applied leads: it takes the whole
queue and applies it as ONE :meth:`~distribkv.replication.logstore.LogStore.append`, in queue
order, while later writers queue up. Then it wakes each writer of its group, and hands the lead
to the oldest queued writer, who applies the next group. A deferred write (:meth:`submit`) has
no thread of its own waiting: the committer thread, started with the first one, leads a group
whose oldest write is deferred, and calls each deferred write's callback once it is applied.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from distribkv.metrics.counts import NodeCounts
from distribkv.replication.logstore import LogStore
from distribkv.storage.api import Op
from distribkv.storage.errors import BackendClosedError

log = logging.getLogger(__name__)

__all__ = ["GroupCommitter"]


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
        # A lock of its own for a writer that waits; none for a deferred write (the hot path
        # makes no lock it does not need).
        self.wake: Any = None
        if callback is None:
            self.wake = threading.Lock()
            self.wake.acquire()


class GroupCommitter:
    """The queue of writes of one leader's log, and who applies them when."""

    def __init__(
        self, log_store: LogStore, *, group_commit: bool = True, counts: NodeCounts | None = None
    ):
        self.log = log_store
        self.group_commit = group_commit
        #: Where each group's size and apply time are counted (None: not counted).
        self.counts = counts
        self._queue_lock = threading.Lock()
        self._flushed = threading.Condition(self._queue_lock)
        self._queue: list[_Pending] = []
        self._flushing = False
        self._enqueued = 0  # writes queued so far
        self._completed = 0  # of those, applied or failed (always a prefix: groups are FIFO)
        self._seq_waiters = 0  # threads in committed_seq(), waiting on _flushed
        # Deferred writes have no thread of their own to lead a group: a committer thread,
        # started with the first one, leads when the oldest queued write is deferred.
        self._committer: threading.Thread | None = None
        self._commit_turns: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._closed = False

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
            if self._closed:
                raise BackendClosedError("the leader's log is closed; the write was not queued")
            if request.callback is not None:
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
        """Refuse every write from now on, let the queued ones be applied, then stop the
        committer thread: once this returns, nothing more is written through this log."""
        with self._queue_lock:
            self._closed = True
        self.committed_seq()  # every write queued before is applied (or failed)
        with self._queue_lock:
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
        started = time.monotonic()
        try:
            self._flush(group)
            if self.counts is not None:  # one group at a time: no lock needed
                self.counts.committed(len(group), time.monotonic() - started)
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
                    self.log.interrupted()
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
                self.log.announce()
        return lead_next

    def _flush(self, group: list[_Pending]) -> None:
        """Apply ``group`` as one append; if that fails, each write alone, so that one bad
        write fails alone and the others go through."""
        try:
            seqs = self.log.append([request.ops for request in group])
        except Exception as exc:  # noqa: BLE001 - handed to the writer, which raises it
            if len(group) == 1:
                group[0].error = exc
                group[0].done = True
                return
            for request in group:  # find the write that failed; the others go through
                self._flush([request])
            return
        for request, last in zip(group, seqs, strict=True):
            request.seq = last
            request.done = True

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
            return self.log.last_seq
