"""What the core's hashing schemes do beyond the hashing conformance suite
(test_conformance_hashing.py runs that on both): modulo places keys as the Go original does,
each scheme validates its own settings, and the ring's weights and names."""

from __future__ import annotations

import random

import pytest

from distribkv.hashing.api import InvalidLayoutError, ShardSlot
from distribkv.hashing.modulo import ModuloPlacement, fnv1_64
from distribkv.hashing.modulo import create as create_modulo
from distribkv.hashing.ring import DEFAULT_VNODES, RingPlacement
from distribkv.hashing.ring import create as create_ring


def slots(n: int) -> list[ShardSlot]:
    return [ShardSlot(i, f"shard-{i}") for i in range(n)]


def random_keys(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 32)) for _ in range(count)]


# FNV-1 64 check values: the golden values of Go's hash/fnv tests for New64.
FNV1_64_VECTORS = {
    b"": 0xCBF29CE484222325,
    b"a": 0xAF63BD4C8601B7BE,
    b"ab": 0x08326707B4EB37B8,
    b"abc": 0xD8DCCA186BAFADCB,
    b"foobar": 0x340D8765A4DDA9C2,
}


@pytest.mark.parametrize(("data", "expected"), FNV1_64_VECTORS.items())
def test_fnv1_64_matches_the_reference_vectors(data, expected):
    assert fnv1_64(data) == expected


def test_modulo_places_keys_like_the_go_original():
    two = ModuloPlacement(2)
    assert two.shard_for(b"USA") == 0
    assert two.shard_for(b"Soviet") == 1
    for data, digest in FNV1_64_VECTORS.items():
        for n in (1, 2, 3, 7, 16):
            assert ModuloPlacement(n).shard_for(data or b"x") == fnv1_64(data or b"x") % n
            assert digest % n == fnv1_64(data) % n


def test_modulo_rejects_settings_and_weights():
    with pytest.raises(InvalidLayoutError, match="no settings"):
        create_modulo(slots(2), {"vnodes": 3})
    with pytest.raises(InvalidLayoutError, match="weights"):
        create_modulo([ShardSlot(0, "a", 2.0)], {})
    with pytest.raises(InvalidLayoutError):
        create_modulo([], {})


KEYS = random_keys(100_000)


def test_ring_weights_shift_load_proportionally():
    shards = [ShardSlot(0, "small", 1.0), ShardSlot(1, "big", 3.0)]
    placement = create_ring(shards, {})
    share = sum(placement.shard_for(k) == 1 for k in KEYS) / len(KEYS)
    assert 0.70 <= share <= 0.80


def test_ring_validates_its_settings():
    with pytest.raises(InvalidLayoutError, match="vnodes"):
        create_ring(slots(2), {"vnodes": 0})
    with pytest.raises(InvalidLayoutError, match="unknown setting"):
        create_ring(slots(2), {"replicas": 3})
    with pytest.raises(InvalidLayoutError, match="weight"):
        create_ring([ShardSlot(0, "a", -1.0)], {})
    assert create_ring(slots(2), {"vnodes": 8}).describe()["vnodes"] == 8
    assert create_ring(slots(2), {}).describe()["vnodes"] == DEFAULT_VNODES


def test_ring_placement_depends_on_names_not_on_list_order():
    forward = RingPlacement([ShardSlot(0, "a"), ShardSlot(1, "b")], 64)
    names = {0: "a", 1: "b"}
    backward = RingPlacement([ShardSlot(0, "b"), ShardSlot(1, "a")], 64)
    names_back = {0: "b", 1: "a"}
    for key in KEYS[:2000]:
        assert names[forward.shard_for(key)] == names_back[backward.shard_for(key)]
