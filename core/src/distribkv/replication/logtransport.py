"""The ``log`` replication transport (the default): replicas pull batches of log entries.

Wire protocol (msgpack bodies; every endpoint needs the cluster token when one is set):

- ``GET /replication/pull?after=N&replica=NAME&history=H&wait=S`` — entries with seq > N, at
  most ``max_entries`` and ``max_bytes``; waits up to S seconds (long-poll) when there are
  none. Asking for ``after=N`` acknowledges that the replica applied everything up to N. Answers
  ``{"history", "last", "last_ms", "entries": [[seq, op, key, value, ms], ...]}``, or 410 when
  N is below the trimmed log or H is not the leader's history (the replica resyncs).
- ``GET /replication/snapshot?after=KEY&replica=NAME`` — one page of the data (core endpoint).
"""

from __future__ import annotations

import http.client
import logging
from typing import Any
from urllib.parse import quote_from_bytes

import falcon
import msgpack

from distribkv import hookimpl
from distribkv.http.admin import require_token
from distribkv.http.errors import ApiError
from distribkv.http.params import query_params
from distribkv.http.routing import TOKEN_HEADER
from distribkv.replication.api import TransportSpec
from distribkv.replication.follower import (
    Diverged,
    Follower,
    LeaderRole,
    LeaderSource,
    LeaderUnavailable,
    Pulled,
    ResyncNeeded,
)

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
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


def leader_log_of(node):
    if not node.is_leader or node.leader_log is None:
        raise ApiError(
            falcon.HTTP_403,
            "not the leader",
            f"{node.name} is a replica; replicate from {node.me.leader}",
            leader=node.me.leader,
        )
    return node.leader_log


class PullResource:
    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        leader = leader_log_of(self.node)
        params = query_params(req)
        after = _int(params, "after")
        replica = params.get("replica", b"").decode("utf-8", "replace") or req.remote_addr
        history = params.get("history", b"").decode("ascii", "replace")
        wait = min(MAX_WAIT, max(0.0, float(_int(params, "wait_ms", 0)) / 1000))
        max_entries = min(MAX_ENTRIES, max(1, _int(params, "max_entries", MAX_ENTRIES)))
        problem = divergence(leader, history, after, params.get("check"))
        if problem:
            refuse(resp, leader, falcon.HTTP_409, "diverged", problem)
            return
        if after < leader.trimmed:
            refuse(
                resp,
                leader,
                falcon.HTTP_410,
                "resync needed",
                f"entries after {after} are not in the log (kept: {leader.trimmed + 1}..)",
            )
            return
        if history:
            leader.acknowledge(replica, after)
        if wait:
            leader.wait_for_entries(after, wait)
        entries = leader.entries_after(after, max_entries=max_entries, max_bytes=MAX_BYTES)
        last = leader.last_seq  # read after the entries, which are all <= it
        resp.content_type = MSGPACK
        resp.data = msgpack.packb(
            {
                "history": leader.history,
                "last": last,
                "last_ms": leader.last_write_ms,
                "entries": [list(e) for e in entries],
            },
            use_bin_type=True,
        )


def divergence(leader, history: str, after: int, check: bytes | None) -> str | None:
    """Why a replica at ``after`` of ``history`` cannot follow this leader, or None."""
    if history and history != leader.history:
        return f"the leader's history is {leader.history}, the replica follows {history}"
    if after > leader.committed_seq():
        return (
            f"the replica applied seq {after} but the leader's log ends at"
            f" {leader.last_seq}: the leader lost entries"
        )
    if check and after > leader.trimmed:
        mine = leader.check_at(after)
        if mine is not None and str(mine).encode() != check:
            return f"entry {after} differs on the leader: it reused sequence numbers"
    return None


def refuse(resp: falcon.Response, leader, status: str, error: str, detail: str) -> None:
    resp.status = status
    resp.content_type = MSGPACK
    resp.data = msgpack.packb(
        {"error": error, "detail": detail, "history": leader.history}, use_bin_type=True
    )


class SnapshotResource:
    """One page of a consistent-enough snapshot for a full resync (see LeaderLog)."""

    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        leader = leader_log_of(self.node)
        params = query_params(req)
        after = params.get("after")
        page = leader.snapshot_page(after, limit=1000, max_bytes=MAX_BYTES)
        replica = params.get("replica", b"").decode("utf-8", "replace")
        if replica and after is None:
            leader.resyncing(replica, page["seq"])
        resp.content_type = MSGPACK
        resp.data = msgpack.packb(page, use_bin_type=True)


class HttpLeader:
    """Requests from a replica to its leader over one keep-alive connection."""

    def __init__(self, address: str, token: str | None, timeout: float):
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.address = address
        self.timeout = timeout
        self.headers = {TOKEN_HEADER: token} if token else {}
        self._conn: http.client.HTTPConnection | None = None

    def get(self, target: str, timeout: float) -> tuple[int, Any]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._conn.timeout = timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(timeout)
            try:
                self._conn.request("GET", target, headers=self.headers)
                response = self._conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 1 and isinstance(exc, http.client.RemoteDisconnected):
                    continue
                raise LeaderUnavailable(f"leader {self.address}: {exc}") from exc
            if response.will_close:
                self.close()
            doc = None
            if response.getheader("Content-Type", "").startswith(MSGPACK):
                doc = msgpack.unpackb(body, raw=False)
            return response.status, doc if doc is not None else body
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LogSource(LeaderSource):
    def __init__(self, node):
        self.replica = node.node_config.node_name
        self.leader = HttpLeader(node.me.leader, node.token, node.config.server.forward_timeout)

    def pull(self, after: int, history: str | None, wait: float, check: int | None) -> Pulled:
        target = (
            f"/replication/pull?after={after}&replica={self.replica}"
            f"&history={history or ''}&wait_ms={int(wait * 1000)}"
        )
        if check is not None:
            target += f"&check={check}"
        status, doc = self.leader.get(target, timeout=wait + self.leader.timeout)
        detail = doc.get("detail") if isinstance(doc, dict) else str(doc)[:200]
        if status == 410:
            raise ResyncNeeded(detail)
        if status == 409:
            raise Diverged(detail)
        if status != 200 or not isinstance(doc, dict):
            raise LeaderUnavailable(f"leader {self.leader.address} answered {status}: {doc!r:.200}")
        return Pulled(doc["history"], doc["last"], doc["last_ms"], doc["entries"])

    def snapshot_page(self, after_key: bytes | None):
        target = f"/replication/snapshot?replica={self.replica}"
        if after_key is not None:
            target += f"&after={quote_from_bytes(after_key, safe='')}"
        status, doc = self.leader.get(target, timeout=self.leader.timeout * 4)
        if status != 200 or not isinstance(doc, dict):
            raise LeaderUnavailable(f"leader {self.leader.address} answered {status}: {doc!r:.200}")
        return doc

    def close(self) -> None:
        self.leader.close()


SPEC = TransportSpec(
    name="log",
    leader=LeaderRole,
    follower=lambda node: Follower(node, LogSource(node)),
    description="replicas long-poll batches of log entries; resync from snapshots (default)",
)


@hookimpl
def distribkv_replication_transports() -> list[TransportSpec]:
    return [SPEC]


@hookimpl
def distribkv_routes(node) -> list[tuple[str, Any]]:
    if node.config.cluster.replication != "log":
        return []
    return [("/replication/pull", PullResource(node))]
