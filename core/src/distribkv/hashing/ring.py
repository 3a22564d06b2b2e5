"""``ring``: consistent hashing with virtual nodes and optional per-shard weights.

Each shard owns ``vnodes * weight`` points on a 64-bit ring, placed by xxh3-64 of
``"<shard name>#<i>"``; a key belongs to the first point at or after xxh3-64(key), wrapping
around. Points depend on shard *names*, so adding a shard takes about 1/(N+1) of the keys from
the others and moves nothing else.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

from xxhash import xxh3_64_intdigest

from distribkv import hookimpl
from distribkv.hashing.api import HashingSpec, InvalidLayoutError, Placement, ShardSlot

DEFAULT_VNODES = 4096
MAX_POINTS = 1 << 22


class RingPlacement(Placement):
    def __init__(self, shards: Sequence[ShardSlot], vnodes: int):
        self.shard_count = len(shards)
        self.vnodes = vnodes
        self._weights = {slot.name: slot.weight for slot in shards}
        owners: dict[int, int] = {}
        for slot in shards:
            for i in range(max(1, round(vnodes * slot.weight))):
                point = xxh3_64_intdigest(f"{slot.name}#{i}".encode())
                # On the (astronomically rare) collision, the lower shard name wins everywhere.
                if point not in owners or shards[owners[point]].name > slot.name:
                    owners[point] = slot.idx
        self._points = sorted(owners)
        self._owners = [owners[p] for p in self._points]

    def shard_for(self, key: bytes) -> int:
        i = bisect_left(self._points, xxh3_64_intdigest(key))
        return self._owners[i if i < len(self._points) else 0]

    def describe(self) -> Mapping[str, Any]:
        return {
            "scheme": "ring",
            "hash": "xxh3-64",
            "vnodes": self.vnodes,
            "weights": dict(sorted(self._weights.items())),
        }


def create(shards: Sequence[ShardSlot], settings: Mapping[str, Any]) -> RingPlacement:
    unknown = sorted(set(settings) - {"vnodes"})
    if unknown:
        raise InvalidLayoutError(
            f"unknown setting(s) for hashing scheme 'ring': {', '.join(unknown)} (known: vnodes)"
        )
    vnodes = settings.get("vnodes", DEFAULT_VNODES)
    if type(vnodes) is not int or vnodes < 1:
        raise InvalidLayoutError(f"ring setting 'vnodes' must be an integer >= 1, got {vnodes!r}")
    if not shards:
        raise InvalidLayoutError("at least one shard is needed")
    for slot in shards:
        if not isinstance(slot.weight, int | float) or not 0 < slot.weight <= 100:
            raise InvalidLayoutError(
                f"weight of shard {slot.name!r} must be a number in (0, 100], got {slot.weight!r}"
            )
    if sum(round(vnodes * slot.weight) for slot in shards) > MAX_POINTS:
        raise InvalidLayoutError(f"the ring would have more than {MAX_POINTS} points")
    return RingPlacement(shards, vnodes)


SPEC = HashingSpec(
    name="ring",
    create=create,
    description="consistent hashing (xxh3-64, virtual nodes, weights); a new shard moves ~1/(N+1)",
    settings_help={"vnodes": f"virtual nodes per shard of weight 1 (default {DEFAULT_VNODES})"},
    # Measured on 100,000 random keys for 2 to 16 shards: at most 10 % off the fair share.
    balance=0.10,
    consistent=True,
)


@hookimpl
def distribkv_hashing_schemes() -> list[HashingSpec]:
    return [SPEC]
