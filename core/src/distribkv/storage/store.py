"""Store: the node's view of a storage engine.

It validates keys and values before they reach the engine, seals every value in the checksummed
record envelope and opens it again on the way out, and keeps the free-space reserve
(:mod:`distribkv.storage.space`). Everything else is the engine's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from distribkv.files import make_private_dir
from distribkv.storage import envelope
from distribkv.storage.api import (
    DURABILITIES,
    MAX_KEY_SIZE,
    BackendSpec,
    Capabilities,
    Delete,
    Namespace,
    Op,
    Put,
    Scan,
    StorageEngine,
    StorageStats,
)
from distribkv.storage.errors import InvalidKeyError, InvalidSettingError, InvalidValueError
from distribkv.storage.space import SpaceReserve

__all__ = ["Store", "check_key", "open_store"]

DATA = Namespace.DATA


def check_key(key: object, max_key_size: int = MAX_KEY_SIZE) -> bytes:
    """``key`` if it is 1..max_key_size bytes, else InvalidKeyError."""
    if type(key) is not bytes:
        raise InvalidKeyError(f"keys are bytes, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("the key is empty")
    if len(key) > max_key_size:
        raise InvalidKeyError(f"the key is {len(key)} bytes; the limit is {max_key_size}")
    return key


class Store:
    """Validated, checksummed access to one engine. Thread-safe as the engine is."""

    def __init__(
        self,
        engine: StorageEngine,
        *,
        max_value_size: int | None = None,
        reserve: SpaceReserve | None = None,
    ):
        self.engine = engine
        self.max_value_size = max_value_size
        self.reserve = reserve
        self._max_key = min(MAX_KEY_SIZE, engine.capabilities.max_key_size)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    def get(self, key: bytes, ns: Namespace = DATA) -> bytes | None:
        record = self.engine.get(ns, check_key(key, self._max_key))
        return None if record is None else envelope.unseal(key, record)

    def get_many(self, keys: Sequence[bytes], ns: Namespace = DATA) -> list[bytes | None]:
        keys = [check_key(key, self._max_key) for key in keys]
        records = self.engine.get_many(ns, keys)
        return [
            None if record is None else envelope.unseal(key, record)
            for key, record in zip(keys, records, strict=True)
        ]

    def apply(self, ops: Iterable[Op], *, sync: bool) -> None:
        """Apply ``ops`` atomically; nothing is written if any op is invalid, or if it puts
        into the data namespace while the disk is below the reserve (StorageFullError)."""
        sealed: list[Op] = []
        adding = 0
        grows = False
        for op in ops:
            key = check_key(op.key, self._max_key)
            if type(op) is Put:
                value = op.value
                if type(value) is not bytes:
                    raise InvalidValueError(f"values are bytes, got {type(value).__name__}")
                # The limit is for data; log entries carry a value plus their own header.
                limit = self.max_value_size
                if limit is not None and op.ns is DATA and len(value) > limit:
                    raise InvalidValueError(
                        f"the value is {len(value)} bytes; the limit is {limit}"
                    )
                sealed.append(Put(op.ns, key, envelope.seal(key, value)))
                adding += len(key) + len(value)
                grows = grows or op.ns is DATA
            elif type(op) is Delete:
                sealed.append(op)
            else:
                raise TypeError(f"not a storage operation: {op!r}")
        if grows and self.reserve is not None:
            self.reserve.check(adding)
        # Even an empty apply reaches the engine, so use after close is always reported.
        self.engine.apply(sealed, sync=sync)

    def recover(self) -> None:
        """Let the engine take writes again after a failure (see StorageEngine.recover)."""
        self.engine.recover()

    def put(self, key: bytes, value: bytes, *, sync: bool, ns: Namespace = DATA) -> None:
        self.apply([Put(ns, key, value)], sync=sync)

    def delete(self, key: bytes, *, sync: bool, ns: Namespace = DATA) -> None:
        self.apply([Delete(ns, key)], sync=sync)

    def scan(
        self,
        ns: Namespace = DATA,
        start: bytes | None = None,
        stop: bytes | None = None,
        *,
        limit: int | None = None,
    ) -> Scan:
        """Verified ``(key, value)`` pairs in key order; close it (use ``with``)."""
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        for bound in (start, stop):
            if bound is not None and type(bound) is not bytes:
                raise InvalidKeyError(f"scan bounds are bytes, got {type(bound).__name__}")
        inner = self.engine.scan(ns, start, stop, limit=limit)
        return Scan(_unsealed(inner), inner.close)

    def stats(self) -> StorageStats:
        return self.engine.stats()

    def compact(self, ns: Namespace | None = None) -> None:
        self.engine.compact(ns)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _unsealed(pairs: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    for key, record in pairs:
        yield key, envelope.unseal(key, record)


def open_store(
    spec: BackendSpec,
    path: str | Path,
    *,
    durability: str = "sync",
    settings: Mapping[str, Any] | None = None,
    max_value_size: int | None = None,
    min_free_bytes: int = 0,
) -> Store:
    """Create or open the data directory ``path`` with backend ``spec``. With
    ``min_free_bytes`` > 0, data writes are refused while the disk has less free (the reserve,
    see :mod:`distribkv.storage.space`); opening itself may use the reserve."""
    if durability not in DURABILITIES:
        raise InvalidSettingError(
            f"durability must be one of {', '.join(DURABILITIES)}, got {durability!r}"
        )
    if type(min_free_bytes) is not int or min_free_bytes < 0:
        raise InvalidSettingError(f"min_free_bytes must be an integer >= 0, got {min_free_bytes!r}")
    path = Path(path)
    # Private: the engine's files hold every key and value in the clear.
    make_private_dir(path)
    engine = spec.open(path, durability=durability, settings=dict(settings or {}))
    reserve = SpaceReserve(path, min_free_bytes) if min_free_bytes else None
    return Store(engine, max_value_size=max_value_size, reserve=reserve)
