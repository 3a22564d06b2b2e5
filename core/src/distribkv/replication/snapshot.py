"""Snapshots for a full resync, which every transport can use.

A replica that needs history its leader no longer has (a trimmed log, another history id)
reloads the data page by page from ``GET /replication/snapshot?after=KEY&replica=NAME`` (a
core endpoint, msgpack; cluster token when one is set), then applies the log from the seq
read before its first page: :func:`snapshot_page` says why that ends with the leader's state.
"""

from __future__ import annotations

import falcon
import msgpack

from distribkv.protocol import MSGPACK
from distribkv.replication.leader import LeaderLog, leader_request
from distribkv.storage.api import Namespace

__all__ = ["PAGE_BYTES", "PAGE_KEYS", "SnapshotResource", "snapshot_page"]

PAGE_KEYS = 1000
PAGE_BYTES = 4 * 1024 * 1024


def snapshot_page(leader: LeaderLog, after_key: bytes | None, limit: int, max_bytes: int) -> dict:
    """One page of the data, with the seq read before it: a replica that loads every page and
    then applies the log from the first page's seq ends with the leader's state."""
    committed_seq = leader.committer.committed_seq
    seq = committed_seq()
    pairs = []
    size = 0
    start = None if after_key is None else after_key + b"\x00"
    with leader.store.scan(Namespace.DATA, start, limit=limit) as scan:
        # Read after the scan's snapshot was taken: every write in the page is <= this.
        seq_after = committed_seq()
        for key, value in scan:
            pairs.append([key, value])
            size += len(key) + len(value)
            if size >= max_bytes:
                break
    page = {
        "history": leader.history,
        "seq": seq,
        "seq_after": seq_after,
        "pairs": pairs,
        "done": len(pairs) < limit and size < max_bytes,
    }
    if after_key is None:
        # How many keys the whole snapshot has, about (the engine's count, which may be an
        # estimate, or None): what a replica shows its progress against.
        page["keys_total"] = leader.store.stats().keys.get(Namespace.DATA.value)
    return page


class SnapshotResource:
    """``/replication/snapshot``: one page of a snapshot (see :func:`snapshot_page`)."""

    def __init__(self, node):
        self.node = node

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader, params = leader_request(self.node, req)
        after = params.get("after")
        page = snapshot_page(leader, after, limit=PAGE_KEYS, max_bytes=PAGE_BYTES)
        replica = params.get("replica", b"").decode("utf-8", "replace")
        if replica and after is None:
            leader.progress.resyncing(replica, page["seq"])
        resp.content_type = MSGPACK
        resp.data = msgpack.packb(page, use_bin_type=True)
