"""The seed-compatible ``queue`` replication transport.

Leader endpoints (JSON), per replica (``replica=NAME``; a replica that names none is known
by its address):

- ``GET /next-replication-key[?replica=&after=&history=&wait_ms=&binary=1]`` -> ``{"Key",
  "Value", "Err", "Op", "Seq", "KeyB64", "ValueB64", "History", "Last", "LastMs", "Ts"}``;
  an empty ``Key`` means nothing to replicate yet; 410 means the replica must resync.
- ``GET /delete-replication-key?key=K&value=V[&replica=&seq=]`` -> ``ok`` or 417.

A replica of the Go seeds (one that sends neither ``history`` nor ``binary=1``) reads ``Key``
and ``Value`` as JSON text, which cannot carry bytes that are not UTF-8 (its decoder turns them
into U+FFFD, and its acknowledgement then names another change). When its next change has such
a key or value, the leader marks that replica blocked at that seq (``/status``:
``replication.blocked``, logged once) and answers its polls with an empty queue, so that it
waits between polls instead of looping; no other replica is held up.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import weakref
from typing import Any

import falcon

from distribkv import hookimpl
from distribkv.replication.api import TransportSpec
from distribkv.replication.follower import (
    Diverged,
    Follower,
    LeaderUnavailable,
    Pulled,
    ResyncNeeded,
)
from distribkv.replication.leader import LeaderLog, LeaderRole, leader_request
from distribkv.replication.records import OP_PUT
from distribkv.replication.source import HttpSource

__version__ = "0.1.0"

log = logging.getLogger(__name__)

MAX_WAIT = 10.0


def _b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode()


class Cursors:
    """Per replica: the seq of the last entry it acknowledged, and the seed replicas that are
    blocked at a change they cannot represent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._at: dict[str, int] = {}
        #: replica -> {"seq", "reason"}
        self.blocked: dict[str, dict[str, Any]] = {}

    def block(self, replica: str, seq: int, reason: str) -> None:
        with self._lock:
            known = self.blocked.get(replica)
            if known is not None and known["seq"] == seq:
                return
            self.blocked[replica] = {"seq": seq, "reason": reason}
        log.error(
            "seed replica %s is blocked at seq %d: %s; it gets an empty queue until the change"
            " is gone from the log (see the README, 'queue' transport)",
            replica,
            seq,
            reason,
        )

    def unblock(self, replica: str) -> None:
        with self._lock:
            self.blocked.pop(replica, None)

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
        leader, params = leader_request(self.node, req)
        # A seed replica does not name itself: its address keeps its progress apart.
        replica = params.get("replica", req.remote_addr.encode()).decode("utf-8", "replace")
        return leader, params, replica


class NextKeyResource(_QueueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader, params, replica = self._request(req)
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
        # A seed replica sends no history; a client that reads KeyB64 and ValueB64 without
        # following a history says binary=1.
        seed = not history and params.get("binary") != b"1"
        if entries and seed and not _seed_safe(entries[0]):
            # A seed replica would store this change wrongly and loop on it: it waits instead.
            seq, _op, key, value, _ts = entries[0]
            what = "key" if not _is_utf8(key) else "value"
            self.cursors.block(
                replica, seq, f"its {what} is not valid UTF-8, which JSON text cannot carry"
            )
            answer["Blocked"] = self.cursors.blocked.get(replica)
            entries = []
        elif seed:
            self.cursors.unblock(replica)
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
        target = self.poll_target("/next-replication-key", after, history, wait, check)
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


def _is_utf8(data: bytes | None) -> bool:
    try:
        (data or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _seed_safe(entry) -> bool:
    """True if a seed replica can store this change as it is (its JSON text is UTF-8)."""
    _seq, _op, key, value, _ts = entry
    return _is_utf8(key) and _is_utf8(value)


_CURSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cursors_of(node) -> Cursors:
    """The cursors of ``node``'s replicas, shared by its endpoints and its leader role."""
    cursors = _CURSORS.get(node)
    if cursors is None:
        cursors = _CURSORS[node] = Cursors()
    return cursors


class QueueLeaderRole(LeaderRole):
    """The shared leader role, and in ``/status`` the seed replicas that are blocked."""

    def status(self) -> dict:
        return {**super().status(), "blocked": dict(cursors_of(self.node).blocked)}


def routes(node) -> list[tuple[str, Any]]:
    """The seeds' two endpoints, sharing the replicas' cursors."""
    cursors = cursors_of(node)
    return [
        ("/next-replication-key", NextKeyResource(node, cursors)),
        ("/delete-replication-key", DeleteKeyResource(node, cursors)),
    ]


SPEC = TransportSpec(
    name="queue",
    leader=QueueLeaderRole,
    follower=lambda node: Follower(node, QueueSource(node)),
    description="the Go seeds' protocol, one change per round trip; per-replica, binary-safe",
    routes=routes,
)


@hookimpl
def distribkv_replication_transports() -> list[TransportSpec]:
    return [SPEC]
