"""The coordination contract: who leads each shard, and for how long a leader may acknowledge.

A coordination is a plugin that returns :class:`CoordinationSpec` objects from the
``distribkv_coordinations`` hook, chosen by ``[cluster] coordination`` in ``sharding.toml``
(``static``, the default, is the core's; ``etcd`` is the ``distribkv-etcd`` distribution).
``spec.check(settings, config)`` validates the ``[coordination]`` table when the file is
loaded; ``spec.create(node, settings)`` makes the node's :class:`Coordinator`, which the node
starts once its storage is open and stops before it closes.

The coordinator tells the node what to be through :class:`Leadership` values: the node asks
:meth:`Coordinator.leader` for its shard (and for others, to route), and the coordinator
calls back ``changed()`` whenever its view moves, from a thread of its own. A coordinator that
can lose leadership without the node's knowing (a lease that cannot be renewed) gives
:meth:`Coordinator.deadline`: the monotonic time until which this node may acknowledge
writes. The node checks it before it answers every write.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from distribkv.config import Config
    from distribkv.nodeview import NodeView

__all__ = [
    "CoordinationError",
    "CoordinationSpec",
    "Coordinator",
    "HandoverUnknown",
    "Leadership",
    "NotLeaderError",
]


class NotLeaderError(Exception):
    """This node may not acknowledge writes (any more): it is a replica, or its leadership
    lapsed. A write refused this way after it was stored has an unknown outcome: it reaches
    the shard's history only if the next leader had it."""

    def __init__(self, message: str, *, leader: str | None = None, stored: bool = False):
        super().__init__(message)
        self.leader = leader
        self.stored = stored


class CoordinationError(Exception):
    """The coordination cannot do what was asked (a bad setting, an unreachable service)."""


class HandoverUnknown(CoordinationError):
    """A switchover may or may not have happened (its answer was lost): the old leader keeps
    its writes fenced until its coordinator has read who leads since."""


@attrs.frozen
class Leadership:
    """Who leads a shard, and since which term."""

    shard: str
    #: The node's name within its shard ("leader", "replica-0", ...), as in ``sharding.toml``.
    node: str
    #: host:port of that node.
    address: str
    #: Grows with every change of leader of the shard (0 with ``static`` and no switchover).
    term: int


class Coordinator(abc.ABC):
    """One node's part in deciding who leads each shard."""

    @abc.abstractmethod
    def start(self, changed: Callable[[], None]) -> None:
        """Begin; call ``changed()`` (from any thread) whenever :meth:`leader` of any shard
        may have changed. Returns promptly; run loops in threads."""

    @abc.abstractmethod
    def stop(self, timeout: float) -> None:
        """Stop within ``timeout`` seconds, giving up any leadership this node holds."""

    @abc.abstractmethod
    def leader(self, shard: str) -> Leadership | None:
        """The leader of ``shard`` as far as this node knows, or None while there is none
        (an election is under way)."""

    def fork_after(self, shard: str, term: int) -> int | None:
        """The last seq that the shard's history since ``term`` shares with the history of
        ``term``: the lowest seq at which a later term began. None if no later term is known.
        A node of ``term`` that holds entries after it rolls them back."""
        return None

    def hand_over(self, shard: str, node: str, address: str, fork: int) -> Leadership:
        """Make ``node`` (at ``address``) the leader of ``shard``, whose history it holds up to
        ``fork``, in a new term: a planned switchover, asked of the current leader once it has
        fenced its writes and ``node`` has caught up. Returns the new leadership."""
        raise CoordinationError(f"this coordination cannot hand shard {shard}'s lead over")

    def record(self, lead: Leadership, fork: int) -> None:
        """Be told of a switchover that another node carried out (coordinations without a
        shared store of their own, such as ``static``, are told by ``distribkv promote``)."""
        raise CoordinationError("leadership is not recorded by hand with this coordination")

    def view_time(self) -> float:
        """The ``time.monotonic()`` of the last time this coordinator learned who leads (a
        coordinator whose view is always current answers infinity)."""
        return float("inf")

    def deadline(self) -> float | None:
        """While this node leads its shard: the ``time.monotonic()`` after which it must no
        longer acknowledge a write (its lease may have expired by then), or None if its
        leadership cannot lapse on its own (``static``)."""
        return None

    def status(self) -> Mapping[str, Any]:
        """What ``/status`` shows under ``coordination``."""
        return {}


@attrs.frozen
class CoordinationSpec:
    """A coordination offered by a plugin."""

    name: str
    #: ``create(node, settings)``: the node's coordinator; ``settings`` is the
    #: ``[coordination]`` table.
    create: Callable[[NodeView, Mapping[str, Any]], Coordinator]
    description: str
    #: ``check(settings, config)``: raise ``CoordinationError`` for a bad ``[coordination]``
    #: table (naming the key); None accepts only an empty table.
    check: Callable[[Mapping[str, Any], Config], None] | None = None
    #: True if leadership moves on its own (a failover): nodes then take their role from the
    #: coordinator, not from ``sharding.toml``.
    elects: bool = False
    #: ``launch(config, log_dir)``: a context manager for what ``distribkv launch`` runs
    #: before the nodes and stops after them (a local coordination service); it yields a line
    #: to show, or None.
    launch: Callable[[Config, Path], AbstractContextManager[str | None]] | None = None
