"""The hashing contract: which shard owns a key.

A hashing scheme is a plugin that returns :class:`HashingSpec` objects from the
``distribkv_hashing_schemes`` hook. ``spec.create(shards, settings)`` builds a :class:`Placement`
for one shard layout; the node and the client call ``placement.shard_for(key)`` per key. A
placement must depend only on the layout and the settings, never on the process (Python's
``hash()`` is salted per process and must not be used).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

__all__ = ["HashingSpec", "InvalidLayoutError", "Placement", "ShardSlot"]


class InvalidLayoutError(ValueError):
    """The shard layout or a hashing setting cannot be used by this scheme."""


@attrs.frozen
class ShardSlot:
    """One shard as a hashing scheme sees it: its index, its name and its relative weight."""

    idx: int
    name: str
    weight: float = 1.0


class Placement(abc.ABC):
    """Maps keys to shard indexes for one fixed layout."""

    #: The number of shards; ``shard_for`` returns 0..shard_count-1.
    shard_count: int

    @abc.abstractmethod
    def shard_for(self, key: bytes) -> int:
        """The index of the shard that owns ``key``."""

    def describe(self) -> Mapping[str, Any]:
        """What determines the placement (scheme, settings), for the map's fingerprint."""
        return {}


@attrs.frozen
class HashingSpec:
    """A hashing scheme offered by a plugin.

    ``create(shards, settings)`` gets the shards ordered by index and the ``[cluster.<name>]``
    settings; it raises :class:`InvalidLayoutError` for settings or layouts it cannot place,
    and for a setting it does not know.

    What a scheme promises beyond a stable placement is declared, not assumed, and the hashing
    conformance suite (``distribkv.testing.hashing_suite``) holds it to what it declares:

    - ``balance``: with equal weights and the default settings, no shard's share of many random
      keys differs from the fair share 1/N by more than this fraction of it (0.1: 10 %). None
      promises only that every shard gets keys.
    - ``consistent``: adding a shard to N moves keys only onto the new shard, so about
      1/(N+1) of them (its share, within ``balance``); no key moves between the shards that
      were there. False (``modulo``) promises nothing about what moves: FNV-1 mod N moves about
      N/(N+1) of the keys.
    """

    name: str
    create: Callable[[Sequence[ShardSlot], Mapping[str, Any]], Placement]
    description: str
    settings_help: Mapping[str, str] = attrs.field(factory=dict)
    balance: float | None = None
    consistent: bool = False
