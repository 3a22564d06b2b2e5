"""The ``static`` coordination (the default): ``sharding.toml`` says who leads each shard.

Leadership never moves on its own, so a leader's right to acknowledge never lapses. Only a
planned switchover (``distribkv promote``) moves it: each node it reaches records the new
leader, its term and where its history began in its own metadata (``leaders``), where a
restart finds it, and logs that the file should be updated. Without a switchover every term
is 0.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from distribkv import hookimpl
from distribkv.coordination.api import CoordinationSpec, Coordinator, Leadership
from distribkv.storage.api import Namespace

log = logging.getLogger(__name__)

__all__ = ["LEADERS", "StaticCoordinator"]

#: Metadata key: the switchovers this node was told of, ``{shard: {"node", "address",
#: "term", "forks": {term: fork}}}``.
LEADERS = b"leaders"


class StaticCoordinator(Coordinator):
    def __init__(self, node, settings: Mapping[str, Any]):
        self.node = node
        self._lock = threading.Lock()
        self._changed: Callable[[], None] = lambda: None
        store = node.store
        raw = store.get(LEADERS, Namespace.META) if store is not None else None
        self.overrides: dict[str, dict[str, Any]] = json.loads(raw) if raw else {}
        for shard, lead in self.overrides.items():
            configured = node.config.shard(shard).address if self._known(shard) else None
            log.warning(
                "%s: %s leads shard %s since a switchover (term %d), but sharding.toml names"
                " the node at %s: update the file",
                node.name,
                lead["node"],
                shard,
                lead["term"],
                configured,
            )

    def _known(self, shard: str) -> bool:
        return any(s.name == shard for s in self.node.config.shards)

    def start(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    def stop(self, timeout: float) -> None:
        pass

    def leader(self, shard: str) -> Leadership | None:
        lead = self.overrides.get(shard)
        if lead is not None:
            return Leadership(shard, lead["node"], lead["address"], lead["term"])
        for info in self.node.shard_map.shards:
            if info.name == shard:
                return Leadership(shard, "leader", info.leader, 0)
        return None  # a shard of another map (a reshard's target): the caller's map says

    def fork_after(self, shard: str, term: int) -> int | None:
        forks = (self.overrides.get(shard) or {}).get("forks", {})
        later = [fork for t, fork in forks.items() if int(t) > term]
        return min(later) if later else None

    def hand_over(self, shard: str, node: str, address: str, fork: int) -> Leadership:
        current = self.leader(shard)
        lead = Leadership(shard, node, address, (current.term if current else 0) + 1)
        self.record(lead, fork)
        return lead

    def record(self, lead: Leadership, fork: int) -> None:
        with self._lock:
            previous = self.overrides.get(lead.shard, {})
            if previous.get("term", 0) >= lead.term:
                return  # already known (or older than what is)
            forks = {**previous.get("forks", {}), str(lead.term): fork}
            self.overrides[lead.shard] = {
                "node": lead.node,
                "address": lead.address,
                "term": lead.term,
                "forks": forks,
            }
            store = self.node.store
            if store is not None:
                store.put(
                    LEADERS, json.dumps(self.overrides).encode(), ns=Namespace.META, sync=True
                )
        log.warning(
            "%s: %s at %s leads shard %s from term %d (a switchover); sharding.toml still names"
            " the old leader: update the file",
            self.node.name,
            lead.node,
            lead.address,
            lead.shard,
            lead.term,
        )
        self._changed()

    def status(self) -> dict[str, Any]:
        return {
            "switchovers": {
                shard: {"node": lead["node"], "address": lead["address"], "term": lead["term"]}
                for shard, lead in sorted(self.overrides.items())
            }
        }


@hookimpl
def distribkv_coordinations() -> list[CoordinationSpec]:
    return [
        CoordinationSpec(
            "static",
            StaticCoordinator,
            "sharding.toml says who leads; no failover, switchover by distribkv promote (default)",
        )
    ]
