"""What a node's storage goes through when leadership moves.

- :func:`step_down`: a leader becomes a replica. The entries of its log that the new history
  lacks (those after the ``fork``, the seq at which the new leader's term began) are written
  to a rollback file in its data directory first; its data then has to be reloaded from the
  new leader (a resync). Without such entries it goes on from its last seq.
- :func:`roll_back_replica`: the same for a replica that applied entries past the fork. A
  replica keeps no log, so the file can only name the range of seqs it loses.

A rollback file, ``rollback/<term>-<first seq>.msgpack``, is a stream of msgpack maps: a header
(``shard``, ``node``, ``history``, ``term``, ``fork``, ``last``, ``entries``, ``note``), then
one map per entry (``seq``, ``term``, ``op`` "put" or "delete", ``key``, ``value``, ``ms``).
It is written and synced before the node's metadata changes. MongoDB's rollback files are the
model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack

from distribkv.files import make_private_dir
from distribkv.replication.records import (
    APPLIED,
    APPLIED_CHECK,
    FOLLOWS,
    HISTORY,
    LAST_SEQ,
    OP_PUT,
    RESYNC,
    TRIMMED,
    decode_record,
    entry_check,
    read_seq,
    seq_key,
)
from distribkv.storage.api import Delete, Namespace, Op, Put
from distribkv.storage.store import Store

log = logging.getLogger(__name__)

META, LOG = Namespace.META, Namespace.LOG
#: Metadata key: the term of the history this node's data belongs to.
TERM = b"term"
#: Metadata key: entries written to rollback files so far (all time).
ROLLED_BACK = b"rolled_back"
#: Metadata key: the terms this node led and the first seq of each, ``[[term, seq], ...]``
#: (msgpack, the last ``TERMS_KEPT``): what term every entry of its log was written in.
TERMS = b"terms"
TERMS_KEPT = 100
DELETE_CHUNK = 1000

__all__ = [
    "ROLLED_BACK",
    "TERM",
    "TERMS",
    "lead_term",
    "log_entries",
    "read_rolled_back",
    "read_term",
    "read_terms",
    "roll_back_replica",
    "rollback_path",
    "step_down",
    "term_of",
]


def read_term(store: Store) -> int:
    raw = store.get(TERM, META)
    return 0 if raw is None else int(raw)


def read_terms(store: Store) -> list[list[int]]:
    raw = store.get(TERMS, META)
    return msgpack.unpackb(raw) if raw else []


def lead_term(store: Store, term: int, first_seq: int) -> None:
    """Record that this node leads from ``term`` on, its first entry being ``first_seq``."""
    terms = [t for t in read_terms(store) if t[0] != term][-(TERMS_KEPT - 1) :]
    terms.append([term, first_seq])
    store.apply([Put(META, TERM, b"%d" % term), Put(META, TERMS, msgpack.packb(terms))], sync=True)


def term_of(terms: list[list[int]], seq: int, default: int) -> int:
    """The term in which this node wrote its entry ``seq`` (``default`` if unrecorded)."""
    found = default
    for term, first in terms:
        if first <= seq:
            found = term
    return found


def read_rolled_back(store: Store) -> int:
    raw = store.get(ROLLED_BACK, META)
    return 0 if raw is None else int(raw)


def rollback_path(data_dir: Path, term: int, first: int) -> Path:
    return data_dir / "rollback" / f"{term}-{first}.msgpack"


def log_entries(store: Store, after: int, upto: int) -> Iterator[tuple[int, list]]:
    """(seq, [op, key, value, ms]) of the log entries in (after, upto] that the log holds.
    Records are keyed by their last seq, so the one that holds ``after + 1`` is the first at or
    after that key."""
    out: list[tuple[int, list]] = []
    with store.scan(LOG, seq_key(after + 1)) as pairs:
        for raw_seq, raw in pairs:
            first, entries = decode_record(raw_seq, raw)
            if first > upto:
                break
            out.extend((seq, e) for seq, e in enumerate(entries, first) if after < seq <= upto)
    yield from out


def _write_rollback(path: Path, header: dict, entries: list[dict]) -> None:
    make_private_dir(path.parent)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(msgpack.packb(header, use_bin_type=True))
        for entry in entries:
            out.write(msgpack.packb(entry, use_bin_type=True))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _count(store: Store, more: int) -> Op:
    raw = store.get(ROLLED_BACK, META)
    return Put(META, ROLLED_BACK, b"%d" % ((int(raw) if raw else 0) + more))


def step_down(
    store: Store, *, fork: int | None, term: int, shard: str, node: str, data_dir: Path
) -> int:
    """Turn a leader's data directory into a replica's that follows the same history; the
    entries after ``fork`` (None: no newer term is known) go to a rollback file. Returns how
    many entries were rolled back."""
    last = read_seq(store, LAST_SEQ)
    history = store.get(HISTORY, META)
    assert history is not None, "a leader's data directory has a history id"
    rolled: list[dict] = []
    terms = read_terms(store)
    if fork is not None and last > fork:
        rolled = [
            {
                "seq": seq,
                "term": term_of(terms, seq, term),
                "op": "put" if op == OP_PUT else "delete",
                "key": key,
                "value": value,
                "ms": ms,
            }
            for seq, (op, key, value, ms) in log_entries(store, fork, last)
        ]
        missing = (last - fork) - len(rolled)
        path = rollback_path(data_dir, term, fork + 1)
        header = {
            "shard": shard,
            "node": node,
            "history": history.decode(),
            "term": term,
            "fork": fork,
            "last": last,
            "entries": len(rolled),
            "terms": terms,
            "written_at": time.time(),
            "note": (
                f"entries {fork + 1}..{last} were written by this node as leader (term {term})"
                " and are not in the shard's history since then"
                + (f"; {missing} of them had been trimmed from its log" if missing else "")
            ),
        }
        _write_rollback(path, header, rolled)
        log.warning(
            "%s/%s: %d entries (seq %d..%d) of term %d are not in the new history; written to"
            " %s, and the data will be reloaded from the new leader",
            shard,
            node,
            len(rolled),
            fork + 1,
            last,
            term,
            path,
        )
        applied = fork
    else:
        applied = last
    check = None
    for seq, entry in log_entries(store, applied - 1, applied) if applied else ():
        if seq == applied:
            check = entry_check(*entry)
    _delete_log(store)
    ops: list[Op] = [
        Put(META, FOLLOWS, history),
        Put(META, APPLIED, seq_key(applied)),
        Delete(META, APPLIED_CHECK) if check is None else Put(META, APPLIED_CHECK, b"%d" % check),
        Delete(META, LAST_SEQ),
        Delete(META, TRIMMED),
    ]
    if fork is not None and last > fork:
        ops += [Put(META, RESYNC, b"1"), _count(store, last - fork)]
    store.apply(ops, sync=True)
    return len(rolled) if fork is not None and last > fork else 0


def roll_back_replica(
    store: Store, *, fork: int, term: int, shard: str, node: str, data_dir: Path
) -> int:
    """A replica that applied entries past ``fork``: name them in a rollback file and mark its
    data for a resync. Returns how many seqs it loses (0 if none)."""
    applied = read_seq(store, APPLIED)
    if applied <= fork:
        return 0
    follows = store.get(FOLLOWS, META)
    path = rollback_path(data_dir, term, fork + 1)
    header = {
        "shard": shard,
        "node": node,
        "history": follows.decode() if follows else None,
        "term": term,
        "fork": fork,
        "last": applied,
        "entries": 0,
        "written_at": time.time(),
        "note": (
            f"this replica applied entries {fork + 1}..{applied} of term {term}, which are not"
            " in the shard's history since then; a replica keeps no log, so they cannot be"
            " listed: its data is reloaded from the new leader"
        ),
    }
    _write_rollback(path, header, [])
    log.warning(
        "%s/%s: applied entries %d..%d of term %d are not in the new history (%s); resyncing",
        shard,
        node,
        fork + 1,
        applied,
        term,
        path,
    )
    store.apply([Put(META, RESYNC, b"1"), _count(store, applied - fork)], sync=True)
    return applied - fork


def _delete_log(store: Store) -> None:
    while True:
        with store.scan(LOG, limit=DELETE_CHUNK) as pairs:
            keys = [key for key, _ in pairs]
        if not keys:
            return
        store.apply([Delete(LOG, key) for key in keys], sync=False)
