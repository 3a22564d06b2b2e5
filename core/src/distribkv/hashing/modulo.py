"""``modulo``: FNV-1 64 of the key, modulo the shard count — the Go original's placement.

Go's ``hash/fnv.New64()`` is FNV-1 (multiply, then xor), not FNV-1a. With the same
``sharding.toml`` every key lands on the same shard as in the Go "distribkv" family. Adding a
shard moves about N/(N+1) of the keys; use ``ring`` where layouts change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distribkv import hookimpl
from distribkv.hashing.api import HashingSpec, InvalidLayoutError, Placement, ShardSlot

FNV64_OFFSET_BASIS = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF


def fnv1_64(data: bytes, _basis=FNV64_OFFSET_BASIS, _prime=FNV64_PRIME, _mask=_MASK) -> int:
    """FNV-1 64-bit hash of ``data`` (Go's ``hash/fnv.New64``). The constants are bound as
    defaults: locals are faster than globals in the per-byte loop, which every request runs."""
    h = _basis
    for byte in data:
        h = ((h * _prime) & _mask) ^ byte
    return h


class ModuloPlacement(Placement):
    def __init__(self, shard_count: int):
        self.shard_count = shard_count
        if shard_count == 1:
            self.shard_for = self._only_shard  # type: ignore[method-assign] # no key needs hashing

    def shard_for(self, key: bytes) -> int:
        return fnv1_64(key) % self.shard_count

    @staticmethod
    def _only_shard(key: bytes) -> int:
        return 0

    def describe(self) -> Mapping[str, Any]:
        return {"scheme": "modulo", "hash": "fnv1-64", "shards": self.shard_count}


def create(shards: Sequence[ShardSlot], settings: Mapping[str, Any]) -> ModuloPlacement:
    if settings:
        raise InvalidLayoutError(
            f"hashing scheme 'modulo' takes no settings, got: {', '.join(sorted(settings))}"
        )
    if not shards:
        raise InvalidLayoutError("at least one shard is needed")
    if any(slot.weight != 1.0 for slot in shards):
        raise InvalidLayoutError("hashing scheme 'modulo' does not support shard weights")
    return ModuloPlacement(len(shards))


SPEC = HashingSpec(
    name="modulo",
    create=create,
    description="FNV-1 64 mod shard count, as the Go original (adding a shard moves most keys)",
    balance=0.05,
)


@hookimpl
def distribkv_hashing_schemes() -> list[HashingSpec]:
    return [SPEC]
