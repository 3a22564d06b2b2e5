"""Node: one process of the cluster — a shard's leader or one of its read-only replicas.

It wires the configuration to the plugins: opens the configured storage backend under
``data_dir/<shard>/<node>``, builds the shard map with the configured hashing scheme, and offers
the operations the HTTP layer calls. Every write goes through :meth:`Node.write`, the one place
where a mutation reaches storage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from xxhash import xxh3_128

from distribkv import __version__
from distribkv.config import Config, NodeConfig, load_cluster_token, refuse_exposed
from distribkv.hashing.shardmap import ShardInfo, ShardMap
from distribkv.plugins import PluginRegistry
from distribkv.replication.api import NotReplicatedError, ReplicationRole
from distribkv.replication.leader import LeaderLog
from distribkv.replication.records import ensure_history
from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.store import Store, open_store
from distribkv.transition import MapState

log = logging.getLogger(__name__)

PURGE_CHUNK = 1000


class Node:
    def __init__(
        self,
        config: Config,
        shard: str,
        replica: int | None = None,
        *,
        registry: PluginRegistry,
        backend: str | None = None,
        data_dir: str | Path | None = None,
        environ: dict[str, str] | None = None,
    ):
        self.config = config
        self.registry = registry
        self.node_config: NodeConfig = config.node(shard, replica)
        self.maps = MapState(
            self, ShardMap.from_config(config, registry.hashing_scheme(config.cluster.hashing))
        )
        self.me: ShardInfo = self.shard_map.shard(shard)
        self.replica = replica
        self.role = self.node_config.role
        self.name = f"{shard}/{self.node_config.node_name}"
        self.address = self.node_config.address
        self.backend_name = backend or config.storage.backend
        self.backend_spec = registry.storage_backend(self.backend_name)
        if data_dir is None:
            self.data_dir = self.node_config.data_dir
        else:
            self.data_dir = Path(data_dir) / shard / self.node_config.node_name
        self.sync = config.storage.durability == "sync"
        self.token = load_cluster_token(os.environ if environ is None else environ)
        refuse_exposed(config, self.node_config, self.token)
        self.store: Store | None = None
        self.leader_log: LeaderLog | None = None
        self.replication: ReplicationRole | None = None
        self.started_at = time.time()

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> Node:
        self.store = open_store(
            self.backend_spec,
            self.data_dir,
            durability=self.config.storage.durability,
            settings=self.config.storage.settings
            if self.backend_name == self.config.storage.backend
            else {},
            max_value_size=self.config.storage.max_value_size,
        )
        # Every data directory gets its history id when it is created, so a replica's copy
        # promoted to leader starts a history of its own.
        ensure_history(self.store, sync=self.sync)
        self.maps.load()
        self.me = self.shard_map.shard(self.me.name)
        if self.is_leader:
            self.leader_log = LeaderLog(
                self.store,
                sync=self.sync,
                replicas=[f"replica-{i}" for i in range(len(self.me.replicas))],
                retention=self.config.cluster.log_retention,
                group_commit=self.config.storage.group_commit,
            )
        log.info("node %s opened %s at %s", self.name, self.backend_name, self.data_dir)
        return self

    def start_replication(self) -> None:
        """Start this node's half of the configured replication transport."""
        transport = self.registry.replication_transport(self.config.cluster.replication)
        self.replication = transport.leader(self) if self.is_leader else transport.follower(self)
        self.replication.start()

    def begin_stopping(self) -> None:
        """The node is about to stop: a replica waiting in a long-poll gets its answer now, and
        later polls are refused (503), so that replicas do not hold up the drain."""
        if self.leader_log is not None:
            self.leader_log.log.stop_waiting()

    def stop_replication(self, timeout: float) -> None:
        if self.replication is not None:
            self.replication.stop(timeout)

    def close(self) -> None:
        if self.leader_log is not None:
            self.leader_log.close()
        if self.store is not None:
            self.store.close()

    # --- placement ------------------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        """The map this node serves (it changes when a reshard commits)."""
        return self.maps.map

    @property
    def is_leader(self) -> bool:
        return self.replica is None

    def owner_of(self, key: bytes) -> ShardInfo:
        return self.shard_map.owner_of(key)

    def routes_here(self, key: bytes) -> bool:
        """True if clients' requests for ``key`` belong to this node's shard now (by the map
        the node routes with, which during a reshard is not yet the one it will serve)."""
        return self.maps.route(key)[0].name == self.me.name

    def owns(self, key: bytes) -> bool:
        return self.shard_map.placement.shard_for(key) == self.me.idx

    # --- data -----------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        store = self.store
        assert store is not None, "the node is not open"
        return store.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._opened().get_many(keys)

    def _opened(self) -> Store:
        if self.store is None:
            raise RuntimeError(f"{self.name} is not open")
        return self.store

    def write(self, ops: Sequence[Op], *, client: bool = True) -> int:
        """Apply data mutations atomically with their replication log entries (durably when
        ``durability = "sync"``); with ``min_replicas``, wait until enough replicas applied
        them. Returns the last sequence number.

        A client's write (``client=True``) is refused with :class:`Moving` while a reshard
        fences its keys; the check runs under the log's write lock. Writes of the reshard
        itself and of ``purge`` pass ``client=False``."""
        seq = self._leader_log().committer.write(
            ops, guard=self._write_guard(ops) if client else None
        )
        needed = self.config.cluster.min_replicas
        if needed:
            timeout = self.config.cluster.min_replicas_timeout
            if not self._leader_log().progress.wait_replicated(seq, needed, timeout):
                raise NotReplicatedError(
                    f"the write (seq {seq}) is stored on the leader {self.name} but fewer than"
                    f" {needed} replica(s) applied it within {timeout:g}s; it may not be"
                    " replicated"
                )
        return seq

    @property
    def defers_writes(self) -> bool:
        """True if :meth:`write_later` can take a client's writes: a leader that needs no
        replica's acknowledgement (``min_replicas = 0``) before it answers."""
        return self.is_leader and not self.config.cluster.min_replicas

    def write_later(
        self, ops: Sequence[Op], done: Callable[[int, BaseException | None], None]
    ) -> None:
        """A client's :meth:`write` that returns at once; ``done(seq, None)`` follows once it
        is applied (durably with ``sync``), or ``done(0, error)``, from another thread (or
        from this one, for a write refused before it was queued). Only where
        :attr:`defers_writes`."""
        try:
            # Checked again here: a leader that was just demoted answers the write an error.
            if not self.defers_writes:
                raise RuntimeError(f"{self.name} cannot defer writes")
            self._leader_log().committer.submit(ops, done, guard=self._write_guard(ops))
        except Exception as exc:  # noqa: BLE001 - handed to the caller's answer
            done(0, exc)

    def _leader_log(self) -> LeaderLog:
        if self.leader_log is None:
            raise RuntimeError(f"{self.name} is a replica; only leaders take writes")
        return self.leader_log

    def _write_guard(self, ops: Sequence[Op]) -> Callable[[], None]:
        maps = self.maps
        epoch = maps.epoch

        def guard() -> None:
            # Under the write lock: a move that started a moment ago counts.
            maps.check_write([op.key for op in ops], epoch)

        return guard

    @property
    def readable(self) -> bool:
        """A replica in the middle of a full resync has incomplete data."""
        follower = self.replication
        return self.is_leader or follower is None or follower.readable

    def lag(self) -> tuple[int, float] | None:
        follower = self.replication
        return None if self.is_leader or follower is None else follower.lag()

    def set(self, key: bytes, value: bytes) -> None:
        self.write([Put(Namespace.DATA, key, value)])

    def delete(self, key: bytes) -> None:
        self.write([Delete(Namespace.DATA, key)])

    def purge(self) -> dict[str, int]:
        """Delete every key this shard does not own under the current map."""
        deleted = kept = 0
        start: bytes | None = None
        while True:
            with self._opened().scan(Namespace.DATA, start, limit=PURGE_CHUNK) as pairs:
                keys = [key for key, _ in pairs]
            if not keys:
                break
            foreign = [Delete(Namespace.DATA, k) for k in keys if not self.owns(k)]
            if foreign:
                self.write(foreign, client=False)
            deleted += len(foreign)
            kept += len(keys) - len(foreign)
            start = keys[-1] + b"\x00"
        log.info("purge on %s: deleted %d keys, kept %d", self.name, deleted, kept)
        return {"deleted": deleted, "kept": kept}

    def status(self) -> dict:
        stats = self._opened().stats()
        return {
            "node": self.name,
            "shard": self.me.name,
            "idx": self.me.idx,
            "role": self.role,
            "leader": self.me.leader,
            "address": str(self.address),
            "backend": self.backend_name,
            "durability": self.config.storage.durability,
            "server": self.config.cluster.server,
            "keys": stats.keys.get("data"),
            "disk_bytes": stats.disk_bytes,
            "fingerprint": self.maps.routing.fingerprint,
            "uptime_s": round(time.time() - self.started_at, 3),
            "pid": os.getpid(),
            "version": __version__,
            "replication": {
                "transport": self.config.cluster.replication,
                **(self.replication.status() if self.replication is not None else {}),
            },
        }

    def digest(self) -> dict:
        """A digest of the whole data keyspace, to compare a replica with its leader."""
        hasher = xxh3_128()
        count = 0
        with self._opened().scan(Namespace.DATA) as pairs:
            for key, value in pairs:
                hasher.update(len(key).to_bytes(4, "big") + key)
                hasher.update(len(value).to_bytes(8, "big") + value)
                count += 1
        return {"keys": count, "digest": hasher.hexdigest()}
