"""A shard leader's side of replication, which every transport shares.

:class:`LeaderLog` puts together the three parts of a leader's log, each in a module of its
own: the records in storage (:class:`~distribkv.replication.logstore.LogStore`), the group
committer that appends writes to them (:class:`~distribkv.replication.committer.GroupCommitter`)
and the progress of the replicas (:class:`~distribkv.replication.progress.ProgressTracker`).
:class:`LeaderRole` trims the log in the background. A transport moves entries; it reads them
through ``leader.log`` and reports replicas through ``leader.progress``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import falcon

from distribkv.http.admin import require_token
from distribkv.http.errors import ApiError
from distribkv.http.params import query_params
from distribkv.httpclient import Backoff
from distribkv.metrics.counts import NodeCounts
from distribkv.replication.api import LoopRole
from distribkv.replication.committer import GroupCommitter
from distribkv.replication.logstore import LogStore
from distribkv.replication.progress import ProgressTracker
from distribkv.storage.errors import BackendClosedError
from distribkv.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["LeaderLog", "LeaderRole", "leader_log_of", "leader_request"]


class LeaderLog:
    """Sequence numbers, the log, and replica progress, on one leader."""

    def __init__(
        self,
        store: Store,
        *,
        sync: bool,
        replicas: Sequence[str],
        retention: int,
        group_commit: bool = True,
        counts: NodeCounts | None = None,
    ):
        self.store = store
        self.retention = retention
        self.log = LogStore(store, sync=sync)
        self.committer = GroupCommitter(self.log, group_commit=group_commit, counts=counts)
        self.progress = ProgressTracker(replicas)

    @property
    def history(self) -> str:
        return self.log.history

    def trim(self) -> int:
        """Remove the entries every replica has (keeping at most ``retention``); how many."""
        log_store = self.log
        target = self.progress.trim_target(log_store.last_seq, log_store.trimmed, self.retention)
        return log_store.trim(target)

    def divergence(self, history: str, after: int, check: bytes | None) -> str | None:
        """Why a replica at ``after`` of ``history`` cannot follow this leader, or None.
        ``check`` is the replica's entry_check of its entry at ``after``."""
        log_store = self.log
        if history and history != log_store.history:
            return f"the leader's history is {log_store.history}, the replica follows {history}"
        if after > self.committer.committed_seq():
            return (
                f"the replica applied seq {after} but the leader's log ends at"
                f" {log_store.last_seq}: the leader lost entries"
            )
        if check and after > log_store.trimmed:
            mine = log_store.check_at(after)
            if mine is not None and str(mine).encode() != check:
                return f"entry {after} differs on the leader: it reused sequence numbers"
        return None

    def status(self) -> dict:
        log_store = self.log
        last = log_store.last_seq
        return {
            "history": log_store.history,
            "last_seq": last,
            "trimmed_seq": log_store.trimmed,
            "replicas": self.progress.status(last, log_store.lag_seconds),
        }

    def close(self) -> None:
        self.committer.close()


def leader_request(node, req: falcon.Request) -> tuple[LeaderLog, dict[str, bytes]]:
    """For an internal endpoint only a leader answers: the cluster token checked (401), the
    leader's log (403 on a replica; 503 once the node is stopping, so that a replica's poll
    does not hold up its drain: the replica retries with backoff), and the byte-exact query
    parameters."""
    require_token(node, req)
    leader = leader_log_of(node)
    if leader.log.stopping:
        raise ApiError(falcon.HTTP_503, "stopping", f"{node.name} is stopping; replication pauses")
    params = query_params(req)
    if node.elects:
        # A replica names the term it expects to follow: a leader of an older one (deposed,
        # still running) or one whose leadership lapsed feeds nobody.
        raw = params.get("term")
        expected = int(raw) if raw and raw.isdigit() else 0
        if expected > node.term or not node.leads():
            raise ApiError(
                falcon.HTTP_503,
                "not the leader",
                f"{node.name} does not lead term {expected} (its term: {node.term})",
            )
    return leader, params


def leader_log_of(node) -> LeaderLog:
    """The node's leader log, or 403 naming the leader for a request a replica cannot serve."""
    leader_log = node.leader_log
    if not node.is_leader or leader_log is None:
        leader = node.leader_of(node.me)
        raise ApiError(
            falcon.HTTP_403,
            "not the leader",
            f"{node.name} is a replica; ask its leader at {leader}",
            leader=leader,
        )
    return leader_log


class LeaderRole(LoopRole):
    """The leader side every transport shares: trims the log in the background."""

    def __init__(self, node, *, interval: float = 1.0):
        super().__init__(f"distribkv-trim-{node.name}")
        self.node = node
        self.interval = interval
        self.last_error: str | None = None

    def run(self) -> None:
        backoff = Backoff(self.interval, 60.0)
        wait = self.interval
        while not self.stopping.wait(wait):
            try:
                self.node.leader_log.trim()
            except BackendClosedError:
                return
            except Exception as exc:
                # A trim that failed deleted nothing; the next one does it all.
                self.last_error = f"{type(exc).__name__}: {exc}"
                wait = backoff.next()
                log.exception(
                    "%s: trimming the log failed; trying again in %.1fs", self.node.name, wait
                )
                continue
            self.last_error = None
            backoff.reset()
            wait = self.interval

    def status(self) -> dict:
        return {**self.node.leader_log.status(), "trim_error": self.last_error}
