"""What a plugin sees of the node it is called for: :class:`NodeView`.

Hooks that concern one node (``distribkv_routes``, ``distribkv_node_started``,
``distribkv_node_stopping``) and the factories of a replication transport receive the node as
a ``NodeView``. It names the part of :class:`distribkv.node.Node` that plugins may rely on;
anything else on the node may change between releases.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distribkv.config import Address, Config, NodeConfig
    from distribkv.hashing.shardmap import ShardInfo, ShardMap
    from distribkv.plugins import PluginRegistry
    from distribkv.replication.api import ReplicationRole
    from distribkv.replication.leader import LeaderLog
    from distribkv.storage.api import Op
    from distribkv.storage.store import Store

__all__ = ["NodeView"]


class NodeView(Protocol):
    """One node of the cluster: a shard's leader or one of its replicas."""

    #: ``shard/leader`` or ``shard/replica-N``.
    name: str
    #: The whole cluster file, and this node's entry in it.
    config: Config
    node_config: NodeConfig
    #: "leader" or "replica" (it changes at run time with a coordination that elects, and
    #: after a switchover).
    role: str
    #: The term of the history this node's data belongs to (0 with ``static`` and no
    #: switchover).
    term: int
    #: True with a coordination that elects (roles come from the coordinator).
    elects: bool
    address: Address
    data_dir: Path
    #: True with ``durability = "sync"``: an apply must be durable before it is acknowledged.
    sync: bool
    #: The cluster token, or None (internal endpoints then need none).
    token: str | None
    #: What the node calls other nodes with over HTTPS (``[tls]``: the cluster's CA, and its
    #: certificate for mutual TLS), or None: plain HTTP.
    client_tls: ssl.SSLContext | None
    #: The installed plugins, to select other specs by name.
    registry: PluginRegistry
    #: The node's storage, once it is open.
    store: Store | None
    #: On a leader: its replication log (sequence numbers, group commit, replica progress).
    leader_log: LeaderLog | None
    #: The running half of the replication transport, once started.
    replication: ReplicationRole | None
    #: This node's shard in the map it serves.
    me: ShardInfo

    @property
    def is_leader(self) -> bool: ...

    @property
    def shard_map(self) -> ShardMap: ...

    @property
    def readable(self) -> bool:
        """False on a replica whose data is incomplete (a resync is reloading it)."""
        ...

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, ops: Sequence[Op], *, client: bool = True) -> int:
        """Apply mutations with their log entries (on a leader); the last seq."""
        ...

    def lag(self) -> tuple[int, float] | None:
        """On a replica: how far behind its leader it is (entries, seconds)."""
        ...

    def status(self) -> dict[str, Any]: ...

    # --- for coordinations ------------------------------------------------------------------

    def node_names(self) -> list[str]:
        """This shard's nodes: "leader", "replica-0", ... (as in ``sharding.toml``)."""
        ...

    def node_address(self, name: str) -> str: ...

    def leader_of(self, shard: ShardInfo) -> str | None:
        """Where ``shard``'s leader is, as far as this node knows (None: none is known)."""
        ...

    def applied_seq(self) -> int:
        """The last seq of its shard's history that this node's data holds."""
        ...

    def stand_for_election(self, *, first: bool = False) -> int | None:
        """Stop following and give the applied seq to stand with, or None if this node must
        not lead (incomplete or diverged data)."""
        ...
