"""Names on the wire: the headers and content types that nodes, replicas and clients share.

Nothing here imports an HTTP framework, so the client and the replication transports can use
these names without loading the node's server side.
"""

from __future__ import annotations

#: The fingerprint of the shard map a request was routed with (a node with another map: 409).
MAP_HEADER = "X-Distribkv-Map"
#: Set on a request one node forwards to another; a node that receives one for a key it does
#: not own answers 421 instead of forwarding again.
HOP_HEADER = "X-Distribkv-Hop"
#: The shard that owns the key of a redirected or forwarded request.
SHARD_HEADER = "X-Distribkv-Shard"
#: The cluster token (``Authorization: Bearer`` works too).
TOKEN_HEADER = "X-Distribkv-Token"
#: ``X-Distribkv-Read: leader`` asks a replica to send the read to its leader (no stale read).
READ_HEADER = "X-Distribkv-Read"
#: On reads served by a replica: how far it is behind its leader.
LAG_ENTRIES_HEADER = "X-Distribkv-Lag-Entries"
LAG_SECONDS_HEADER = "X-Distribkv-Lag-Seconds"

#: A forwarding node's reads of many keys of one owner at once, ``GET
#: /forwarding/get?key=a&key=b``: the owner answers a msgpack list of their values (nil for a
#: key it does not hold), or an error for all of them.
FORWARDED_READS_PATH = "/forwarding/get"

MSGPACK = "application/msgpack"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"

__all__ = [
    "FORWARDED_READS_PATH",
    "HOP_HEADER",
    "JSON",
    "LAG_ENTRIES_HEADER",
    "LAG_SECONDS_HEADER",
    "MAP_HEADER",
    "MSGPACK",
    "OCTET_STREAM",
    "READ_HEADER",
    "SHARD_HEADER",
    "TOKEN_HEADER",
]
