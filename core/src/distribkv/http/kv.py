"""The key-value resources: ``/get``, ``/set`` and ``/delete`` (seed-compatible)."""

from __future__ import annotations

import falcon

from distribkv.http.api import DEFER
from distribkv.http.errors import ApiError, error_response
from distribkv.http.locate import Locator
from distribkv.http.params import parse_query, query_params, require_key
from distribkv.http.routing import MAP_HEADER
from distribkv.storage.api import Delete, Namespace, Put

OCTET_STREAM = "application/octet-stream"
#: The map fingerprint header, as a WSGI environ key.
MAP_ENVIRON = "HTTP_" + MAP_HEADER.upper().replace("-", "_")
#: On reads served by a replica: how far it is behind its leader.
LAG_ENTRIES_HEADER = "X-Distribkv-Lag-Entries"
LAG_SECONDS_HEADER = "X-Distribkv-Lag-Seconds"


def written(resp: falcon.Response) -> None:
    """200 with an empty body: unlike 204, it carries a Content-Length of 0, so waitress keeps
    the connection alive for the next request."""
    resp.status = falcon.HTTP_200
    resp.data = b""


#: :func:`written` as a deferred answer sends it.
WRITTEN = (falcon.HTTP_200, [("Content-Length", "0"), ("Content-Type", falcon.MEDIA_JSON)], b"")


def write(node, req: falcon.Request, resp: falcon.Response, ops) -> None:
    """Apply a client's write and answer 200 once it is applied. Where the server can finish
    a response later and the node can defer writes, the request's thread only queues the
    write: the thread that applies its group answers it."""
    defer = req.env.get(DEFER)
    if defer is None or not node.defers_writes:
        node.write(ops)
        written(resp)
        return
    completion = defer()
    method, path = req.method, req.path

    def done(seq: int, error: BaseException | None) -> None:
        if error is None:
            completion.finish(*WRITTEN)
        else:
            completion.finish(*error_response(error, method, path))

    node.write_later(ops, done)


class GetResource:
    def __init__(self, node, locator: Locator):
        self.node = node
        self.locator = locator

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        key = require_key(query_params(req))
        if not self.locator.here(req, resp, key, write=False):
            return
        node = self.node
        lag = node.lag()
        if lag is not None:
            if not node.readable:
                raise ApiError(
                    falcon.HTTP_503,
                    "replica resyncing",
                    f"{node.name} is reloading its data; read from the leader {node.me.leader}",
                    leader=node.me.leader,
                )
            resp.set_header(LAG_ENTRIES_HEADER, str(lag[0]))
            resp.set_header(LAG_SECONDS_HEADER, f"{lag[1]:.3f}")
        value = node.get(key)
        if value is None:
            raise ApiError(falcon.HTTP_404, "not found", "no value is stored under this key")
        resp.content_type = OCTET_STREAM
        resp.data = value


class FastReads:
    """WSGI in front of the node's Falcon app: the most frequent request there is, a leader's
    GET of a key it owns and holds, answered without Falcon's request machinery (half a GET's
    cost in the node). Anything else goes to the Falcon app and :class:`GetResource`, the one
    place where a read's rules live: an absent key, any error, a replica, another shard's key,
    a reshard's routing, a request stamped with a map fingerprint."""

    def __init__(self, node, app):
        self.node = node
        self.app = app

    def __call__(self, environ, start_response):
        node = self.node
        if (
            environ["PATH_INFO"] == "/get"
            and environ["REQUEST_METHOD"] == "GET"
            and node.is_leader
            and MAP_ENVIRON not in environ
        ):
            try:
                key = require_key(parse_query(environ.get("QUERY_STRING", "")))
                value = node.get(key) if node.routes_here(key) else None
            except Exception:  # noqa: BLE001 - the app answers it, errors included
                value = None
            if value is not None:
                start_response(
                    "200 OK",
                    [("Content-Type", OCTET_STREAM), ("Content-Length", str(len(value)))],
                )
                return [value]
        return self.app(environ, start_response)


class SetResource:
    def __init__(self, node, locator: Locator):
        self.node = node
        self.locator = locator
        self.max_value = node.config.storage.max_value_size

    def _value_from_body(self, req: falcon.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self.max_value:
            raise ApiError(
                falcon.HTTP_413,
                "value too large",
                f"the body is {length} bytes; the limit is {self.max_value}",
            )
        data = req.bounded_stream.read(self.max_value + 1)
        if len(data) > self.max_value:
            raise ApiError(
                falcon.HTTP_413, "value too large", f"the body exceeds {self.max_value} bytes"
            )
        return data

    def _set(self, req: falcon.Request, resp: falcon.Response, from_body: bool) -> None:
        params = query_params(req)
        key = require_key(params)
        value = params.get("value")
        body = None
        if value is None:
            if not from_body:
                raise ApiError(
                    falcon.HTTP_400,
                    "missing value",
                    "give the 'value' parameter, or PUT/POST the value as the body",
                )
            value = body = self._value_from_body(req)
        elif len(value) > self.max_value:
            raise ApiError(
                falcon.HTTP_413,
                "value too large",
                f"the value is {len(value)} bytes; the limit is {self.max_value}",
            )
        if not self.locator.here(req, resp, key, write=True, body=body):
            return
        write(self.node, req, resp, [Put(Namespace.DATA, key, value)])

    def on_get(self, req, resp):
        self._set(req, resp, from_body=False)

    def on_put(self, req, resp):
        self._set(req, resp, from_body=True)

    def on_post(self, req, resp):
        self._set(req, resp, from_body=True)


class DeleteResource:
    def __init__(self, node, locator: Locator):
        self.node = node
        self.locator = locator

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        key = require_key(query_params(req))
        if not self.locator.here(req, resp, key, write=True):
            return
        write(self.node, req, resp, [Delete(Namespace.DATA, key)])

    on_post = on_get
    on_delete = on_get
