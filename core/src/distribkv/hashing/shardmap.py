"""ShardMap: the cluster's layout plus its placement, and the fingerprint that names it.

Every node and client builds the same map from the same ``sharding.toml``. The fingerprint is a
hash of everything that decides where a key lives (scheme, its settings, shard names, indexes,
weights and addresses), so two parties can tell at once whether they agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from distribkv.hashing.api import HashingSpec, Placement, ShardSlot

__all__ = ["ShardInfo", "ShardMap"]


@attrs.frozen
class ShardInfo:
    """What the map knows of a shard: where its leader and replicas listen."""

    idx: int
    name: str
    leader: str
    replicas: tuple[str, ...] = ()
    weight: float = 1.0


class ShardMap:
    def __init__(
        self,
        shards: Sequence[ShardInfo],
        scheme: HashingSpec,
        settings: Mapping[str, Any] | None = None,
    ):
        self.shards: tuple[ShardInfo, ...] = tuple(sorted(shards, key=lambda s: s.idx))
        self.scheme = scheme
        self.settings = dict(settings or {})
        self.placement: Placement = scheme.create(
            [ShardSlot(s.idx, s.name, s.weight) for s in self.shards], self.settings
        )
        self._by_name = {s.name: s for s in self.shards}
        self.fingerprint = hashlib.sha256(
            json.dumps(self.describe(include_fingerprint=False), sort_keys=True).encode()
        ).hexdigest()[:16]

    @classmethod
    def from_config(cls, config, scheme: HashingSpec) -> ShardMap:
        shards = [
            ShardInfo(s.idx, s.name, str(s.address), tuple(str(r) for r in s.replicas), s.weight)
            for s in config.shards
        ]
        return cls(shards, scheme, config.cluster.hashing_settings)

    def owner_of(self, key: bytes) -> ShardInfo:
        """The shard that owns ``key``."""
        return self.shards[self.placement.shard_for(key)]

    def shard(self, name: str) -> ShardInfo:
        return self._by_name[name]

    def addresses(self) -> set[str]:
        """Every address in the map: the only places a request is ever sent or redirected."""
        out = set()
        for shard in self.shards:
            out.add(shard.leader)
            out.update(shard.replicas)
        return out

    def describe(self, *, include_fingerprint: bool = True) -> dict[str, Any]:
        """The map as JSON-able data (what ``/cluster`` publishes)."""
        data: dict[str, Any] = {
            "hashing": self.scheme.name,
            "hashing_settings": self.settings,
            "placement": dict(self.placement.describe()),
            "shards": [
                {
                    "idx": s.idx,
                    "name": s.name,
                    "leader": s.leader,
                    "replicas": list(s.replicas),
                    "weight": s.weight,
                }
                for s in self.shards
            ],
        }
        if include_fingerprint:
            data["fingerprint"] = self.fingerprint
        return data

    @classmethod
    def from_description(cls, data: Mapping[str, Any], scheme: HashingSpec) -> ShardMap:
        shards = [
            ShardInfo(s["idx"], s["name"], s["leader"], tuple(s["replicas"]), s["weight"])
            for s in data["shards"]
        ]
        return cls(shards, scheme, data.get("hashing_settings") or {})
