"""The replication-transport contract: how a shard's replicas follow its leader.

A transport is a plugin that returns :class:`TransportSpec` objects from the
``distribkv_replication_transports`` hook, chosen by ``[cluster] replication`` in
``sharding.toml``. At start-up the core calls ``spec.leader(node)`` on a shard leader and
``spec.follower(node)`` on a replica; the returned objects are started with the node and stopped
before its storage closes. A transport that needs HTTP endpoints mounts them with the
``distribkv_routes`` hook.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from distribkv.nodeview import NodeView

__all__ = ["NotReplicatedError", "ReplicationRole", "TransportSpec"]


class NotReplicatedError(Exception):
    """A write was stored on the leader but not acknowledged by ``min_replicas`` in time."""


class ReplicationRole(abc.ABC):
    """The running half of a transport on one node (leader side or follower side)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin serving or following; must return promptly (run loops in threads)."""

    @abc.abstractmethod
    def stop(self, timeout: float) -> None:
        """Stop within ``timeout`` seconds; after it returns, storage is not touched again."""

    def status(self) -> Mapping[str, Any]:
        """Progress for ``/status`` (applied seq, lag, per-replica state)."""
        return {}


@attrs.frozen
class TransportSpec:
    """A replication transport offered by a plugin."""

    name: str
    #: ``leader(node)``: the role a shard's leader runs (started with the node).
    leader: Callable[[NodeView], ReplicationRole]
    #: ``follower(node)``: the role a replica runs.
    follower: Callable[[NodeView], ReplicationRole]
    description: str
