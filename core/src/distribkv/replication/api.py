"""The replication-transport contract: how a shard's replicas follow its leader.

A transport is a plugin that returns :class:`TransportSpec` objects from the
``distribkv_replication_transports`` hook, chosen by ``[cluster] replication`` in
``sharding.toml``. At start-up the core calls ``spec.leader(node)`` on a shard leader and
``spec.follower(node)`` on a replica; the returned objects are started with the node and stopped
before its storage closes. The HTTP endpoints a transport needs are ``spec.routes(node)``,
mounted only in a cluster that selects the transport.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from distribkv.nodeview import NodeView

__all__ = ["LoopRole", "NotReplicatedError", "ReplicationRole", "TransportSpec"]


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

    @property
    def readable(self) -> bool:
        """False on a replica whose data is incomplete (a full resync is reloading it); its
        reads are then refused (503) rather than answered from part of the data."""
        return True

    def lag(self) -> tuple[int, float] | None:
        """On a replica: how far it is behind its leader, in entries and seconds (None on a
        leader, or when unknown)."""
        return None


class LoopRole(ReplicationRole):
    """A role whose work is one loop in a thread of its own: :meth:`run` until
    :attr:`stopping` is set. ``wake`` interrupts a wait of the loop early."""

    def __init__(self, thread_name: str):
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self.run, name=thread_name, daemon=True)

    @abc.abstractmethod
    def run(self) -> None:
        """The loop; returns once :attr:`stopping` is set."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.stopped()

    def stopped(self) -> None:
        """Called once the loop has ended: release what it held."""


@attrs.frozen
class TransportSpec:
    """A replication transport offered by a plugin."""

    name: str
    #: ``leader(node)``: the role a shard's leader runs (started with the node).
    leader: Callable[[NodeView], ReplicationRole]
    #: ``follower(node)``: the role a replica runs.
    follower: Callable[[NodeView], ReplicationRole]
    description: str
    #: ``routes(node)``: the ``(path, resource)`` pairs the transport serves, mounted on every
    #: node of a cluster that uses it (leaders answer them, replicas refuse with 403).
    routes: Callable[[NodeView], list[tuple[str, Any]]] | None = None
