"""Node: one process of the cluster — a shard's leader or one of its read-only replicas.

It wires the configuration to the plugins: opens the configured storage backend under
``data_dir/<shard>/<node>``, builds the shard map with the configured hashing scheme, and offers
the operations the HTTP layer calls. Every write goes through :meth:`Node.write`, the one place
where a mutation reaches storage.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from xxhash import xxh3_128

from distribkv import __version__
from distribkv.auth import Authorizer
from distribkv.config import (
    Config,
    NodeConfig,
    TokenSpec,
    load_cluster_token,
    load_tokens,
    refuse_exposed,
)
from distribkv.coordination import roles
from distribkv.coordination.api import Coordinator, HandoverUnknown, Leadership, NotLeaderError
from distribkv.hashing.shardmap import ShardInfo, ShardMap
from distribkv.metrics.counts import NodeCounts
from distribkv.plugins import PluginRegistry
from distribkv.replication.api import NotReplicatedError, ReplicationRole
from distribkv.replication.leader import LeaderLog
from distribkv.replication.records import (
    APPLIED,
    LAST_SEQ,
    RESYNC,
    ensure_history,
    read_seq,
)
from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.errors import BackendClosedError, UnsupportedOperationError
from distribkv.storage.store import Store, open_store
from distribkv.tls import node_context, scheme
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
        self.coordination = registry.coordination(config.cluster.coordination)
        self.coordinator: Coordinator | None = None
        #: With a coordination that elects, every node starts as a replica and takes the role
        #: its coordinator gives it; with ``static`` the role is the file's.
        self.elects: bool = self.coordination.elects
        self.is_leader: bool = replica is None and not self.elects
        self.role = "leader" if self.is_leader else "replica"
        #: Where this shard's leader is, as far as this node knows.
        self.leader_address: str | None = None if self.elects else self.me.leader
        #: The term of the history this node's data belongs to (0 with ``static``).
        self.term = 0
        self.rolled_back = 0
        self.role_error: str | None = None
        self._following: tuple[str, int] | None = None
        #: Set while this node stands for election: the term it stood in. It follows no leader
        #: of that term or an older one (it follows the leader of a newer one).
        self._standing: int | None = None
        self._roles = threading.RLock()
        self._changed = threading.Event()
        self._roles_stopping = threading.Event()
        self._role_thread: threading.Thread | None = None
        #: Writes check the leadership before they are acknowledged: with a coordination that
        #: elects, and while a switchover fences them.
        self._checks_leadership = self.elects
        self._handing_over = False
        #: When a switchover's outcome was lost (monotonic): the fence stays until the
        #: coordinator has read who leads since.
        self._handover_unknown_since: float | None = None
        self.name = f"{shard}/{self.node_config.node_name}"
        self.address = self.node_config.address
        self.backend_name = backend or config.storage.backend
        self.backend_spec = registry.storage_backend(self.backend_name)
        if data_dir is None:
            self.data_dir = self.node_config.data_dir
        else:
            self.data_dir = Path(data_dir) / shard / self.node_config.node_name
        self.sync = config.storage.durability == "sync"
        env: Mapping[str, str] = os.environ if environ is None else environ
        self.token = load_cluster_token(env)
        refuse_exposed(config, self.node_config, self.token)
        #: The client tokens of ``[auth]`` by secret; None: client requests need none.
        self.tokens: dict[str, TokenSpec] | None = (
            None if config.auth is None else load_tokens(config.auth, env, config.path)
        )
        #: Who a request comes from, with ``[auth]``; None: client requests need no token.
        self.authorizer: Authorizer | None = (
            None
            if self.tokens is None or config.auth is None
            else Authorizer(self.tokens, self.token, config.auth.status_role)
        )
        #: "https" with ``[tls]``: how other nodes and clients reach this one.
        self.scheme = scheme(config.tls)
        #: What this node calls other nodes with over HTTPS (None without ``[tls]``).
        self.client_tls = node_context(config.tls)
        #: What the node counts for ``/metrics`` (None with ``[server] metrics = false``).
        self.metrics: NodeCounts | None = NodeCounts() if config.server.metrics else None
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
            min_free_bytes=self.config.storage.min_free_bytes,
        )
        # Every data directory gets its history id when it is created, so a replica's copy
        # promoted to leader starts a history of its own.
        ensure_history(self.store, sync=self.sync)
        self.maps.load()
        self.me = self.shard_map.shard(self.me.name)
        if not self.elects:
            self.leader_address = self.me.leader
        self.term = roles.read_term(self.store)
        self.rolled_back = roles.read_rolled_back(self.store)
        if self.is_leader:
            self.leader_log = self._new_leader_log()
        log.info("node %s opened %s at %s", self.name, self.backend_name, self.data_dir)
        return self

    def _new_leader_log(self) -> LeaderLog:
        mine = self.node_config.node_name
        return LeaderLog(
            self._opened(),
            sync=self.sync,
            replicas=[name for name in self.node_names() if name != mine],
            retention=self.config.cluster.log_retention,
            group_commit=self.config.storage.group_commit,
            counts=self.metrics,
        )

    def node_names(self) -> list[str]:
        """The names of this shard's nodes: "leader", "replica-0", ..."""
        return ["leader", *(f"replica-{i}" for i in range(len(self.me.replicas)))]

    def node_address(self, name: str) -> str:
        if name == "leader":
            return self.me.leader
        return self.me.replicas[int(name.removeprefix("replica-"))]

    def start_replication(self) -> None:
        """Start the coordination, and this node's half of the replication transport: with
        ``static`` at once, in the role of the file; with a coordination that elects, once
        the coordinator says who leads."""
        self.coordinator = self.coordination.create(self, self.config.coordination)
        if not self.elects:
            # No thread of roles: a switchover (distribkv promote) changes the role at once.
            self.coordinator.start(self._reconcile_now)
            lead = self.coordinator.leader(self.me.name)
            if lead is not None and lead.term:
                self._reconcile_now()  # a switchover moved this shard's lead
                return
            transport = self.registry.replication_transport(self.config.cluster.replication)
            self.replication = (
                transport.leader(self) if self.is_leader else transport.follower(self)
            )
            self.replication.start()
            return
        self._role_thread = threading.Thread(
            target=self._role_loop, name=f"distribkv-roles-{self.name}", daemon=True
        )
        self._role_thread.start()
        self.coordinator.start(self._changed.set)

    # --- leadership that moves (a coordination that elects) -------------------------------

    def leads(self) -> bool:
        """True while this node leads its shard and its leadership cannot have lapsed (the
        coordinator's deadline, on this process's monotonic clock)."""
        return self.is_leader and self._lease_valid()

    def _lease_valid(self) -> bool:
        coordinator = self.coordinator
        deadline = None if coordinator is None else coordinator.deadline()
        return deadline is None or time.monotonic() < deadline

    def may_acknowledge(self) -> bool:
        """True while this node may acknowledge a write: it :meth:`leads`, and no switchover
        fences its writes."""
        return not self._handing_over and self.leads()

    def leader_of(self, shard: ShardInfo) -> str | None:
        """The address of ``shard``'s leader, as far as this node knows; None while it knows
        none (with a coordination that elects: an election is under way, or the node has not
        heard from its coordinator yet)."""
        coordinator = self.coordinator
        lead = None if coordinator is None else coordinator.leader(shard.name)
        if self.elects:
            return None if lead is None else lead.address
        # static: term 0 is the file's leader, which ``shard`` (of whichever map the caller
        # routes by, a reshard's target map included) names; a switchover gives a term.
        return shard.leader if lead is None or not lead.term else lead.address

    def hand_over(self, target: str, timeout: float) -> tuple[Leadership, int]:
        """A planned switchover to ``target`` (a node of this shard): fence writes, let the
        ones under way finish, wait until ``target`` has applied the last seq, then have the
        coordinator make it the leader; this node follows it. Loses no acknowledged write.
        Raises NotLeaderError if this node does not lead, ValueError for a bad target, and
        TimeoutError if the target does not catch up in time (the fence is lifted again).
        Returns the new leadership and the last seq of the old one."""
        with self._roles:
            if not self.may_acknowledge() or self.leader_log is None:
                raise self._not_leader(stored=False)
            names = self.node_names()
            if target not in names or target == self.node_config.node_name:
                others = [n for n in names if n != self.node_config.node_name]
                raise ValueError(
                    f"{target!r} is not another node of shard {self.me.name}: {others}"
                )
            coordinator = self.coordinator
            assert coordinator is not None
            leader_log = self.leader_log
            self._handing_over = self._checks_leadership = True
            try:
                last = leader_log.committer.committed_seq()
                if not leader_log.progress.wait_applied(target, last, timeout):
                    acked = leader_log.progress.replicas[target].acked
                    raise TimeoutError(
                        f"{target} applied seq {acked}, not {last}, within {timeout:g}s; the"
                        f" lead stays with {self.name}"
                    )
                log.warning(
                    "%s: hands shard %s over to %s at seq %d", self.name, self.me.name, target, last
                )
                lead = coordinator.hand_over(self.me.name, target, self.node_address(target), last)
            except HandoverUnknown:
                # It may have happened: writes stay fenced until the coordinator knows.
                self._handover_unknown_since = time.monotonic()
                self._changed.set()
                raise
            except BaseException:
                self._handing_over = False
                self._checks_leadership = self.elects
                raise
            if not self.elects:
                self._reconcile()
            return lead, last

    def _reconcile_now(self) -> None:
        with self._roles:
            self._reconcile()

    def leaders(self, shard_map: ShardMap | None = None) -> dict[str, dict]:
        """Every shard's current leader as this node knows it: ``{shard: {"node", "address",
        "term"}}`` (``node`` and ``term`` are None while an election is under way)."""
        coordinator = self.coordinator
        out = {}
        for shard in (shard_map or self.shard_map).shards:
            lead = None if coordinator is None else coordinator.leader(shard.name)
            if lead is None:
                out[shard.name] = {
                    "node": None if self.elects else "leader",
                    "address": shard.leader,
                    "term": None if self.elects else 0,
                }
            else:
                out[shard.name] = {"node": lead.node, "address": lead.address, "term": lead.term}
        return out

    def applied_seq(self) -> int:
        """The last seq of the shard's history that this node's data holds (on a leader, the
        last applied, without waiting for the writes under way: the coordinator publishes it
        every round)."""
        if self.leader_log is not None:
            return self.leader_log.log.last_seq
        follower = self.replication
        applied = getattr(follower, "applied", None)
        if applied is not None:
            return applied
        store = self._opened()
        if store.get(LAST_SEQ, roles.META) is not None:
            return read_seq(store, LAST_SEQ)
        return read_seq(store, APPLIED)

    def stand_for_election(self, *, first: bool = False) -> int | None:
        """Called by a coordinator that elects before this node tries to take the lead: stop
        following, so that the applied seq stays what it is; returns it, or None if this node
        must not lead (its data is incomplete, or it diverged). ``first``: the shard has never
        had a leader, and this node may start its history even with no data."""
        with self._roles:
            if self.is_leader:
                return self.applied_seq()
            store = self._opened()
            self._standing = self.term
            if store.get(RESYNC, roles.META) is not None:
                return None
            follower = self.replication
            if follower is not None:
                if getattr(follower, "diverged", None) or not follower.readable:
                    return None
                self._drop_follower()
            if (
                not first
                and store.get(LAST_SEQ, roles.META) is None
                and store.get(APPLIED, roles.META) is None
            ):
                return None  # never followed anyone: no data of the shard's history
            return self.applied_seq()

    def _role_loop(self) -> None:
        while not self._roles_stopping.is_set():
            wait = 0.5
            coordinator = self.coordinator
            if self.is_leader and coordinator is not None:
                deadline = coordinator.deadline()
                if deadline is not None:  # look again as soon as the lease may lapse
                    wait = min(wait, max(0.005, deadline - time.monotonic() + 0.001))
            self._changed.wait(wait)
            self._changed.clear()
            if self._roles_stopping.is_set():
                return
            try:
                with self._roles:
                    self._reconcile()
                self.role_error = None
            except Exception as exc:
                self.role_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: changing role failed; trying again", self.name)
                self._roles_stopping.wait(0.5)
                self._changed.set()

    def _reconcile(self) -> None:
        """Make this node what its coordinator says."""
        coordinator = self.coordinator
        assert coordinator is not None
        lead = coordinator.leader(self.me.name)
        if lead is None:
            if self.is_leader:
                self._suspend_leadership()
            return
        self.leader_address = lead.address
        if lead.node == self.node_config.node_name:
            self._standing = None
            unknown = self._handover_unknown_since
            if unknown is not None and coordinator.view_time() > unknown:
                # A switchover whose answer was lost did not happen: this node still leads.
                self._handover_unknown_since = None
                self._handing_over = False
                self._checks_leadership = self.elects
            if self.is_leader and self.elects and not self.leads():
                # Its lease may have lapsed (etcd unreachable): no leader's reads either.
                self._suspend_leadership()
            elif not self.is_leader:
                if not self._lease_valid():
                    return  # named, but its lease may have lapsed: wait for a fresh view
                self._take_leadership(lead)
            elif lead.term != self.term:  # elected again, after its leadership lapsed
                first = self.applied_seq() + 1
                roles.lead_term(self._opened(), lead.term, first)
                self.term = lead.term
            return
        if self._standing is not None:
            if lead.term <= self._standing:
                return  # a candidate waits for the next term's leader
            self._standing = None
        if self.is_leader or self._following != (lead.address, lead.term):
            self._follow(lead)

    def _drop_follower(self) -> None:
        """Stop following: at once where the follower can freeze (its applied seq stays put,
        whatever pull to a lost leader is still under way), else by stopping it."""
        role = self.replication
        if role is not None:
            freeze = getattr(role, "freeze", None)
            if freeze is not None:
                freeze()
            else:
                role.stop(self.config.server.forward_timeout + 5)
        self.replication = None
        self._following = None

    def _suspend_leadership(self) -> None:
        """This node's leadership lapsed and nobody else leads yet: stop taking writes; its
        data stays a leader's until it knows who leads next."""
        log.warning("%s: leadership of term %d lapsed; writes stop", self.name, self.term)
        self.is_leader = False
        self.role = "replica"
        self._stop_leading()

    def _stop_leading(self) -> None:
        """Stop the replication role, whichever it is: a leader's (its long-polls end, its log
        closes) or a follower's."""
        leader_log = self.leader_log
        if leader_log is None:
            self._drop_follower()
            return
        leader_log.log.stop_waiting()
        if self.replication is not None:
            self.replication.stop(self.config.server.forward_timeout + 5)
            self.replication = None
        leader_log.close()
        self.leader_log = None

    def _take_leadership(self, lead: Leadership) -> None:
        self._drop_follower()
        store = self._opened()
        self.leader_log = self._new_leader_log()
        roles.lead_term(store, lead.term, self.leader_log.log.last_seq + 1)
        self.term = lead.term
        transport = self.registry.replication_transport(self.config.cluster.replication)
        role = transport.leader(self)
        role.start()
        self.replication = role
        self.role = "leader"
        self.is_leader = True  # last: from here on writes come in
        log.warning(
            "%s: leads shard %s from term %d, at seq %d",
            self.name,
            self.me.name,
            lead.term,
            self.leader_log.log.last_seq,
        )

    def _follow(self, lead: Leadership) -> None:
        if self.is_leader:
            self.is_leader = False
            self.role = "replica"
        self._stop_leading()
        self._handing_over = False
        self._checks_leadership = self.elects
        coordinator = self.coordinator
        assert coordinator is not None
        store = self._opened()
        fork = coordinator.fork_after(self.me.name, self.term) if self.term < lead.term else None
        where = {"shard": self.me.name, "node": self.node_config.node_name}
        if store.get(LAST_SEQ, roles.META) is not None:
            self.rolled_back += roles.step_down(
                store, fork=fork, term=self.term, data_dir=self.data_dir, **where
            )
        elif fork is not None:
            self.rolled_back += roles.roll_back_replica(
                store, fork=fork, term=self.term, data_dir=self.data_dir, **where
            )
        store.put(roles.TERM, b"%d" % lead.term, ns=roles.META, sync=True)
        self.term = lead.term
        self.leader_address = lead.address
        transport = self.registry.replication_transport(self.config.cluster.replication)
        role = transport.follower(self)
        role.start()
        self.replication = role
        self._following = (lead.address, lead.term)
        log.info("%s: follows %s at %s (term %d)", self.name, lead.node, lead.address, lead.term)

    def stop_roles(self) -> None:
        """Stop changing roles, and give up any leadership (an electing coordination)."""
        self._roles_stopping.set()
        self._changed.set()
        if self._role_thread is not None:
            self._role_thread.join(self.config.server.forward_timeout + 10)
        if self.coordinator is not None:
            self.coordinator.stop(self.config.server.forward_timeout)

    def begin_stopping(self) -> None:
        """The node is about to stop: a replica waiting in a long-poll gets its answer now, and
        later polls are refused (503), so that replicas do not hold up the drain."""
        if self.leader_log is not None:
            self.leader_log.log.stop_waiting()

    def stop_replication(self, timeout: float) -> None:
        self.stop_roles()
        with self._roles:
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
        leader_log = self._leader_log()
        if self._checks_leadership and not self.may_acknowledge():
            raise self._not_leader(stored=False)
        try:
            seq = leader_log.committer.write(ops, guard=self._write_guard(ops, client=client))
        except BackendClosedError:
            if leader_log is not self.leader_log:  # it stepped down: the write was not queued
                raise self._not_leader(stored=False) from None
            raise
        needed = self.config.cluster.min_replicas
        if needed:
            timeout = self.config.cluster.min_replicas_timeout
            if not leader_log.progress.wait_replicated(seq, needed, timeout):
                raise NotReplicatedError(
                    f"the write (seq {seq}) is stored on the leader {self.name} but fewer than"
                    f" {needed} replica(s) applied it within {timeout:g}s; it may not be"
                    " replicated"
                )
        if self._checks_leadership and not self.may_acknowledge():
            raise self._not_leader(stored=True)
        return seq

    def _not_leader(self, *, stored: bool) -> NotLeaderError:
        if stored:
            what = (
                f"{self.name} stored the write but its leadership of term {self.term} lapsed"
                " before it could acknowledge it: its outcome is unknown"
            )
        else:
            what = f"{self.name} does not lead shard {self.me.name} now; the write was not applied"
        leader = self.leader_address if not self.is_leader else None
        return NotLeaderError(what, leader=leader, stored=stored)

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
                raise self._not_leader(stored=False)
            if self._checks_leadership:
                if not self.may_acknowledge():
                    raise self._not_leader(stored=False)
                done = self._fenced(done)
            leader_log = self._leader_log()
            try:
                leader_log.committer.submit(ops, done, guard=self._write_guard(ops, client=True))
            except BackendClosedError:
                if leader_log is not self.leader_log:  # it stepped down: not queued
                    raise self._not_leader(stored=False) from None
                raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller's answer
            done(0, exc)

    def _fenced(
        self, done: Callable[[int, BaseException | None], None]
    ) -> Callable[[int, BaseException | None], None]:
        """``done``, but a write that was applied after this node's leadership lapsed is
        answered as unknown rather than acknowledged."""

        def answer(seq: int, error: BaseException | None) -> None:
            if error is None and not self.may_acknowledge():
                error = self._not_leader(stored=True)
            done(seq, error)

        return answer

    def _leader_log(self) -> LeaderLog:
        leader_log = self.leader_log
        if leader_log is None:
            raise self._not_leader(stored=False)
        return leader_log

    def _write_guard(self, ops: Sequence[Op], *, client: bool) -> Callable[[], None]:
        """What the committer checks under its queue lock before it queues a write: that no
        switchover fences writes (hand_over sets the fence, then reads the committed seq: every
        write queued later is refused, so none gets a seq past it) and, for a client's write,
        that no reshard is moving its keys."""
        maps = self.maps
        epoch = maps.epoch

        def guard() -> None:
            if self._handing_over:
                raise self._not_leader(stored=False)
            if client:
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

    def compact(self) -> dict:
        """Compact the engine's table files now (LevelDB, RocksDB), after a bulk load or a large
        purge; which files it rewrites (and so how much deleted data leaves the disk) is the
        engine's choice. The node keeps serving meanwhile. Raises UnsupportedOperationError on
        an engine without compaction (LMDB's B+tree needs none)."""
        store = self._opened()
        if not store.capabilities.compaction:
            raise UnsupportedOperationError(
                f"the {self.backend_name} backend has no compaction (nothing to do)"
            )
        before = store.stats().disk_bytes
        started = time.monotonic()
        log.info("compaction of %s started (%s bytes on disk)", self.name, before)
        store.compact()
        seconds = time.monotonic() - started
        after = store.stats().disk_bytes
        log.info(
            "compaction of %s done in %.2f s: %s -> %s bytes", self.name, seconds, before, after
        )
        return {
            "compacted": True,
            "seconds": round(seconds, 3),
            "disk_bytes_before": before,
            "disk_bytes_after": after,
        }

    def status(self) -> dict:
        stats = self._opened().stats()
        return {
            "node": self.name,
            "shard": self.me.name,
            "idx": self.me.idx,
            "role": self.role,
            "leader": self.leader_of(self.me),
            "term": self.term,
            "address": str(self.address),
            "backend": self.backend_name,
            "durability": self.config.storage.durability,
            "server": self.config.cluster.server,
            "keys": stats.keys.get("data"),
            "disk_bytes": stats.disk_bytes,
            "fingerprint": self.maps.routing.fingerprint,
            "reshard": self.maps.progress(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "pid": os.getpid(),
            "version": __version__,
            "replication": {
                "transport": self.config.cluster.replication,
                **(self.replication.status() if self.replication is not None else {}),
            },
            "coordination": {
                "name": self.coordination.name,
                **(self.coordinator.status() if self.coordinator is not None else {}),
                "rolled_back": self.rolled_back,
                "role_error": self.role_error,
                # The last terms this node led, with the first seq of each.
                "terms_led": roles.read_terms(self._opened())[-5:],
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
