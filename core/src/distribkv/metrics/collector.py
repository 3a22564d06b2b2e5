"""The node's metrics as ``prometheus_client`` metric families, built when ``/metrics`` is
scraped: from the plain counts of :mod:`distribkv.metrics.counts`, and from the node's state
(role, replication, storage, reshard) read at that moment. Serving a request never touches
``prometheus_client``.

Names follow Prometheus' conventions: ``distribkv_`` first, ``_total`` for counters,
``_seconds`` and ``_bytes`` for units. Labels are few and bounded: a route is one of the
node's route paths or ``other``, a replica one of its shard's nodes in the cluster file, a
shard one of the map's; never a key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from distribkv import __version__
from distribkv.metrics.counts import Buckets, NodeCounts
from distribkv.transition import PHASES

log = logging.getLogger(__name__)

__all__ = ["REPLICA_STATES", "NodeCollector", "node_registry"]

#: The states a replica's follower reports (``/status`` ``replication.state``).
REPLICA_STATES = ("starting", "following", "resyncing", "retrying", "diverged")
#: The reshard phases, and "none" outside a reshard.
RESHARD_PHASES = ("none", *PHASES)


def node_registry(node, counts: NodeCounts) -> CollectorRegistry:
    """A registry of the node's own (no global state: several nodes can run in one process):
    its collector, and the library's process collector (CPU, memory, open files)."""
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(NodeCollector(node, counts))
    return registry


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_buckets(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
    cumulative, _, total = buckets.snapshot()
    family.add_metric(labels, cumulative, total)


def _one_of(
    name: str, doc: str, label: str, names: tuple[str, ...], current: str | None
) -> GaugeMetricFamily:
    """A gauge per possible value, 1 for the current one: ``name{label="..."}``."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value in names:
        family.add_metric([value], 1 if value == current else 0)
    return family


class NodeCollector(Collector):
    """Reads one node's counts and state at scrape time. A part that cannot be read now (the
    node is between roles, its storage is closing) is left out of this scrape, and logged at
    debug level: a scrape never fails for it."""

    def __init__(self, node, counts: NodeCounts):
        self.node = node
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        parts: list[Callable[[], Iterator[Metric]]] = [
            self._node,
            self._requests,
            self._routing,
            self._commits,
            self._storage,
            self._replication,
            self._reshard,
        ]
        for part in parts:
            try:
                yield from list(part())
            except Exception:
                log.debug("metrics: %s left out of this scrape", part.__name__, exc_info=True)

    # --- the parts ------------------------------------------------------------------------

    def _node(self) -> Iterator[Metric]:
        node = self.node
        info = InfoMetricFamily(
            "distribkv_node",
            "The node: its shard, role, storage backend, HTTP server and version.",
        )
        info.add_metric(
            [],
            {
                "node": node.name,
                "shard": node.me.name,
                "role": node.role,
                "backend": node.backend_name,
                "server": node.config.cluster.server,
                "version": __version__,
            },
        )
        yield info
        yield GaugeMetricFamily(
            "distribkv_node_leader", "1 while this node leads its shard, else 0.", node.is_leader
        )
        yield GaugeMetricFamily(
            "distribkv_node_term", "The term of the history this node's data belongs to.", node.term
        )
        yield GaugeMetricFamily(
            "distribkv_node_start_time_seconds",
            "When the node started (Unix time).",
            node.started_at,
        )

    def _requests(self) -> Iterator[Metric]:
        requests = self.counts.requests
        if requests is None:
            return
        total = CounterMetricFamily(
            "distribkv_http_requests",
            "HTTP requests answered, by route (the node's route, or 'other') and status code.",
            labels=["route", "code"],
        )
        latency = _histogram(
            "distribkv_http_request_duration_seconds",
            "Time from a request's arrival at the node's application to its answer, by route.",
            ["route"],
        )
        for route, counts in requests.each():
            by_code = requests.by_code(counts)
            for code, count in sorted(by_code.items()):
                total.add_metric([route, code], count)
            if by_code:
                _add_buckets(latency, [route], counts.latency)
        yield total
        yield latency

    def _routing(self) -> Iterator[Metric]:
        counts = self.counts
        with counts.lock:
            redirects = dict(counts.redirects)
            forwards = dict(counts.forwards)
            failures = dict(counts.forward_failures)
            misdirected = counts.misdirected
        family = CounterMetricFamily(
            "distribkv_redirects",
            "Requests answered with a 307 to another node, by reason: 'wrong_shard' (another"
            " shard's key) or 'not_leader' (a write to a replica, a leader-only read).",
            labels=["reason"],
        )
        for reason in ("wrong_shard", "not_leader"):
            family.add_metric([reason], redirects.get(reason, 0))
        yield family
        family = CounterMetricFamily(
            "distribkv_forwarded_requests",
            "Requests forwarded to the shard that owns their key (routing = 'proxy').",
            labels=["shard"],
        )
        for shard, count in sorted(forwards.items()):
            family.add_metric([shard], count)
        yield family
        family = CounterMetricFamily(
            "distribkv_forward_failures",
            "Forwarded requests that got no answer from the owner, by shard and reason"
            " ('timeout': 504, 'unreachable': 502, 'busy': 503).",
            labels=["shard", "reason"],
        )
        for (shard, reason), count in sorted(failures.items()):
            family.add_metric([shard, reason], count)
        yield family
        yield CounterMetricFamily(
            "distribkv_misdirected_requests",
            "Forwarded requests refused with 421: they reached a node that does not own the"
            " key (the nodes' maps disagree).",
            misdirected,
        )

    def _commits(self) -> Iterator[Metric]:
        counts = self.counts
        family = _histogram(
            "distribkv_commit_group_size",
            "Writes applied together in one storage apply (one fsync with durability ="
            " 'sync') by the group commit of a leader.",
            [],
        )
        _add_buckets(family, [], counts.commit_groups)
        yield family
        family = _histogram(
            "distribkv_commit_apply_seconds",
            "Time of one group-commit storage apply, its fsync included with durability = 'sync'.",
            [],
        )
        _add_buckets(family, [], counts.commit_seconds)
        yield family

    def _storage(self) -> Iterator[Metric]:
        store = self.node.store
        if store is None:
            return
        stats = store.stats()
        keys = stats.keys.get("data")
        if keys is not None:  # LevelDB cannot count cheaply; RocksDB's is an estimate
            yield GaugeMetricFamily(
                "distribkv_storage_keys",
                "Keys stored (RocksDB: its estimate; absent where the backend cannot count"
                " them cheaply, as LevelDB).",
                keys,
            )
        yield GaugeMetricFamily(
            "distribkv_storage_disk_bytes",
            "Bytes of the node's data directory on disk.",
            stats.disk_bytes,
        )

    def _replication(self) -> Iterator[Metric]:
        node = self.node
        leader_log = node.leader_log
        if node.is_leader and leader_log is not None:
            yield from self._leader(leader_log)
        else:
            yield from self._replica()
        with self.counts.lock:
            resyncs = self.counts.resyncs
        yield CounterMetricFamily(
            "distribkv_replication_resyncs",
            "Full resyncs (data reloaded from the leader's snapshot) this node did as a replica.",
            resyncs,
        )

    def _leader(self, leader_log) -> Iterator[Metric]:
        log_store = leader_log.log
        last = log_store.last_seq
        trimmed = log_store.trimmed
        yield GaugeMetricFamily(
            "distribkv_replication_last_seq", "The last sequence number of the leader's log.", last
        )
        yield GaugeMetricFamily(
            "distribkv_replication_log_trimmed_seq",
            "The leader's log is trimmed up to this sequence number.",
            trimmed,
        )
        yield GaugeMetricFamily(
            "distribkv_replication_log_entries",
            "Entries the leader's log keeps for its replicas.",
            max(0, last - trimmed),
        )
        node = self.node
        mine = node.node_config.node_name
        addresses = {name: node.node_address(name) for name in node.node_names() if name != mine}
        applied = GaugeMetricFamily(
            "distribkv_replica_applied_seq",
            "The last sequence number each replica of this leader acknowledged.",
            labels=["replica", "address"],
        )
        lag = GaugeMetricFamily(
            "distribkv_replica_lag_entries",
            "Entries each replica of this leader has not applied yet.",
            labels=["replica", "address"],
        )
        lag_seconds = GaugeMetricFamily(
            "distribkv_replica_lag_seconds",
            "Age of the oldest entry each replica of this leader has not applied (0 when it"
            " is caught up).",
            labels=["replica", "address"],
        )
        replicas = leader_log.progress.status(last, log_store.lag_seconds)
        for name, address in sorted(addresses.items()):
            state = replicas.get(name)
            if state is None or state["applied_seq"] is None:
                continue  # not heard of since the leader started
            labels = [name, address]
            applied.add_metric(labels, state["applied_seq"])
            lag.add_metric(labels, state["lag_entries"])
            if state["lag_seconds"] is not None:
                lag_seconds.add_metric(labels, state["lag_seconds"])
        yield applied
        yield lag
        yield lag_seconds

    def _replica(self) -> Iterator[Metric]:
        node = self.node
        role = node.replication
        status = role.status() if role is not None else {}
        yield _one_of(
            "distribkv_replication_state",
            "This replica's replication state: 1 for the state it is in, 0 for the others.",
            "state",
            REPLICA_STATES,
            status.get("state"),
        )
        applied = status.get("applied_seq")
        if applied is not None:
            yield GaugeMetricFamily(
                "distribkv_replication_applied_seq",
                "The last sequence number of the leader's log this replica applied.",
                applied,
            )
        lag = node.lag()
        if lag is not None:
            yield GaugeMetricFamily(
                "distribkv_replication_lag_entries",
                "Entries of the leader's log this replica has not applied yet.",
                lag[0],
            )
            yield GaugeMetricFamily(
                "distribkv_replication_lag_seconds",
                "How far behind its leader this replica is, in seconds.",
                lag[1],
            )

    def _reshard(self) -> Iterator[Metric]:
        transition = self.node.maps.transition
        phase = "none" if transition is None else transition.phase
        yield _one_of(
            "distribkv_reshard_phase",
            "The phase of the reshard this node is part of ('none' outside one): 1 for it, 0"
            " for the others.",
            "phase",
            RESHARD_PHASES,
            phase,
        )
        counts = self.counts
        with counts.lock:
            sent, received = counts.reshard_keys_sent, counts.reshard_keys_received
        yield CounterMetricFamily(
            "distribkv_reshard_keys_sent",
            "Keys (and later writes of them) a reshard copied from this node to their new owner.",
            sent,
        )
        yield CounterMetricFamily(
            "distribkv_reshard_keys_received",
            "Keys (and later writes of them) this node received as their new owner.",
            received,
        )
