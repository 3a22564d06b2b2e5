"""The ``log`` replication transport (the default): replicas pull batches of log entries.

Wire protocol (msgpack bodies; every endpoint needs the cluster token when one is set):

- ``GET /replication/pull?after=N&replica=NAME&history=H&wait=S[&term=T]`` — entries with
  seq > N, at most ``max_entries`` and ``max_bytes``; waits up to S seconds (long-poll) when
  there are none. Asking for ``after=N`` acknowledges that the replica applied everything up
  to N. Answers ``{"history", "last", "last_ms", "term", "entries": [[seq, op, key, value,
  ms], ...]}``, or 410 when N is below the trimmed log or H is not the leader's history (the
  replica resyncs). With a coordination that elects, T is the term the replica follows: a
  leader of an older term answers 503, and the replica ignores an answer of an older term.
- ``GET /replication/snapshot?after=KEY&replica=NAME`` — one page of the data (core endpoint).
"""

from __future__ import annotations

import logging

import falcon
import msgpack

from distribkv import hookimpl
from distribkv.http.errors import ApiError
from distribkv.protocol import MSGPACK
from distribkv.replication.api import TransportSpec
from distribkv.replication.follower import (
    Diverged,
    Follower,
    LeaderUnavailable,
    Pulled,
    ResyncNeeded,
)
from distribkv.replication.leader import LeaderLog, LeaderRole, leader_request
from distribkv.replication.source import HttpSource

log = logging.getLogger(__name__)

MAX_ENTRIES = 2000
MAX_BYTES = 4 * 1024 * 1024
MAX_WAIT = 10.0


def _int(params: dict[str, bytes], name: str, default: int | None = None) -> int:
    raw = params.get(name)
    if raw is None:
        if default is None:
            raise ApiError(falcon.HTTP_400, "bad request", f"the {name!r} parameter is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(falcon.HTTP_400, "bad request", f"{name!r} must be an integer") from None


class PullResource:
    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader, params = leader_request(self.node, req)
        term = self.node.term  # of the log answered from, read before any wait
        log_store = leader.log
        after = _int(params, "after")
        replica = params.get("replica", b"").decode("utf-8", "replace") or req.remote_addr
        history = params.get("history", b"").decode("ascii", "replace")
        wait = min(MAX_WAIT, max(0.0, float(_int(params, "wait_ms", 0)) / 1000))
        max_entries = min(MAX_ENTRIES, max(1, _int(params, "max_entries", MAX_ENTRIES)))
        problem = leader.divergence(history, after, params.get("check"))
        if problem:
            refuse(resp, leader, falcon.HTTP_409, "diverged", problem)
            return
        if after < log_store.trimmed:
            refuse(
                resp,
                leader,
                falcon.HTTP_410,
                "resync needed",
                f"entries after {after} are not in the log (kept: {log_store.trimmed + 1}..)",
            )
            return
        if history:
            leader.progress.acknowledge(replica, after)
        if wait:
            log_store.wait_for_entries(after, wait)
            if self.node.elects and (not self.node.leads() or self.node.term != term):
                raise ApiError(
                    falcon.HTTP_503,
                    "not the leader",
                    f"{self.node.name} stopped leading term {term} while the replica waited",
                )
        entries = log_store.entries_after(after, max_entries=max_entries, max_bytes=MAX_BYTES)
        last = log_store.last_seq  # read after the entries, which are all <= it
        resp.content_type = MSGPACK
        resp.data = msgpack.packb(
            {
                "history": log_store.history,
                "last": last,
                "last_ms": log_store.last_write_ms,
                "term": term,
                "entries": [list(e) for e in entries],
            },
            use_bin_type=True,
        )


def refuse(resp: falcon.Response, leader: LeaderLog, status: str, error: str, detail: str) -> None:
    resp.status = status
    resp.content_type = MSGPACK
    resp.data = msgpack.packb(
        {"error": error, "detail": detail, "history": leader.history}, use_bin_type=True
    )


class LogSource(HttpSource):
    def pull(self, after: int, history: str | None, wait: float, check: int | None) -> Pulled:
        target = self.poll_target("/replication/pull", after, history, wait, check)
        response = self.fetch(target, timeout=wait + self.timeout)
        if response.status in (409, 410):
            try:
                detail = response.document().get("detail")
            except (ValueError, AttributeError):
                detail = response.body[:200].decode(errors="replace")
            raise (ResyncNeeded if response.status == 410 else Diverged)(detail)
        doc = self.document(response)
        if self.term is not None and "term" in doc and int(doc["term"]) < self.term:
            # Entries of an older term than the one this replica follows: from a deposed
            # leader (the leader checks this too; a replica does not rely on it).
            raise LeaderUnavailable(
                f"{self.address} answered for term {doc.get('term', 0)}; this replica follows"
                f" term {self.term}"
            )
        return Pulled(doc["history"], doc["last"], doc["last_ms"], doc["entries"])


@hookimpl
def distribkv_replication_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            "log",
            LeaderRole,
            lambda node: Follower(node, LogSource(node)),
            "replicas long-poll batches of log entries; resync from snapshots (default)",
            routes=lambda node: [("/replication/pull", PullResource(node))],
        )
    ]
