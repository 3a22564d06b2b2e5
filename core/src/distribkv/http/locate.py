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
        self.me = node.me
        self.fingerprint = node.shard_map.fingerprint

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
        owner = node.owner_of(key)
        if owner.idx == self.me.idx:
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
            routing.redirect(resp, req, owner, owner.leader)
        else:
            routing.forward(
                self.pool,
                req,
                resp,
                owner,
                owner.leader,
                body=body,
                me=node.name,
                fingerprint=self.fingerprint,
            )
        return False


class MapCheck:
    """Middleware: a request stamped with another map's fingerprint is answered 409."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        theirs = req.get_header(routing.MAP_HEADER)
        if theirs is not None and theirs != self.fingerprint:
            raise ApiError(
                falcon.HTTP_409,
                "shard map mismatch",
                f"the request was routed with map {theirs}; this node has map"
                f" {self.fingerprint} (fetch /cluster)",
                yours=theirs,
                ours=self.fingerprint,
            )
