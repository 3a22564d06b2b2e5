"""The replica side every transport shares: apply entries in order, resync when needed.

A transport provides a :class:`LeaderSource` (how to pull entries and snapshot pages from the
leader); :class:`Follower` runs the loop: pull after the applied seq, apply the batch together
with the new applied seq in one storage apply, repeat. A pull for trimmed history, or a leader
with another history id, starts a full resync: the replica's data is cleared and reloaded from
snapshot pages, then the log is applied from the seq read before the first page.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from distribkv.httpclient import Backoff
from distribkv.replication.api import LoopRole
from distribkv.replication.records import (
    APPLIED,
    APPLIED_CHECK,
    FOLLOWS,
    RESYNC,
    SNAPSHOT_SEQ,
    Entry,
    entry_check,
    entry_op,
    read_seq,
    seq_key,
)
from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.errors import BackendClosedError
from distribkv.storage.store import Store

log = logging.getLogger(__name__)

DATA, META = Namespace.DATA, Namespace.META
BACKOFF_MIN, BACKOFF_MAX = 0.05, 5.0


class ResyncNeeded(Exception):
    """The leader cannot continue this replica's history (trimmed log or new history id)."""


class Diverged(Exception):
    """The leader's history is not the one this replica holds (the leader's disk was replaced,
    or it lost entries this replica has). The replica keeps its data and stops following until
    an operator decides (see README: rebuilding a leader)."""


class LeaderUnavailable(Exception):
    """The leader could not be reached or answered with an error; retried with backoff."""


@attrs.frozen
class Pulled:
    history: str
    last_seq: int
    last_ms: int
    #: (seq, op, key, value, leader time in ms), ordered by seq
    entries: list


class ResyncProgress:
    """How far a full resync is: what ``/status`` shows as ``replication.resync`` while it runs
    and after it ended (the last one), so that an operator sees a replica reload its data and
    a metrics exporter can turn the numbers into gauges.

    ``keys_total`` is the leader's key count when the resync started (an engine's estimate for
    some backends; None when the engine cannot count cheaply), so ``keys_copied`` may end a
    little off it. Written by the follower's thread only; read by ``/status``."""

    def __init__(self, reason: str, clock=time.monotonic, wall=time.time):
        self.reason = reason
        self._clock = clock
        self.started_at = wall()
        self._started = clock()
        self._wall = wall
        self.finished_at: float | None = None
        self._seconds: float | None = None
        self.keys_total: int | None = None
        self.keys_copied = 0
        self.bytes_copied = 0
        self.outcome = "running"

    def copied(self, keys: int, size: int) -> None:
        self.keys_copied += keys
        self.bytes_copied += size

    def end(self, outcome: str) -> None:
        """``outcome``: "done", "failed" (it starts again) or "stopped" (the node stops)."""
        self.outcome = outcome
        self.finished_at = self._wall()
        self._seconds = self._clock() - self._started

    @property
    def seconds(self) -> float:
        return self._seconds if self._seconds is not None else self._clock() - self._started

    def status(self) -> dict[str, Any]:
        seconds = self.seconds
        return {
            "active": self.outcome == "running",
            "outcome": self.outcome,
            "reason": self.reason,
            "started_at": round(self.started_at, 3),
            "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
            "seconds": round(seconds, 3),
            "keys_total": self.keys_total,
            "keys_copied": self.keys_copied,
            "bytes_copied": self.bytes_copied,
            "keys_per_s": round(self.keys_copied / seconds, 1) if seconds > 0 else 0.0,
            "bytes_per_s": round(self.bytes_copied / seconds, 1) if seconds > 0 else 0.0,
        }


class LeaderSource(abc.ABC):
    """How a transport reaches the leader."""

    @abc.abstractmethod
    def pull(self, after: int, history: str | None, wait: float, check: int | None) -> Pulled:
        """Entries after ``after``; acknowledges ``after``. ``check`` is the entry_check of the
        entry at ``after`` (None if unknown). Raises ResyncNeeded, Diverged or
        LeaderUnavailable."""

    @abc.abstractmethod
    def snapshot_page(self, after_key: bytes | None) -> Mapping[str, Any]:
        """``{"history", "seq", "pairs", "done"}`` (see
        :func:`distribkv.replication.snapshot.snapshot_page`)."""

    def close(self) -> None:  # noqa: B027 - optional: most sources hold one connection
        """Release connections."""


class Follower(LoopRole):
    def __init__(self, node, source: LeaderSource, *, wait: float = 2.0):
        super().__init__(f"distribkv-follow-{node.name}")
        self.node = node
        self.store = node.store
        self.source = source
        self.wait = wait
        self.sync = node.sync
        self.applied = read_seq(self.store, APPLIED)
        follows = self.store.get(FOLLOWS, META)
        self.follows = follows.decode() if follows else None
        self.snapshot_seq = read_seq(self.store, SNAPSHOT_SEQ)
        self.needs_resync = self.follows is None or self.store.get(RESYNC, META) is not None
        check = self.store.get(APPLIED_CHECK, META)
        self.applied_check = int(check) if check else None
        self.diverged: str | None = None
        self.state = "starting"
        self.last_error: str | None = None
        self.leader_last = self.applied
        self.leader_last_ms = 0
        self.applied_ms = 0
        self.resyncs = 0
        #: Why the next resync happens (for its log line and ``/status``).
        self.resync_reason = "a new replica" if self.follows is None else "an unfinished resync"
        #: The resync under way, or the last one (None before the first).
        self.resync: ResyncProgress | None = None
        # Held while entries or a snapshot page are applied: freeze() waits for it, not for
        # a pull that may hang on an unreachable leader.
        self._applying = threading.Lock()

    # --- role -------------------------------------------------------------------------

    def stopped(self) -> None:
        self.source.close()

    @property
    def readable(self) -> bool:
        """False while the data is incomplete (a resync has not reached a consistent seq)."""
        return not self.needs_resync and self.applied >= self.snapshot_seq

    def lag(self) -> tuple[int, float]:
        entries = max(0, self.leader_last - self.applied)
        seconds = 0.0 if entries == 0 else max(0.0, (self.leader_last_ms - self.applied_ms) / 1000)
        return entries, seconds

    def status(self) -> dict:
        entries, seconds = self.lag()
        return {
            "state": self.state,
            "follows_history": self.follows,
            "applied_seq": self.applied,
            "leader_last_seq": self.leader_last,
            "lag_entries": entries,
            "lag_seconds": round(seconds, 3),
            "readable": self.readable,
            "resyncs": self.resyncs,
            "resync": None if self.resync is None else self.resync.status(),
            "diverged": self.diverged,
            "last_error": self.last_error,
        }

    def freeze(self) -> None:
        """Stop applying now: once this returns, the applied seq changes no more. Unlike
        :meth:`stop` it does not wait for a pull under way (a partitioned leader may hold it
        until its timeout); the thread ends when that pull returns, applying nothing."""
        self.stopping.set()
        self.wake.set()
        with self._applying:
            pass

    def request_resync(self) -> None:
        """Operator decision: drop this replica's data and reload it from the leader."""
        self.diverged = None
        self.needs_resync = True
        self.resync_reason = "requested (POST /replication/resync)"
        self.wake.set()

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while not self.stopping.is_set():
            if self.diverged is not None:
                # Keep the data, keep serving reads; wait for an operator's resync request.
                self.state = "diverged"
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                if self.needs_resync:
                    self._resync()
                    continue
                pulled = self.source.pull(self.applied, self.follows, self.wait, self.applied_check)
                with self._applying:
                    if self.stopping.is_set():
                        break
                    self._apply(pulled)
                self.state = "following"
                self.last_error = None
                backoff.reset()
            except ResyncNeeded as exc:
                log.warning("%s: full resync needed: %s", self.node.name, exc)
                self.needs_resync = True
                self.resync_reason = str(exc)
            except Diverged as exc:
                self.diverged = str(exc)
                log.error(
                    "%s: stopped following: %s; this replica keeps its data until a"
                    " resync is requested (POST /replication/resync)",
                    self.node.name,
                    exc,
                )
            except BackendClosedError:
                break
            except Exception as exc:
                # A leader that cannot be reached answers LeaderUnavailable; anything else (a
                # malformed answer, a storage error) is unexpected, and its traceback is logged.
                self.state = "retrying"
                self.last_error = f"{type(exc).__name__}: {exc}"
                wait = backoff.next()
                if isinstance(exc, LeaderUnavailable):
                    log.info(
                        "%s: replication paused (%s); retrying in %.2fs",
                        self.node.name,
                        self.last_error,
                        wait,
                    )
                else:
                    log.exception("%s: replication failed; retrying in %.2fs", self.node.name, wait)
                self.stopping.wait(wait)

    def _apply(self, pulled: Pulled) -> None:
        self.leader_last = pulled.last_seq
        self.leader_last_ms = pulled.last_ms
        if pulled.entries:
            self.applied = apply_entries(self.store, pulled.entries, self.applied, sync=self.sync)
            last = pulled.entries[-1]
            self.applied_ms = last[4]
            if last[0] == self.applied:
                self.applied_check = entry_check(*last[1:])
        if self.applied >= self.leader_last:
            self.applied_ms = self.leader_last_ms

    def _resync(self) -> None:
        progress = self.resync = ResyncProgress(self.resync_reason)
        log.info(
            "%s: resync started (%s): this replica's data is dropped and reloaded from the"
            " leader; reads get 503 until it is done",
            self.node.name,
            progress.reason,
        )
        outcome = "failed"
        try:
            if self._reload(progress):
                outcome = "done"
            elif self.stopping.is_set():
                outcome = "stopped"
        finally:
            progress.end(outcome)
        if outcome == "done":
            # Caught up to the snapshot: following from here, also while the next pull waits
            # for new entries (a long-poll that would otherwise leave "resyncing" shown).
            self.state = "following"
            status = progress.status()
            log.info(
                "%s: resync done: %d keys (%d bytes) in %.1fs from the leader (history %s,"
                " seq %d..%d)",
                self.node.name,
                progress.keys_copied,
                progress.bytes_copied,
                status["seconds"],
                self.follows,
                self.applied,
                self.snapshot_seq,
            )
        elif outcome == "failed":
            # The loop logs why and tries again; the next try logs its own start.
            self.resync_reason = "the previous resync failed"

    def _reload(self, progress: ResyncProgress) -> bool:
        """Clear the data and load the leader's snapshot; True once it is complete."""
        self.state = "resyncing"
        store = self.store
        store.put(RESYNC, b"1", ns=META, sync=self.sync)
        self.needs_resync = True
        # Clear what this replica had; the snapshot replaces it.
        while not self.stopping.is_set():
            with store.scan(DATA, limit=1000) as pairs:
                keys = [key for key, _ in pairs]
            if not keys:
                break
            store.apply([Delete(DATA, key) for key in keys], sync=False)
        page = self.source.snapshot_page(None)
        history, first_seq = page["history"], page["seq"]
        progress.keys_total = page.get("keys_total")
        last_seq = first_seq
        while True:
            if self.stopping.is_set():
                return False
            pairs = page["pairs"]
            if pairs:
                with self._applying:
                    if self.stopping.is_set():
                        return False
                    store.apply([Put(DATA, key, value) for key, value in pairs], sync=False)
                progress.copied(len(pairs), sum(len(k) + len(v) for k, v in pairs))
            if page["history"] != history:
                raise ResyncNeeded("the leader's history changed during the resync")
            last_seq = max(last_seq, page.get("seq_after", page["seq"]))
            if page["done"] or not pairs:
                break
            page = self.source.snapshot_page(pairs[-1][0])
        with self._applying:
            if self.stopping.is_set():
                return False  # frozen: the data stays marked incomplete
            store.apply(
                [
                    Put(META, APPLIED, seq_key(first_seq)),
                    Put(META, FOLLOWS, history.encode()),
                    Put(META, SNAPSHOT_SEQ, seq_key(last_seq)),
                    Delete(META, APPLIED_CHECK),
                    Delete(META, RESYNC),
                ],
                sync=True,
            )
        self.applied, self.follows, self.snapshot_seq = first_seq, history, last_seq
        self.applied_check = None
        self.needs_resync = False
        self.resyncs += 1
        counts = getattr(self.node, "metrics", None)
        if counts is not None:
            counts.bump("resyncs")
        return True


def apply_entries(
    store: Store,
    entries: Iterable[Entry],
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


__all__ = [
    "Diverged",
    "Follower",
    "LeaderSource",
    "LeaderUnavailable",
    "Pulled",
    "ResyncNeeded",
    "ResyncProgress",
    "apply_entries",
]
