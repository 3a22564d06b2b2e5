"""A node's shard map across a reshard: the map it serves, and the move it is part of.

``distribkv reshard`` walks every node of the cluster through the phases of one
:class:`Transition` from the map ``source`` to the map ``target``:

``copy``
    Keys that move are copied from their old owner to their new one while the old owner keeps
    serving them. Every node routes client requests by the source map until it commits; the
    nodes of a shard that only exists in the target map ("joining") hold no client data.
``fence``
    Old owners refuse writes to keys that move (503, retried by clients); the last of their
    log is copied and the moved ranges are verified.
``verified``
    The copies match their sources: old and new owners both answer reads of moving keys.
``switch``
    Reads of moving keys go to the new owner, which has verified data; writes still wait.
``commit``
    The node serves the target map, and remembers which map it left, so a restart with the old
    ``sharding.toml`` keeps the new layout (with a warning) instead of going back.

Everything here is persisted in the node's metadata in one apply per change, so a node that
restarts mid-move comes back in the same phase, and nothing depends on the process that drives
the move staying alive.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import attrs

from distribkv.hashing.shardmap import ShardInfo, ShardMap
from distribkv.storage.api import Delete, Namespace, Op, Put

log = logging.getLogger(__name__)

META = Namespace.META
MAP_KEY = b"map"  # the map this node serves, when a reshard committed it
MAP_FROM_KEY = b"map_from"  # the fingerprint of the map it left at that commit
TRANSITION_KEY = b"transition"  # the move in progress
JOINING_KEY = b"joining"  # a new shard's node: the map it joins from, until the commit

PHASES = ("copy", "fence", "verified", "switch")


class Moving(Exception):
    """A client write to a key that is between owners (answered 503; retry shortly)."""


@attrs.frozen
class Transition:
    id: str
    source: ShardMap
    target: ShardMap
    phase: str

    @property
    def fenced(self) -> bool:
        return self.phase != "copy"

    @property
    def verified(self) -> bool:
        return self.phase in ("verified", "switch")

    def owners(self, key: bytes) -> tuple[str, str]:
        """The names of the key's owner in the source map and in the target map."""
        return self.source.owner_of(key).name, self.target.owner_of(key).name

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "source": self.source.describe(),
                "target": self.target.describe(),
                "phase": self.phase,
            },
            sort_keys=True,
        ).encode()


def map_from_description(registry, data: dict[str, Any], where: str) -> ShardMap:
    """Build a map someone sent or stored, and check that it hashes to its fingerprint here."""
    scheme = registry.hashing_scheme(data["hashing"])
    built = ShardMap.from_description(data, scheme)
    claimed = data.get("fingerprint")
    if claimed is not None and claimed != built.fingerprint:
        raise ValueError(
            f"{where}: the map claims fingerprint {claimed} but hashes to {built.fingerprint}"
            " here (are the same hashing plugins installed?)"
        )
    return built


class MapState:
    """The map a node serves, its transition, and the rules a reshard imposes on requests."""

    def __init__(self, node, config_map: ShardMap):
        self.node = node
        self.map = config_map
        self.transition: Transition | None = None
        self.switched_from: str | None = None
        #: Set on the nodes of a shard that a reshard adds, from its first phase until its
        #: commit (kept through an abort): they route by the old map meanwhile.
        self.joining_source: ShardMap | None = None
        #: Changes whenever routing may change; a write that sees it change re-checks owners.
        self.epoch = 0
        self.lock = threading.Lock()

    # --- persistence ----------------------------------------------------------------------

    def load(self) -> None:
        """Reconcile what the node stored at its last commit with its configuration."""
        node, store, config_map = self.node, self.node.store, self.map
        registry = node.registry
        raw = store.get(MAP_KEY, META)
        switched_from = store.get(MAP_FROM_KEY, META)
        if raw is not None:
            stored = map_from_description(registry, json.loads(raw), f"{node.name} metadata")
            left = switched_from.decode() if switched_from else None
            if stored.fingerprint == config_map.fingerprint:
                self.switched_from = left
            elif left == config_map.fingerprint:
                self.map = stored
                self.switched_from = left
                log.warning(
                    "%s: %s describes map %s, which this node left when a reshard committed"
                    " map %s; serving map %s (put the new layout into the configuration)",
                    node.name,
                    node.config.path,
                    left,
                    stored.fingerprint,
                    stored.fingerprint,
                )
            else:
                log.warning(
                    "%s: the configuration's map %s replaces map %s that a reshard left here",
                    node.name,
                    config_map.fingerprint,
                    stored.fingerprint,
                )
                store.apply([Delete(META, MAP_KEY), Delete(META, MAP_FROM_KEY)], sync=True)
        raw = store.get(JOINING_KEY, META)
        if raw is not None:
            self.joining_source = map_from_description(
                registry, json.loads(raw), f"{node.name} metadata"
            )
        raw = store.get(TRANSITION_KEY, META)
        if raw is not None:
            data = json.loads(raw)
            source = map_from_description(registry, data["source"], f"{node.name} metadata")
            target = map_from_description(registry, data["target"], f"{node.name} metadata")
            if self.map.fingerprint in (source.fingerprint, target.fingerprint):
                self.transition = Transition(data["id"], source, target, data["phase"])
                log.warning(
                    "%s: reshard %s is in phase %s; rerun `distribkv reshard` to finish it",
                    node.name,
                    data["id"],
                    data["phase"],
                )
            else:
                log.warning(
                    "%s: dropping reshard %s, which does not involve map %s",
                    node.name,
                    data["id"],
                    self.map.fingerprint,
                )
                store.apply([Delete(META, TRANSITION_KEY)], sync=True)

    # --- what the reshard driver asks -----------------------------------------------------

    def describe(self) -> dict[str, Any]:
        t = self.transition
        return {
            "node": self.node.name,
            "role": self.node.role,
            "fingerprint": self.map.fingerprint,
            "switched_from": self.switched_from,
            "joining": self.joining_source is not None,
            "transition": None
            if t is None
            else {
                "id": t.id,
                "source": t.source.fingerprint,
                "target": t.target.fingerprint,
                "phase": t.phase,
            },
        }

    def committed(self, source_fp: str, target_fp: str) -> bool:
        return self.map.fingerprint == target_fp and self.switched_from == source_fp

    def prepare(self, transition: Transition) -> str:
        """Enter (or move within) ``transition``; returns "committed" if it already is."""
        name = self.node.me.name
        if transition.phase not in PHASES:
            raise ValueError(f"unknown phase {transition.phase!r} (known: {', '.join(PHASES)})")
        with self.lock:
            if self.committed(transition.source.fingerprint, transition.target.fingerprint):
                return "committed"
            current = self.transition
            if current is not None and current.id != transition.id:
                raise ValueError(
                    f"{self.node.name} is part of reshard {current.id} (to map"
                    f" {current.target.fingerprint}); finish or abort that one first"
                )
            if self.map.fingerprint not in (
                transition.source.fingerprint,
                transition.target.fingerprint,
            ):
                raise ValueError(
                    f"{self.node.name} serves map {self.map.fingerprint}, which is neither the"
                    f" reshard's source {transition.source.fingerprint} nor its target"
                    f" {transition.target.fingerprint}"
                )
            try:
                mine = transition.target.shard(name)
            except KeyError:
                raise ValueError(f"shard {name!r} is not in the target map") from None
            if mine.leader != self.node.me.leader or mine.replicas != self.node.me.replicas:
                raise ValueError(
                    f"shard {name!r} has other addresses in the target map; a reshard moves"
                    " keys, not nodes"
                )
            if (
                current is not None
                and current.verified
                and PHASES.index(transition.phase) < PHASES.index(current.phase)
            ):
                raise ValueError(
                    f"reshard {current.id} verified its copies and is in phase {current.phase}"
                    f" on {self.node.name}; it can only go on to switch and commit now"
                )
            ops = [Put(META, TRANSITION_KEY, transition.to_json())]
            joining = not any(s.name == name for s in transition.source.shards)
            if joining and self.joining_source is None:
                ops.append(
                    Put(
                        META,
                        JOINING_KEY,
                        json.dumps(transition.source.describe(), sort_keys=True).encode(),
                    )
                )
            self.node.store.apply(ops, sync=True)
            if joining and self.joining_source is None:
                self.joining_source = transition.source
            self.transition = transition
            self.epoch += 1
        if current is None or current.phase != transition.phase:
            log.info(
                "%s: reshard %s enters phase %s (map %s -> %s)",
                self.node.name,
                transition.id,
                transition.phase,
                transition.source.fingerprint,
                transition.target.fingerprint,
            )
        return transition.phase

    def commit(self, transition_id: str, source_fp: str, target_fp: str) -> str:
        with self.lock:
            if self.committed(source_fp, target_fp):
                return "committed"
            t = self.transition
            if t is None or t.id != transition_id:
                raise ValueError(
                    f"{self.node.name} is not prepared for reshard {transition_id}"
                    f" (it serves map {self.map.fingerprint})"
                )
            if t.phase != "switch":
                raise ValueError(f"reshard {t.id} is in phase {t.phase}, not switch")
            self.node.store.apply(
                [
                    Put(META, MAP_KEY, json.dumps(t.target.describe(), sort_keys=True).encode()),
                    Put(META, MAP_FROM_KEY, source_fp.encode()),
                    Delete(META, TRANSITION_KEY),
                    Delete(META, JOINING_KEY),
                ],
                sync=True,
            )
            self.map = t.target
            self.switched_from = source_fp
            self.transition = None
            self.joining_source = None
            self.epoch += 1
            self.node.me = t.target.shard(self.node.me.name)
        log.info("%s: now serving map %s (from %s)", self.node.name, target_fp, source_fp)
        return "committed"

    def abort(self, transition_id: str) -> str:
        with self.lock:
            t = self.transition
            if t is None:
                return "none"
            if t.id != transition_id:
                raise ValueError(f"{self.node.name} is part of reshard {t.id}, not {transition_id}")
            if t.verified:
                raise ValueError(
                    f"{self.node.name} is in phase {t.phase} of reshard {t.id}: the copies were"
                    " verified and may be read; rerun the reshard to commit"
                )
            # A joining node stays joining: it routes by the old map until a commit.
            ops: list[Op] = [Delete(META, TRANSITION_KEY)]
            revert = self.joining_source is None and self.map.fingerprint != t.source.fingerprint
            if revert:
                # Started with the new file during the move: keep serving the old map, also
                # after a restart with that file (as if a reshard had switched it back).
                ops.append(
                    Put(META, MAP_KEY, json.dumps(t.source.describe(), sort_keys=True).encode())
                )
                ops.append(Put(META, MAP_FROM_KEY, self.map.fingerprint.encode()))
            self.node.store.apply(ops, sync=True)
            if revert:
                self.switched_from = self.map.fingerprint
                self.map = t.source
                self.node.me = t.source.shard(self.node.me.name)
            self.transition = None
            self.epoch += 1
        log.warning(
            "%s: reshard %s aborted in phase %s; serving map %s",
            self.node.name,
            t.id,
            t.phase,
            self.map.fingerprint,
        )
        return "aborted"

    # --- the rules for client requests ----------------------------------------------------

    @property
    def joining(self) -> bool:
        """This node's shard is being added by a reshard that has not committed."""
        return self.joining_source is not None

    @property
    def routing(self) -> ShardMap:
        """The map client requests are routed by: the old one until a move commits."""
        t = self.transition
        if t is not None:
            return t.source
        return self.joining_source or self.map

    def route(self, key: bytes) -> tuple[ShardInfo, str]:
        """The shard that answers for ``key`` now, and the fingerprint to route it with."""
        t = self.transition
        if t is not None and t.verified:
            old, new = t.owners(key)
            if old != new:
                if t.phase == "switch":
                    # The new owner holds the verified copy; reads go there.
                    return t.target.owner_of(key), t.target.fingerprint
                me = self.node.me
                if me.name in (old, new):
                    # Verified: both sides hold the same data and neither takes writes, so
                    # either answers reads (no redirect loop while nodes enter "switch").
                    return me, t.source.fingerprint
        routing = self.routing
        return routing.owner_of(key), routing.fingerprint

    def verdict(self, key: bytes) -> str | None:
        """During a fenced move: "out" for a key leaving this shard, "in" for one arriving;
        None when nothing about the key changes here (or no move is fenced)."""
        t = self.transition
        if t is None or not t.fenced:
            return None
        me = self.node.me.name
        old, new = t.owners(key)
        if old == new:
            return None
        if old == me:
            return "out"
        if new == me:
            return "in"
        return None

    def check_write(self, keys, epoch: int) -> None:
        """Raise :class:`Moving` if a client may not write any of ``keys`` now. Called under
        the leader's write lock, so a fence and the seq read after it cannot miss a write;
        ``epoch`` is the one the request was routed in (a change means: check the owners)."""
        t = self.transition
        if t is None and epoch == self.epoch and not self.joining:
            return
        me = self.node.me.name
        routing = self.routing
        for key in keys:
            if t is not None and t.fenced:
                old, new = t.owners(key)
                if old != new and me in (old, new):
                    raise Moving(f"the key is moving from {old} to {new} (reshard {t.id})")
            owner = routing.owner_of(key).name
            if owner != me:
                raise Moving(f"shard {owner} owns the key now (the map changed); retry")
