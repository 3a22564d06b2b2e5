"""The answer to a read of one key, the same wherever it is made: by the node that holds the
key (:meth:`distribkv.http.kv.KeyValue.get`), or by a node that forwarded the read and got the
value from the owner among many (:mod:`distribkv.http.forwarding`): 200 with the value's bytes,
or 404."""

from __future__ import annotations

from distribkv.http.api import Answer, error_answer
from distribkv.protocol import OCTET_STREAM

__all__ = ["NOT_FOUND", "VALUE_HEADERS", "read_answer"]

VALUE_HEADERS = [("Content-Type", OCTET_STREAM)]
NOT_FOUND = error_answer(404, "not found", "no value is stored under this key")


def read_answer(value: bytes | None) -> Answer:
    return NOT_FOUND if value is None else (200, VALUE_HEADERS, value)
