"""What a leader knows of its replicas: how far each applied its log, and who else still
reads the log (a reshard copying keys away). From it follow how far the log may be trimmed and
whether a write reached ``min_replicas``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["ProgressTracker", "ReplicaProgress"]


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


class ProgressTracker:
    """The progress of every replica of one leader, and the holds of other readers."""

    def __init__(self, replicas: Sequence[str] = ()):
        self._changed = threading.Condition(threading.Lock())
        self.replicas = {name: ReplicaProgress(name) for name in replicas}
        #: Readers of the log that are not replicas (a reshard copying keys away): name ->
        #: (the oldest seq they still need, when the hold lapses). Not counted as replicas.
        self.holds: dict[str, tuple[int, float]] = {}

    def _of(self, replica: str) -> ReplicaProgress:
        progress = self.replicas.get(replica)
        if progress is None:
            progress = self.replicas[replica] = ReplicaProgress(replica)
        return progress

    def acknowledge(self, replica: str, applied: int) -> None:
        """``replica`` applied everything up to ``applied``."""
        with self._changed:
            progress = self._of(replica)
            progress.acked = max(progress.acked, applied) if progress.acked >= 0 else applied
            progress.last_seen = time.time()
            self._changed.notify_all()

    def resyncing(self, replica: str, from_seq: int) -> None:
        """A replica starts a full resync: keep the log after ``from_seq`` for it; it has
        acknowledged nothing of this history yet."""
        with self._changed:
            progress = self._of(replica)
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
            while sum(p.acked >= seq for p in self.replicas.values()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def wait_applied(self, replica: str, seq: int, timeout: float) -> bool:
        """Block until ``replica`` acknowledged ``seq`` (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._of(replica).acked < seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def trim_target(self, last: int, trimmed: int, retention: int) -> int:
        """How far a log that ends at ``last`` and is trimmed to ``trimmed`` may be trimmed:
        below every replica, but keeping at most ``retention`` entries, and never what a
        resyncing replica or a hold still needs."""
        with self._changed:
            floors = [p.floor for p in self.replicas.values()]
            needed = [p.retain for p in self.replicas.values() if p.acked < 0 <= p.retain]
            now = time.monotonic()
            for name, (_, until) in list(self.holds.items()):
                if until < now:
                    del self.holds[name]
            needed += [after for after, _ in self.holds.values()]
        if not floors:
            floor = last  # no replicas: nobody needs the log
        elif min(floors) < 0:
            floor = trimmed  # a replica has not reported since start-up
        else:
            floor = min(floors)
        # Never keep more than `retention` entries, even for a replica that is far behind:
        # it then resyncs from a snapshot instead.
        target = max(floor, last - retention)
        # A replica in the middle of a resync (or a reshard's copy, while its hold lasts) needs
        # the log from its snapshot on, whatever the cap says; otherwise a busy leader could
        # make it start over forever.
        return min([target, last, *needed])

    def status(self, last: int, lag_seconds: Callable[[int], float | None]) -> dict:
        """Per replica: applied seq, lag in entries and seconds, when it was last heard of."""
        now = time.time()
        with self._changed:
            progress = sorted(self.replicas.items())
        replicas = {}
        for name, p in progress:
            seconds = lag_seconds(p.acked)
            replicas[name] = {
                "applied_seq": None if p.acked < 0 else p.acked,
                "lag_entries": None if p.acked < 0 else last - p.acked,
                "lag_seconds": None if seconds is None else round(seconds, 3),
                "last_seen_s_ago": None if not p.last_seen else round(now - p.last_seen, 3),
            }
        return replicas
