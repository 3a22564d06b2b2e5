"""The ``static`` coordination (the default): ``sharding.toml`` says who leads each shard.

Leadership never moves on its own, so a leader's right to acknowledge never lapses, and every
term is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from distribkv import hookimpl
from distribkv.coordination.api import CoordinationSpec, Coordinator, Leadership

__all__ = ["StaticCoordinator"]


class StaticCoordinator(Coordinator):
    def __init__(self, node, settings: Mapping[str, Any]):
        self.node = node

    def start(self, changed: Callable[[], None]) -> None:
        pass

    def stop(self, timeout: float) -> None:
        pass

    def leader(self, shard: str) -> Leadership | None:
        info = self.node.shard_map.shard(shard)
        return Leadership(shard, "leader", info.leader, 0)

    def status(self) -> dict[str, Any]:
        return {"name": "static"}


@hookimpl
def distribkv_coordinations() -> list[CoordinationSpec]:
    return [
        CoordinationSpec(
            "static",
            StaticCoordinator,
            "sharding.toml says who leads; no failover (the default)",
        )
    ]
