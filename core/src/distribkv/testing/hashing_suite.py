"""The hashing-scheme conformance suite: every hashing scheme must pass all of it.

Import it into a test module of the scheme's distribution and name the scheme::

    # tests/test_conformance.py
    from distribkv.testing.hashing_suite import *  # noqa: F403

    pytest -p distribkv.testing --distribkv-hashing=myscheme tests/

(an installed name, or ``module:attribute`` naming a ``HashingSpec``; or define a
``hashing_name`` fixture in that module, see :mod:`distribkv.testing`). A ``hashing_settings``
fixture gives the scheme's settings (none by default).

Every scheme must place each key on one shard in range, the same on every call, for every
placement of the same layout and in every process (nothing salted per process, such as
Python's ``hash()``), and refuse what it cannot place with ``InvalidLayoutError``. What a scheme
promises beyond that it declares on its ``HashingSpec``, and the suite checks exactly that:
``balance`` (how far a shard's share may be from fair; without it, only that no shard is left
empty) and ``consistent`` (adding a shard moves keys only onto it, about 1/(N+1) of them;
without it, movement is measured and reported, not checked).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from distribkv.hashing.api import HashingSpec, InvalidLayoutError, Placement, ShardSlot
from distribkv.testing import resolve_spec
from distribkv.testing.worker import SETTINGS_ENV, equal_slots, sample_keys

__all__ = [
    "hashing_spec",
    "place",
    "test_a_layout_it_cannot_place_is_refused",
    "test_adding_a_shard_moves_keys_only_onto_it",
    "test_every_key_has_one_shard_in_range_on_every_call",
    "test_every_shard_gets_its_fair_share",
    "test_placement_is_the_same_in_a_fresh_process",
    "test_the_description_is_data_and_the_same_for_the_same_layout",
    "test_weights_shift_keys_in_proportion",
]

#: Keys for shares and movement: enough that a 10 % promise is not noise at 16 shards.
SAMPLE = 100_000
#: Keys whose bytes are what a percent-decoding or text-handling bug would trip over.
EDGE_KEYS = [
    b"\x00",
    b"\xff",
    b"\xff" * 511,
    bytes(range(256)),
    b"a",
    b"USA",
    b"Soviet",
    b"%FF",
    b"a b&c=d/e",
    "ключ".encode(),
]
#: The movement bound of a consistent scheme that makes no balance promise: 30 % over 1/(N+1).
CONSISTENT_SLACK = 0.3


@functools.cache
def keys() -> tuple[bytes, ...]:
    return tuple(sample_keys(SAMPLE))


@pytest.fixture
def hashing_spec(hashing_name: str) -> HashingSpec:
    """The ``HashingSpec`` of the scheme under test."""
    return resolve_spec("hashing", hashing_name)


@pytest.fixture
def place(
    hashing_spec: HashingSpec, hashing_settings: Mapping[str, Any]
) -> Callable[..., Placement]:
    """``place(n)``: a placement for ``n`` shards of equal weight; ``place(slots=[...])`` for
    a layout of its own."""

    def make(count: int = 0, *, slots: list[ShardSlot] | None = None) -> Placement:
        return hashing_spec.create(
            slots if slots is not None else equal_slots(count), {**hashing_settings}
        )

    return make


def shares(placement: Placement, count: int) -> list[int]:
    counts = [0] * count
    for key in keys():
        counts[placement.shard_for(key)] += 1
    return counts


@pytest.mark.parametrize("shard_count", [1, 2, 3, 7, 16])
def test_every_key_has_one_shard_in_range_on_every_call(place, shard_count):
    placement = place(shard_count)
    again = place(shard_count)
    assert placement.shard_count == shard_count
    for key in [*EDGE_KEYS, *keys()[:20_000]]:
        shard = placement.shard_for(key)
        assert type(shard) is int and 0 <= shard < shard_count, (key, shard)
        assert placement.shard_for(key) == shard, key
        assert again.shard_for(key) == shard, key


@pytest.mark.parametrize("shard_count", [2, 5, 16])
def test_placement_is_the_same_in_a_fresh_process(
    hashing_name, place, hashing_settings, shard_count
):
    """Nothing salted per process (like Python's ``hash()``) may influence placement: two
    processes with different hash seeds place 2,000 keys as this one does."""
    count = 2000
    placement = place(shard_count)
    here = ",".join(str(placement.shard_for(key)) for key in keys()[:count])
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, SETTINGS_ENV: json.dumps(hashing_settings)}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "distribkv.testing.worker",
                "placement",
                hashing_name,
                str(shard_count),
                str(count),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout.strip())
    assert outputs == {here}


def test_the_description_is_data_and_the_same_for_the_same_layout(place):
    """``describe()`` goes into the map's fingerprint: JSON data, equal for equal layouts."""
    first, second = place(3).describe(), place(3).describe()
    assert json.loads(json.dumps(first, sort_keys=True)) == first
    assert first == second


def test_a_layout_it_cannot_place_is_refused(hashing_spec, hashing_settings):
    with pytest.raises(InvalidLayoutError):
        hashing_spec.create([], dict(hashing_settings))
    unknown = {**hashing_settings, "no-such-setting": 1}
    with pytest.raises(InvalidLayoutError):
        hashing_spec.create(equal_slots(2), unknown)


@pytest.mark.parametrize("shard_count", range(2, 17))
def test_every_shard_gets_its_fair_share(hashing_spec, place, shard_count, record_property):
    counts = shares(place(shard_count), shard_count)
    fair = SAMPLE / shard_count
    worst = max(abs(count - fair) / fair for count in counts)
    record_property("worst_share_error", round(worst, 4))
    assert all(counts), f"{shard_count} shards: a shard got no key: {counts}"
    if hashing_spec.balance is not None:
        assert worst <= hashing_spec.balance, (
            f"{shard_count} shards: {counts} ({worst:.1%} off fair;"
            f" {hashing_spec.name!r} promises at most {hashing_spec.balance:.0%})"
        )


def test_weights_shift_keys_in_proportion(hashing_spec, place):
    try:
        placement = place(slots=[ShardSlot(0, "small", 1.0), ShardSlot(1, "big", 3.0)])
    except InvalidLayoutError:
        pytest.skip(f"scheme {hashing_spec.name!r} does not take weights")
    share = shares(placement, 2)[1] / SAMPLE
    if hashing_spec.balance is None:
        assert share > 0.5, f"the shard of weight 3 got {share:.1%} of the keys"
    else:
        assert abs(share - 0.75) <= 0.75 * hashing_spec.balance, (
            f"the shard of weight 3 got {share:.1%} of the keys, not 75% within"
            f" {hashing_spec.balance:.0%}"
        )


def test_adding_a_shard_moves_keys_only_onto_it(hashing_spec, place, record_property, capsys):
    """From 1 to 16 shards, one shard added at a time."""
    # Without a promise to check, a smaller sample is enough to report what moves.
    sample = keys() if hashing_spec.consistent else keys()[:20_000]
    measured = []
    for shard_count in range(1, 16):
        before, after = place(shard_count), place(shard_count + 1)
        moved = [key for key in sample if before.shard_for(key) != after.shard_for(key)]
        fraction = len(moved) / len(sample)
        measured.append(f"{shard_count}->{shard_count + 1}: {fraction:.1%}")
        record_property(f"moved_{shard_count}_to_{shard_count + 1}", round(fraction, 4))
        with capsys.disabled():
            print(f"\n{hashing_spec.name}: {measured[-1]}", end="")
        if not hashing_spec.consistent:
            continue
        # Keys never move between the shards that were there.
        elsewhere = [key for key in moved if after.shard_for(key) != shard_count]
        assert not elsewhere, (
            f"{shard_count}->{shard_count + 1}: {len(elsewhere)} keys moved between old"
            f" shards, e.g. {elsewhere[:3]}"
        )
        slack = hashing_spec.balance if hashing_spec.balance is not None else CONSISTENT_SLACK
        bound = (1 + slack) / (shard_count + 1)
        assert 0 < fraction <= bound, (
            f"{shard_count}->{shard_count + 1}: moved {fraction:.1%}, more than {bound:.1%}"
        )
    if not hashing_spec.consistent:
        pytest.skip(
            f"scheme {hashing_spec.name!r} does not declare consistent placement; moved"
            f" {', '.join(measured)}"
        )
