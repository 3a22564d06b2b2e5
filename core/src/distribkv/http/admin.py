"""Operational resources: ``/healthz``, ``/status``, ``/cluster``, and the internal ``/purge``,
``/digest``, ``/replication/resync`` and ``/coordination/...`` (switchovers)."""

from __future__ import annotations

import hmac

import falcon

from distribkv.auth import ADMIN
from distribkv.coordination.api import CoordinationError, Leadership
from distribkv.http.auth import require
from distribkv.http.errors import ApiError
from distribkv.protocol import TOKEN_HEADER
from distribkv.storage.errors import UnsupportedOperationError


def require_token(node, req: falcon.Request) -> None:
    """Internal endpoints need the cluster token when one is configured; with ``[auth]``, an
    ``admin`` token does too."""
    authorizer = node.authorizer
    if authorizer is not None:
        require(authorizer, req.get_header, ADMIN)
        return
    if node.token is None:
        return
    given = req.get_header(TOKEN_HEADER) or ""
    auth = req.get_header("Authorization") or ""
    if auth.startswith("Bearer "):
        given = given or auth[7:]
    if not hmac.compare_digest(given.encode(), node.token.encode()):
        raise ApiError(
            falcon.HTTP_401,
            "unauthorized",
            f"this endpoint needs the cluster token ({TOKEN_HEADER})",
        )


#: What ``/healthz`` answers.
HEALTHY = b"ok\n"
HEALTHY_TYPE = falcon.MEDIA_TEXT


class HealthResource:
    """``/healthz``: "ok". The node's application answers it the same way without Falcon; this
    is for a request stamped with a map fingerprint, which the map check answers first."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = HEALTHY_TYPE
        resp.data = HEALTHY


class StatusResource:
    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.node.status()


class ClusterResource:
    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        node = self.node
        routing = node.maps.routing
        resp.media = {
            # The map clients should route by (the old one while a reshard moves keys).
            **routing.describe(),
            "routing": node.config.cluster.routing,
            "node": node.name,
            # Who leads each shard now: with a coordination that elects, not always the
            # leader the map names (that one stays in the map, which is the file's).
            "coordination": node.config.cluster.coordination,
            "leaders": node.leaders(routing),
        }


class PurgeResource:
    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        if not self.node.is_leader:
            raise ApiError(
                falcon.HTTP_403,
                "read-only replica",
                f"purge the leader at {self.node.leader_of(self.node.me)}; replicas follow it",
                leader=self.node.leader_of(self.node.me),
            )
        resp.media = {**self.node.purge(), "fingerprint": self.node.shard_map.fingerprint}

    on_post = on_get


class CompactResource:
    """``POST /compact``: the engine compacts its files now (admin; LevelDB and RocksDB);
    501 on a backend without compaction."""

    def __init__(self, node):
        self.node = node

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        try:
            resp.media = {**self.node.compact(), "node": self.node.name}
        except UnsupportedOperationError as exc:
            raise ApiError(falcon.HTTP_501, "not supported", str(exc)) from None


class DigestResource:
    """Internal: a digest of the whole keyspace (to compare a replica with its leader)."""

    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        lag = self.node.lag()
        resp.media = {
            **self.node.digest(),
            "node": self.node.name,
            "role": self.node.role,
            "lag_entries": None if lag is None else lag[0],
        }


class ResyncResource:
    """Internal, on a replica: drop its data and reload it from the leader (an operator's
    answer to a replica that stopped following a leader with another history)."""

    def __init__(self, node):
        self.node = node

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        follower = self.node.replication
        if self.node.is_leader or not hasattr(follower, "request_resync"):
            raise ApiError(falcon.HTTP_403, "not a replica", f"{self.node.name} is a leader")
        follower.request_resync()
        resp.status = falcon.HTTP_202
        resp.media = {"resync": "requested", "node": self.node.name}


class HandoverResource:
    """Internal, on a shard's leader: ``POST /coordination/handover?to=NODE&timeout=S`` hands
    the lead to another node of the shard (``distribkv promote``); see ``Node.hand_over``."""

    def __init__(self, node):
        self.node = node

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        target = req.get_param("to", required=True)
        timeout = req.get_param_as_float("timeout", min_value=0.1, max_value=600) or 30.0
        try:
            lead, seq = self.node.hand_over(target, timeout)
        except ValueError as exc:
            raise ApiError(falcon.HTTP_400, "bad target", str(exc)) from None
        except TimeoutError as exc:
            raise ApiError(falcon.HTTP_504, "target behind", str(exc)) from None
        except CoordinationError as exc:
            raise ApiError(falcon.HTTP_409, "switchover refused", str(exc)) from None
        resp.media = {
            "shard": lead.shard,
            "leader": lead.node,
            "address": lead.address,
            "term": lead.term,
            "seq": seq,
            "from": self.node.node_config.node_name,
        }


class LeaderRecordResource:
    """Internal: ``POST /coordination/leader`` with ``{"shard", "node", "address", "term",
    "fork"}`` tells a node of a switchover (``distribkv promote`` does, with ``static``; a
    coordination with a store of its own refuses with 409)."""

    def __init__(self, node):
        self.node = node

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_token(self.node, req)
        doc = req.get_media()
        try:
            lead = Leadership(
                str(doc["shard"]), str(doc["node"]), str(doc["address"]), int(doc["term"])
            )
            fork = int(doc["fork"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(
                falcon.HTTP_400, "bad request", f"shard, node, address, term, fork: {exc}"
            ) from None
        coordinator = self.node.coordinator
        try:
            coordinator.record(lead, fork)
        except CoordinationError as exc:
            raise ApiError(falcon.HTTP_409, "not recorded", str(exc)) from None
        resp.media = {"recorded": True, "node": self.node.name}
