"""``POST /batch``: many gets, sets and deletes of one shard in one request.

Body (msgpack, ``Content-Type: application/msgpack``; or JSON)::

    {"ops": [["get", key], ["set", key, value], ["delete", key]]}

In msgpack, keys and values are binary. In JSON they are text, or base64 when the body has
``"encoding": "base64"``. The answer uses the request's format: ``{"results": [...]}`` with
the value (or null) for each get and true for each set or delete; in text mode a stored value
that is not UTF-8 comes back as ``{"base64": "..."}``, never as a lossy string.

All writes of a batch are applied atomically; all gets read the state from before the batch's
writes. Every key must belong to the same shard; a batch for another shard is redirected or
forwarded as a whole, and a batch that mixes shards is refused (421) naming the owners.
"""

from __future__ import annotations

import base64
import json

import falcon
import msgpack

from distribkv.auth import WRITE
from distribkv.http.auth import require
from distribkv.http.errors import ApiError
from distribkv.http.kv import check_readable, respond
from distribkv.http.limits import Limits
from distribkv.http.params import check_key
from distribkv.http.routing import Blocks, Router
from distribkv.protocol import JSON, MSGPACK
from distribkv.storage.api import Delete, Namespace, Op, Put

MAX_OPS = 10_000


def _bad(detail: str) -> ApiError:
    return ApiError(falcon.HTTP_400, "bad batch", detail)


class BatchResource:
    def __init__(self, node, router: Router, limits: Limits):
        self.node = node
        self.router = router
        self.limits = limits

    def _read_body(self, req: falcon.Request) -> bytes:
        if req.content_length is not None:
            self.limits.batch(req.content_length)
        body = req.bounded_stream.read(self.limits.max_batch + 1)
        self.limits.batch(len(body), more=True)
        return body

    def _decode(self, req: falcon.Request, body: bytes):
        media = (req.content_type or "").split(";")[0].strip().lower()
        if media not in (MSGPACK, JSON, ""):
            raise ApiError(
                falcon.HTTP_415,
                "unsupported media type",
                f"/batch takes {JSON} or {MSGPACK} (Content-Type), not {media!r}",
            )
        use_msgpack = media == MSGPACK
        try:
            if use_msgpack:
                doc = msgpack.unpackb(body, raw=False, max_bin_len=self.limits.max_batch)
            else:
                doc = json.loads(body)
        except (ValueError, msgpack.UnpackException) as exc:
            kind = "msgpack" if use_msgpack else "JSON"
            raise _bad(f"the body is not valid {kind}: {exc}") from None
        except RecursionError:
            raise _bad("the body is nested far more deeply than a batch is") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
            raise _bad('expected an object with an "ops" list')
        encoding = doc.get("encoding")
        if use_msgpack:
            to_bytes = _msgpack_bytes
        elif encoding == "base64":
            to_bytes = _base64_bytes
        elif encoding in (None, "utf-8"):
            to_bytes = _text_bytes
        else:
            raise _bad(f'unknown encoding {encoding!r} (use "base64" or "utf-8")')
        return doc["ops"], to_bytes, use_msgpack, encoding == "base64"

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self._read_body(req)
        raw_ops, to_bytes, use_msgpack, b64 = self._decode(req, body)
        if len(raw_ops) > MAX_OPS:
            raise _bad(f"{len(raw_ops)} ops; the limit is {MAX_OPS}")
        ops = []
        for i, op in enumerate(raw_ops):
            if not isinstance(op, list) or not op or op[0] not in ("get", "set", "delete"):
                raise _bad(f'op {i}: expected ["get", key], ["set", key, value] or ["delete", key]')
            want = 3 if op[0] == "set" else 2
            if len(op) != want:
                raise _bad(f"op {i}: {op[0]!r} takes {want - 1} argument(s)")
            key = to_bytes(op[1], f"op {i} key")
            check_key(key, f"the key of op {i}")
            value = to_bytes(op[2], f"op {i} value") if op[0] == "set" else None
            if value is not None:
                self.limits.value(len(value), f"the value of op {i}")
            ops.append((op[0], key, value))
        if not ops:
            self._answer(resp, [], use_msgpack, b64)
            return

        owners = {self.router.owner(key)[0].name for _, key, _ in ops}
        if len(owners) > 1:
            raise ApiError(
                falcon.HTTP_421,
                "batch spans shards",
                f"the keys belong to shards {', '.join(sorted(owners))}; send one batch per shard",
                owners=sorted(owners),
            )
        writes = any(kind != "get" for kind, _, _ in ops)
        if writes:
            require(self.node.authorizer, req.get_header, WRITE)
        query = req.env.get("QUERY_STRING", "")
        elsewhere = self.router.route(
            ops[0][1], writes, req.method, "/batch", query, req.get_header, body, True
        )
        if elsewhere is not None:
            assert not isinstance(elsewhere, Blocks)  # a batch may always wait for its owner
            respond(resp, elsewhere)
            return

        get_keys = [key for kind, key, _ in ops if kind == "get"]
        if get_keys:
            for name, value in check_readable(self.node):
                resp.set_header(name, value)
        values = iter(self.node.get_many(get_keys) if get_keys else [])
        mutations: list[Op] = []
        for kind, key, value in ops:
            if kind == "set":
                assert value is not None  # every set was given one above
                mutations.append(Put(Namespace.DATA, key, value))
            elif kind == "delete":
                mutations.append(Delete(Namespace.DATA, key))
        if mutations:
            self.node.write(mutations)
        results = [next(values) if kind == "get" else True for kind, _, _ in ops]
        self._answer(resp, results, use_msgpack, b64)

    @staticmethod
    def _answer(resp: falcon.Response, results: list, use_msgpack: bool, b64: bool) -> None:
        if use_msgpack:
            resp.content_type = MSGPACK
            resp.data = msgpack.packb({"results": results}, use_bin_type=True)
            return
        out = []
        for value in results:
            if isinstance(value, bytes):
                if b64:
                    value = base64.b64encode(value).decode()
                else:
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        # Never a lossy string: bytes that are not UTF-8 come back as base64.
                        value = {"base64": base64.b64encode(value).decode()}
            out.append(value)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps({"results": out}).encode()


def _utf8(value: str, where: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        # JSON's "\ud800" escapes decode to a lone surrogate, which is no text at all.
        raise _bad(
            f"{where}: not valid Unicode (a lone surrogate); send bytes as base64"
            ' ("encoding": "base64") or in msgpack'
        ) from None


def _msgpack_bytes(value, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return _utf8(value, where)
    raise _bad(f"{where}: expected binary or text, got {type(value).__name__}")


def _text_bytes(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a string, got {type(value).__name__}")
    return _utf8(value, where)


def _base64_bytes(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:  # binascii.Error, and a string that is not ASCII
        raise _bad(f"{where}: not valid base64: {exc}") from None
