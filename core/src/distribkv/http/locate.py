"""Where a request for a key is answered: here, at the owner (redirect or proxy), or nowhere."""

from __future__ import annotations

import falcon

from distribkv.http import routing
from distribkv.http.errors import ApiError

#: ``X-Distribkv-Read: leader`` asks a replica to send the read to its leader (no stale read).
READ_HEADER = "X-Distribkv-Read"


class Locator:
    """Decides, per key, whether this node answers; otherwise it answers for the owner."""

    def __init__(self, node, pool: routing.ConnectionPool):
        self.node = node
        self.pool = pool
        self.mode = node.config.cluster.routing

    def owner(self, key: bytes):
        """The shard that answers for ``key`` now, and the map fingerprint to route it with."""
        return self.node.maps.route(key)

    def here(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        key: bytes,
        *,
        write: bool,
        body: bytes | None = None,
    ) -> bool:
        """True if this node serves ``key``; else the response is already complete."""
        node = self.node
        me = node.me
        if write and node.maps.verdict(key) is not None:
            # A reshard fenced this key: nobody writes it until the new map is committed.
            raise moving(node, key)
        owner, fingerprint = self.owner(key)
        if owner.name == me.name:
            if node.is_leader:
                return True
            if not write and req.get_header(READ_HEADER) != "leader":
                return True  # a replica serves reads itself, possibly stale
            if write and self.mode != "redirect":
                raise ApiError(
                    falcon.HTTP_403,
                    "read-only replica",
                    f"{node.name} is a replica; write to the leader at {owner.leader}",
                    leader=owner.leader,
                )
        elif req.get_header(routing.HOP_HEADER):
            raise routing.misdirected(owner, node.name)
        # Another shard's key, a write to a replica (redirect mode) or a leader-only read.
        if self.mode == "redirect":
            error, detail = "wrong shard", None
            if owner.name == me.name:  # a write to this replica, or a read for the leader
                what = "a write" if write else f"a read with {READ_HEADER}: leader"
                error = "not the leader"
                detail = (
                    f"{node.name} is a replica of shard {owner.name!r}; {what} goes to its"
                    f" leader at {owner.leader}"
                )
            routing.redirect(resp, req, owner, owner.leader, error=error, detail=detail)
        else:
            routing.forward(
                self.pool,
                req,
                resp,
                owner,
                owner.leader,
                body=body,
                me=node.name,
                fingerprint=fingerprint,
            )
        return False


class MapCheck:
    """Middleware: a request stamped with another map's fingerprint is answered 409 (a node
    in a fenced reshard also accepts the target map's fingerprint: it answers such requests
    for the keys it receives)."""

    def __init__(self, node):
        self.node = node

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        theirs = req.get_header(routing.MAP_HEADER)
        if theirs is None:
            return
        maps = self.node.maps
        ours = maps.routing.fingerprint
        if theirs in (ours, maps.map.fingerprint):
            return
        transition = maps.transition
        if transition is not None and transition.fenced and theirs == transition.target.fingerprint:
            return
        raise ApiError(
            falcon.HTTP_409,
            "shard map mismatch",
            f"the request was routed with map {theirs}; this node has map {ours} (fetch /cluster)",
            yours=theirs,
            ours=ours,
        )


def moving(node, key: bytes) -> ApiError:
    """503 for a write to a key that a reshard is moving: it was not applied; retry."""
    transition = node.maps.transition
    old, new = transition.owners(key) if transition is not None else ("?", "?")
    return ApiError(
        falcon.HTTP_503,
        "moving",
        f"the key is moving from shard {old} to {new} (reshard"
        f" {transition.id if transition else '?'}); the write was not applied, retry shortly",
        headers={"Retry-After": "1"},
    )
