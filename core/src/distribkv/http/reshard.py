"""Internal endpoints that ``distribkv reshard`` drives (cluster token required when set).

JSON bodies carry maps as ``/cluster`` publishes them; data travels as msgpack.

- ``GET /reshard/state`` — the map this node serves and the move it is part of.
- ``POST /reshard/plan`` ``{source, target}`` — per move ``"old>new"`` the count and digest of
  the keys this node holds that change owner (also the verification of a copy).
- ``POST /reshard/prepare`` ``{id, source, target, phase}`` — enter a phase (see
  :mod:`distribkv.transition`); on a leader it answers the last seq after the change, so every
  later write saw it.
- ``POST /reshard/commit`` ``{id, source, target}`` (fingerprints) and ``/reshard/abort``.
- Leaders only: ``POST /reshard/clean`` (drop stale copies of arriving keys), ``GET
  /reshard/scan?after=KEY`` (pages of leaving keys), ``GET /reshard/log?after=SEQ`` (log entries
  of leaving keys; 410 when trimmed) and ``POST /reshard/ingest`` (apply copied keys).
"""

from __future__ import annotations

import json

import falcon
import msgpack
from xxhash import xxh3_128

from distribkv.http.admin import require_token
from distribkv.http.errors import ApiError
from distribkv.protocol import MSGPACK
from distribkv.replication.leader import LeaderLog, leader_log_of, leader_request
from distribkv.replication.records import entry_op
from distribkv.replication.snapshot import snapshot_page
from distribkv.storage.api import Delete, Namespace
from distribkv.transition import Transition, map_from_description

PAGE_KEYS = 1000
PAGE_BYTES = 4 * 1024 * 1024
MAX_LOG_ENTRIES = 5000
#: How long the log is kept for a reshard that stopped reading it.
HOLD_TTL = 600.0


def _json_body(req: falcon.Request) -> dict:
    try:
        data = json.loads(req.bounded_stream.read(16 * 1024 * 1024) or b"{}")
    except ValueError as exc:
        raise ApiError(falcon.HTTP_400, "bad request", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(falcon.HTTP_400, "bad request", "the body must be a JSON object")
    return data


def _field(data: dict, name: str):
    if name not in data:
        raise ApiError(falcon.HTTP_400, "bad request", f"the {name!r} field is required")
    return data[name]


def _maps(node, data: dict):
    try:
        source = map_from_description(node.registry, _field(data, "source"), "source map")
        target = map_from_description(node.registry, _field(data, "target"), "target map")
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(falcon.HTTP_400, "bad map", str(exc)) from None
    return source, target


def _transition(node, transition_id: str | None) -> Transition:
    transition = node.maps.transition
    if transition is None or transition.id != transition_id:
        raise ApiError(
            falcon.HTTP_409,
            "no such reshard",
            f"{node.name} is not part of reshard {transition_id}"
            + (f" (it is part of {transition.id})" if transition else ""),
        )
    return transition


def _copying(node, transition_id) -> Transition:
    """The transition, which must still be copying: data that was verified stays as it is."""
    transition = _transition(node, transition_id)
    if transition.phase not in ("copy", "fence"):
        raise ApiError(
            falcon.HTTP_409,
            "copy is over",
            f"reshard {transition.id} is in phase {transition.phase} on {node.name}; its copies"
            " are verified and no longer change",
        )
    return transition


def _pack(resp: falcon.Response, doc) -> None:
    resp.content_type = MSGPACK
    resp.data = msgpack.packb(doc, use_bin_type=True)


def _sent(node, count: int) -> None:
    """Count keys served to a reshard's copy (for ``distribkv_reshard_keys_sent_total``)."""
    if count and node.metrics is not None:
        node.metrics.bump("reshard_keys_sent", count)


def _hold_name(transition: Transition) -> str:
    return f"reshard:{transition.id}"


class _Endpoint:
    """An endpoint of the reshard driver on one node (each needs the cluster token)."""

    def __init__(self, node):
        self.node = node

    def _leader_move(self, req: falcon.Request) -> tuple[LeaderLog, dict[str, bytes], Transition]:
        """A leader's endpoint of the move named by ``id``: its log, the parameters and the
        move (401, 403 on a replica, 409 for another move)."""
        leader, params = leader_request(self.node, req)
        return leader, params, _transition(self.node, params.get("id", b"").decode())


class StateResource(_Endpoint):
    def on_get(self, req, resp):
        require_token(self.node, req)
        resp.media = self.node.maps.describe()


class PlanResource(_Endpoint):
    """Count and digest, per move, the keys this node holds that change owner."""

    def on_post(self, req, resp):
        require_token(self.node, req)
        source, target = _maps(self.node, _json_body(req))
        me = self.node.me.name
        moves: dict[str, list] = {}
        total = 0
        with self.node.store.scan(Namespace.DATA) as pairs:
            for key, value in pairs:
                total += 1
                old, new = source.owner_of(key).name, target.owner_of(key).name
                if old == new or me not in (old, new):
                    continue
                move = moves.get(f"{old}>{new}")
                if move is None:
                    move = moves[f"{old}>{new}"] = [0, xxh3_128()]
                move[0] += 1
                move[1].update(len(key).to_bytes(4, "big") + key)
                move[1].update(len(value).to_bytes(8, "big") + value)
        resp.media = {
            "node": self.node.name,
            "keys": total,
            "moves": {
                name: {"keys": count, "digest": hasher.hexdigest()}
                for name, (count, hasher) in sorted(moves.items())
            },
        }


class PrepareResource(_Endpoint):
    def on_post(self, req, resp):
        node = self.node
        require_token(node, req)
        data = _json_body(req)
        source, target = _maps(node, data)
        transition = Transition(str(_field(data, "id")), source, target, _field(data, "phase"))
        try:
            state = node.maps.prepare(transition)
        except ValueError as exc:
            raise ApiError(falcon.HTTP_409, "cannot prepare", str(exc)) from None
        answer = {"node": node.name, "state": state}
        if node.is_leader:
            # Read under the write lock: every write after this seq saw the new phase.
            answer["seq"] = node.leader_log.committer.committed_seq()
        resp.media = answer


class _MapChange(_Endpoint):
    """Commit or abort a move on this node (by the move's id); a leader then stops keeping its
    log for the move."""

    verb = ""

    def change(self, data: dict) -> str:
        raise NotImplementedError

    def published(self) -> dict:
        return {}

    def on_post(self, req, resp):
        node = self.node
        require_token(node, req)
        data = _json_body(req)
        try:
            state = self.change(data)
        except ValueError as exc:
            raise ApiError(falcon.HTTP_409, f"cannot {self.verb}", str(exc)) from None
        if node.is_leader:
            node.leader_log.progress.release(f"reshard:{data['id']}")
        resp.media = {"node": node.name, "state": state, **self.published()}


class CommitResource(_MapChange):
    verb = "commit"

    def change(self, data: dict) -> str:
        ids = (str(_field(data, name)) for name in ("id", "source", "target"))
        return self.node.maps.commit(*ids)

    def published(self) -> dict:
        return {"fingerprint": self.node.shard_map.fingerprint}


class AbortResource(_MapChange):
    verb = "abort"

    def change(self, data: dict) -> str:
        return self.node.maps.abort(str(_field(data, "id")))


class CleanResource(_Endpoint):
    """Delete this shard's stale copies of keys that will arrive (left by an earlier, unfinished
    move or a manual copy): the copy that follows must be the only source of them."""

    def on_post(self, req, resp):
        node = self.node
        require_token(node, req)
        leader_log_of(node)
        transition = _copying(node, _json_body(req).get("id"))
        me = node.me.name
        deleted = 0
        start = None
        while True:
            with node.store.scan(Namespace.DATA, start, limit=PAGE_KEYS) as pairs:
                keys = [key for key, _ in pairs]
            if not keys:
                break
            stale = []
            for key in keys:
                old, new = transition.owners(key)
                if new == me and old != me:
                    stale.append(Delete(Namespace.DATA, key))
            if stale:
                node.write(stale, client=False)
                deleted += len(stale)
            start = keys[-1] + b"\x00"
        resp.media = {"node": node.name, "deleted": deleted}


class ScanResource(_Endpoint):
    """One page of the keys leaving this shard, with the seq read before the page."""

    def on_get(self, req, resp):
        node = self.node
        leader, params, transition = self._leader_move(req)
        after = params.get("after")
        held = params.get("hold")
        if held is not None:
            # Renewed on every page: the copy needs the log from its first page's seq on.
            leader.progress.hold(_hold_name(transition), int(held), HOLD_TTL)
        page = snapshot_page(leader, after, limit=PAGE_KEYS, max_bytes=PAGE_BYTES)
        if after is None:
            leader.progress.hold(_hold_name(transition), page["seq"], HOLD_TTL)
        me = node.me.name
        pairs = []
        for key, value in page["pairs"]:
            old, new = transition.owners(key)
            if old == me and new != me:
                pairs.append([key, value, new])
        _sent(node, len(pairs))
        _pack(
            resp,
            {
                "seq": page["seq"],
                "pairs": pairs,
                "scanned": len(page["pairs"]),
                "next": page["pairs"][-1][0] if page["pairs"] else after,
                "done": page["done"],
            },
        )


class LogResource(_Endpoint):
    """Log entries after a seq, of keys leaving this shard; ``last`` is the last seq read."""

    def on_get(self, req, resp):
        node = self.node
        leader, params, transition = self._leader_move(req)
        try:
            after = int(params.get("after", b""))
        except ValueError:
            raise ApiError(falcon.HTTP_400, "bad request", "'after' must be an integer") from None
        # Hold first, then look: a trim between the two cannot take what this read needs.
        leader.progress.hold(_hold_name(transition), after, HOLD_TTL)
        committed = leader.committer.committed_seq()
        entries = leader.log.entries_after(after, max_entries=MAX_LOG_ENTRIES, max_bytes=PAGE_BYTES)
        if after < leader.log.trimmed or (entries and entries[0][0] != after + 1):
            raise ApiError(
                falcon.HTTP_410,
                "log trimmed",
                f"entries after {after} are gone (kept: {leader.log.trimmed + 1}..); copy again",
            )
        me = node.me.name
        out = []
        last = after
        for seq, op, key, value, _ in entries:
            last = seq
            old, new = transition.owners(key)
            if old == me and new != me:
                out.append([seq, op, key, value, new])
        _sent(node, len(out))
        _pack(resp, {"entries": out, "last": last, "committed": committed})


class IngestResource(_Endpoint):
    """Apply keys copied from their old owner (bypasses ownership and the fence)."""

    def on_post(self, req, resp):
        node = self.node
        require_token(node, req)
        leader_log_of(node)
        try:
            data = msgpack.unpackb(req.bounded_stream.read(64 * 1024 * 1024), raw=False)
            _copying(node, data.get("id"))
            # Keys and values are checked by the store's apply (400/413 on bad ones).
            ops = [entry_op(op, key, value) for op, key, value in data["ops"]]
        except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
            raise ApiError(falcon.HTTP_400, "bad request", f"not an ingest batch: {exc}") from None
        if ops:
            node.write(ops, client=False)
            if node.metrics is not None:
                node.metrics.bump("reshard_keys_received", len(ops))
        resp.media = {"node": node.name, "applied": len(ops)}


def routes(node) -> list[tuple[str, object]]:
    return [
        ("/reshard/state", StateResource(node)),
        ("/reshard/plan", PlanResource(node)),
        ("/reshard/prepare", PrepareResource(node)),
        ("/reshard/commit", CommitResource(node)),
        ("/reshard/abort", AbortResource(node)),
        ("/reshard/clean", CleanResource(node)),
        ("/reshard/scan", ScanResource(node)),
        ("/reshard/log", LogResource(node)),
        ("/reshard/ingest", IngestResource(node)),
    ]
