"""The record envelope: every stored value carries a checksum of its key and value.

Layout: one format byte (``0x01``), the little-endian xxh3-64 of ``key + value``, then the
value. Checksumming the key too means a value that surfaces under another key (a damaged index,
a misdirected page) is detected as well as flipped bytes. LMDB has no page checksums and LevelDB
serves damaged blocks silently unless asked to verify, so the core never trusts an engine's
bytes: a record that does not verify raises :class:`CorruptionError`, never a wrong value.
"""

from __future__ import annotations

import struct

from xxhash import xxh3_64_intdigest

from distribkv.storage.errors import CorruptionError

FORMAT = 1
_HEADER = struct.Struct("<BQ")
OVERHEAD = _HEADER.size


def seal(key: bytes, value: bytes) -> bytes:
    """The record to store for ``value`` under ``key``."""
    return _HEADER.pack(FORMAT, xxh3_64_intdigest(key + value)) + value


def unseal(key: bytes, record: bytes) -> bytes:
    """The value inside ``record``; raises CorruptionError if it does not verify."""
    if len(record) < OVERHEAD:
        raise CorruptionError(f"record of key {key!r} is truncated ({len(record)} bytes)")
    fmt, checksum = _HEADER.unpack_from(record)
    value = record[OVERHEAD:]
    if fmt != FORMAT:
        raise CorruptionError(f"record of key {key!r} has unknown format {fmt}")
    if xxh3_64_intdigest(key + value) != checksum:
        raise CorruptionError(f"checksum mismatch in the record of key {key!r}")
    return value
