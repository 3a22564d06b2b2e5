"""The replication log's format on disk, and what every node keeps in its metadata.

Every mutation on a leader gets the next sequence number (seq). Its log entry is
``[op, key, value, time in ms]``. The entries of one storage apply (a group commit, or a batch)
share log records (at most :data:`RECORD_ENTRIES` entries or about :data:`RECORD_BYTES` each,
so a large value has a record of its own), stored under the seq of their last entry: a record
of one entry is the entry itself, a record of several is the list of them. A scan from seq N's
key therefore starts at the record that holds N. A random history id, made when a data
directory is created, tells replicas whether they follow the same history.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import msgpack
from xxhash import xxh3_64_intdigest

from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.store import Store

__all__ = [
    "APPLIED",
    "APPLIED_CHECK",
    "FOLLOWS",
    "HISTORY",
    "LAST_SEQ",
    "OP_DELETE",
    "OP_PUT",
    "RECORD_BYTES",
    "RECORD_ENTRIES",
    "RESYNC",
    "SNAPSHOT_SEQ",
    "TRIMMED",
    "Entry",
    "decode_record",
    "encode_record",
    "ensure_history",
    "entry_check",
    "entry_op",
    "read_seq",
    "seq_key",
]

META, LOG, DATA = Namespace.META, Namespace.LOG, Namespace.DATA
_SEQ = struct.Struct(">Q")

# Metadata keys.
LAST_SEQ = b"seq"  # leader: the last sequence number written
HISTORY = b"history"  # this data directory's history id
TRIMMED = b"trimmed"  # leader: entries <= this were removed from the log
APPLIED = b"applied"  # replica: the leader's last seq applied here
FOLLOWS = b"follows"  # replica: the history id of the leader it follows
RESYNC = b"resync"  # replica: a full resync is in progress (data is incomplete)
SNAPSHOT_SEQ = b"snapshot_seq"  # replica: consistent once applied >= this
APPLIED_CHECK = b"applied_check"  # replica: entry_check of the entry at APPLIED

OP_DELETE, OP_PUT = 0, 1
#: Most entries in one log record (the entries of a group commit share records).
RECORD_ENTRIES = 64
#: Most bytes of keys and values in one record of several entries (a larger entry has a
#: record of its own).
RECORD_BYTES = 64 * 1024

#: An entry as transports carry it: (seq, op, key, value or None, leader time in ms).
Entry = tuple[int, int, bytes, bytes | None, int]


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


def seq_of(key: bytes) -> int:
    return int(_SEQ.unpack(key)[0])


def read_seq(store: Store, key: bytes) -> int:
    raw = store.get(key, META)
    return 0 if raw is None else seq_of(raw)


def ensure_history(store: Store, *, sync: bool) -> str:
    """This data directory's history id, made on first use."""
    raw = store.get(HISTORY, META)
    if raw is None:
        raw = os.urandom(8).hex().encode()
        store.put(HISTORY, raw, ns=META, sync=sync)
    return raw.decode()


def _entry_fields(op: Op, now_ms: int) -> list:
    if type(op) is Put:
        return [OP_PUT, op.key, op.value, now_ms]
    return [OP_DELETE, op.key, None, now_ms]


def encode_record(ops: Sequence[Op], now_ms: int) -> bytes:
    """The log record of consecutive entries: one entry as itself, several as their list."""
    entries = [_entry_fields(op, now_ms) for op in ops]
    return msgpack.packb(entries[0] if len(entries) == 1 else entries, use_bin_type=True)


def decode_record(raw_seq: bytes, raw: bytes) -> tuple[int, list[list]]:
    """(seq of the first entry, the entries as [op, key, value, ts]) of one log record."""
    data = msgpack.unpackb(raw, raw=False)
    entries = data if data and type(data[0]) is list else [data]
    return seq_of(raw_seq) - len(entries) + 1, entries


def entry_check(op: int, key: bytes, value: bytes | None, ts: int) -> int:
    """A checksum of one entry: a replica sends the one it applied last, and the leader
    compares it with its own entry at that seq, so a leader that lost a suffix of its log and
    reused those sequence numbers is noticed instead of silently diverging."""
    return xxh3_64_intdigest(msgpack.packb([op, key, value, ts], use_bin_type=True))


def entry_op(op: int, key: bytes, value: bytes | None) -> Op:
    if op == OP_PUT:
        assert value is not None
        return Put(DATA, key, value)
    return Delete(DATA, key)
