"""The seed-compatible ``queue`` replication transport.

Leader endpoints (JSON), per replica (``replica=NAME``; a replica that names none is known
by its address):

- ``GET /next-replication-key[?replica=&after=&history=&wait_ms=]`` -> ``{"Key", "Value",
  "Err", "Op", "Seq", "KeyB64", "ValueB64", "History", "Last", "LastMs", "Ts"}``; an empty
  ``Key`` means nothing to replicate yet; 410 means the replica must resync.
- ``GET /delete-replication-key?key=K&value=V[&replica=&seq=]`` -> ``ok`` or 417.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import falcon

from distribkv import hookimpl
from distribkv.http.admin import require_token
from distribkv.http.params import query_params
from distribkv.replication.api import TransportSpec
from distribkv.replication.follower import (
    Diverged,
    Follower,
    LeaderUnavailable,
    Pulled,
    ResyncNeeded,
)
from distribkv.replication.leader import LeaderLog, LeaderRole, leader_log_of, refuse_if_stopping
from distribkv.replication.records import OP_PUT
from distribkv.replication.source import HttpSource

__version__ = "0.1.0"

MAX_WAIT = 10.0


def _b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode()


class Cursors:
    """Per replica: the seq of the last entry it acknowledged."""

    def __init__(self):
        self._lock = threading.Lock()
        self._at: dict[str, int] = {}

    def get(self, replica: str) -> int | None:
        with self._lock:
            return self._at.get(replica)

    def set(self, replica: str, seq: int) -> None:
        with self._lock:
            self._at[replica] = seq


class _QueueResource:
    def __init__(self, node, cursors: Cursors):
        self.node = node
        self.cursors = cursors

    def _request(self, req: falcon.Request) -> tuple[LeaderLog, dict[str, bytes], str]:
        """The leader's log, the parameters, and the replica the request is from."""
        require_token(self.node, req)
        leader = leader_log_of(self.node)
        params = query_params(req)
        # A seed replica does not name itself: its address keeps its progress apart.
        replica = params.get("replica", req.remote_addr.encode()).decode("utf-8", "replace")
        return leader, params, replica


class NextKeyResource(_QueueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader, params, replica = self._request(req)
        refuse_if_stopping(self.node)
        log_store = leader.log
        history = params.get("history", b"").decode("ascii", "replace")
        try:
            wait = min(MAX_WAIT, int(params.get("wait_ms", b"0")) / 1000)
            after = int(params["after"]) if "after" in params else self.cursors.get(replica)
        except ValueError:
            raise falcon.HTTPBadRequest(description="after and wait_ms are integers") from None
        if after is None:
            after = log_store.trimmed  # a replica never seen: from the oldest kept change
        problem = leader.divergence(history, after, params.get("check"))
        if problem or after < log_store.trimmed:
            resp.status = falcon.HTTP_409 if problem else falcon.HTTP_410
            resp.media = {
                "Key": "",
                "Value": "",
                "Err": problem or "resync needed",
                "History": leader.history,
            }
            return
        self.cursors.set(replica, after)
        if history:
            leader.progress.acknowledge(replica, after)
        if wait:
            log_store.wait_for_entries(after, wait)
        entries = log_store.entries_after(after, max_entries=1, max_bytes=1)
        answer: dict[str, Any] = {
            "Key": "",
            "Value": "",
            "Err": None,
            "History": leader.history,
            "Last": log_store.last_seq,
            "LastMs": log_store.last_write_ms,
        }
        if entries:
            seq, op, key, value, ts = entries[0]
            answer.update(
                {
                    "Key": key.decode("utf-8", "replace"),
                    "Value": (value or b"").decode("utf-8", "replace"),
                    "Op": "set" if op == OP_PUT else "delete",
                    "Seq": seq,
                    "KeyB64": _b64(key),
                    "ValueB64": _b64(value),
                    "Ts": ts,
                    "Last": max(log_store.last_seq, seq),
                }
            )
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps(answer).encode()


class DeleteKeyResource(_QueueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader, params, replica = self._request(req)
        cursor = self.cursors.get(replica)
        if cursor is None:
            cursor = leader.log.trimmed
        entries = leader.log.entries_after(cursor, max_entries=1, max_bytes=1)
        matches = False
        if entries:
            seq, _op, key, value, _ts = entries[0]
            if "seq" in params:
                matches = params["seq"] == str(seq).encode() and params.get("key", key) == key
            else:
                matches = params.get("key") == key and params.get("value", b"") == (value or b"")
        if not matches:
            resp.status = falcon.HTTP_417
            resp.content_type = falcon.MEDIA_TEXT
            resp.data = b"not the change this replica was given"
            return
        self.cursors.set(replica, seq)
        leader.progress.acknowledge(replica, seq)
        resp.content_type = falcon.MEDIA_TEXT
        resp.data = b"ok"


class QueueSource(HttpSource):
    """A replica that speaks the seeds' protocol (with the binary-safe extensions); it resyncs
    from the core's snapshot pages like a ``log`` replica."""

    def pull(self, after: int, history: str | None, wait: float, check: int | None) -> Pulled:
        # ``after`` acknowledges the previous change, so this replica needs one round trip per
        # change; replicas of the seeds acknowledge with /delete-replication-key instead.
        target = (
            f"/next-replication-key?replica={self.replica}&after={after}"
            f"&history={history or ''}&wait_ms={int(wait * 1000)}"
        )
        if check is not None:
            target += f"&check={check}"
        response = self.fetch(target, timeout=wait + self.timeout)
        if response.status == 410:
            raise ResyncNeeded("the leader no longer has this replica's next change")
        if response.status == 409:
            raise Diverged(json.loads(response.body).get("Err"))
        doc = self.document(response)
        if doc.get("Err"):
            raise LeaderUnavailable(f"leader error: {doc['Err']}")
        entries = []
        if "Seq" in doc:
            op = OP_PUT if doc["Op"] == "set" else 0
            value = base64.b64decode(doc["ValueB64"]) if op == OP_PUT else None
            entries.append((doc["Seq"], op, base64.b64decode(doc["KeyB64"]), value, doc["Ts"]))
        return Pulled(doc["History"], doc["Last"], doc["LastMs"], entries)


SPEC = TransportSpec(
    name="queue",
    leader=LeaderRole,
    follower=lambda node: Follower(node, QueueSource(node)),
    description="the Go seeds' protocol, one change per round trip; per-replica, binary-safe",
)


@hookimpl
def distribkv_replication_transports() -> list[TransportSpec]:
    return [SPEC]


@hookimpl
def distribkv_routes(node) -> list[tuple[str, Any]]:
    if node.config.cluster.replication != "queue":
        return []
    cursors = Cursors()
    return [
        ("/next-replication-key", NextKeyResource(node, cursors)),
        ("/delete-replication-key", DeleteKeyResource(node, cursors)),
    ]
