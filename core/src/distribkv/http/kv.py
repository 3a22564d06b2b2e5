"""The key-value resources: ``/get``, ``/set`` and ``/delete`` (seed-compatible)."""

from __future__ import annotations

import falcon

from distribkv.http.admin import HEALTHY, HEALTHY_TYPE
from distribkv.http.api import DEFER, Completion, Later
from distribkv.http.errors import ApiError, error_response
from distribkv.http.locate import Locator
from distribkv.http.params import parse_query, query_key, query_params, require_key
from distribkv.http.routing import MAP_HEADER
from distribkv.storage.api import Delete, Namespace, Put

OCTET_STREAM = "application/octet-stream"
#: The headers of a read answered by the fast path (Content-Length is added to them).
DIRECT_HEADERS = [("Content-Type", OCTET_STREAM)]
#: ``/healthz``'s answer, as :class:`distribkv.http.admin.HealthResource` gives it.
HEALTHY_HEADERS = [("Content-Type", HEALTHY_TYPE)]
#: The map fingerprint header, as a WSGI environ key.
MAP_ENVIRON = "HTTP_" + MAP_HEADER.upper().replace("-", "_")
MAP_HEADER_LOWER = MAP_HEADER.lower()
#: The methods of ``/set``, as :class:`SetResource` answers them.
SET_METHODS = frozenset(("GET", "PUT", "POST"))
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
    """Apply a client's write and answer 200 once it is applied (see :func:`submit_write`)."""
    if submit_write(node, req.env, ops):
        written(resp)


def submit_write(node, environ, ops) -> bool:
    """Apply a client's write: True once it is applied (the caller answers it), False if it is
    deferred. Where the server can finish a response later and the node can defer writes, the
    request's thread only queues the write: the thread that applies its group answers it."""
    defer = environ.get(DEFER)
    if defer is None or not node.defers_writes:
        node.write(ops)
        return True
    write_deferred(node, defer(), environ["REQUEST_METHOD"], environ["PATH_INFO"], ops)
    return False


def write_deferred(node, completion: Completion, method: str, path: str, ops) -> None:
    """Queue a client's write; ``completion`` gets its answer from the thread that applies it
    (or at once, for a write refused before it was queued)."""

    def done(seq: int, error: BaseException | None) -> None:
        if error is None:
            completion.finish(*WRITTEN)
        else:
            completion.finish(*error_response(error, method, path))

    node.write_later(ops, done)


class DeferredWrite(Later):
    """A client's write that ``Listen.direct`` queues: answered once it is applied."""

    __slots__ = ("method", "node", "ops", "path")

    def __init__(self, node, method: str, path: str, ops):
        self.node = node
        self.method = method
        self.path = path
        self.ops = ops

    def start(self, completion: Completion) -> None:
        write_deferred(self.node, completion, self.method, self.path, self.ops)


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


class FastPaths:
    """WSGI in front of the node's Falcon app: the most frequent requests there are, a leader's
    GET of a key it owns and holds, a leader's SET of a key it owns and health checks, served
    without Falcon's request machinery (half a GET's cost in the node, two thirds of a SET's).
    Anything else goes to the Falcon app and its resources, the one place where the rules of a
    read and a write live: an absent key, a bad parameter, any error, a replica, another
    shard's key, a reshard, a request stamped with a map fingerprint.

    :meth:`direct` is the same without WSGI (``Listen.direct``), for a server that answers that
    way; its SETs are only the deferred ones (the answer comes from the group commit)."""

    def __init__(self, node, app):
        self.node = node
        self.app = app
        self.max_value = node.config.storage.max_value_size

    def _stored(self, query: str) -> bytes | None:
        """The value of a leader's read of a key it owns, or None: the app answers it."""
        node = self.node
        try:
            key = query_key(query)
            return node.get(key) if node.routes_here(key) else None
        except Exception:  # noqa: BLE001 - the app answers it, errors included
            return None

    def _read(self, path: str, query: str) -> tuple[int, list, bytes] | None:
        """A GET's answer if it is a health check or a leader's read of a key it owns and
        holds, else None (the app answers it). A map fingerprint was checked for already."""
        if path == "/get":
            value = self._stored(query) if self.node.is_leader else None
            return None if value is None else (200, DIRECT_HEADERS, value)
        if path == "/healthz":
            return 200, HEALTHY_HEADERS, HEALTHY
        return None

    def direct(self, method: str, path: str, query: str, header, body: bytes, can_defer: bool):
        if header(MAP_HEADER_LOWER) is not None:
            return None
        if method == "GET":
            answer = self._read(path, query)
            if answer is not None:
                return answer
        if path != "/set" or not can_defer or not self.node.defers_writes:
            return None
        plain = self._plain_set(method, query)
        if plain is None:
            return None
        key, value = plain
        if value is None:
            if len(body) > self.max_value:
                return None
            value = body
        return DeferredWrite(self.node, method, "/set", [Put(Namespace.DATA, key, value)])

    def __call__(self, environ, start_response):
        if MAP_ENVIRON in environ:
            return self.app(environ, start_response)
        path = environ["PATH_INFO"]
        if environ["REQUEST_METHOD"] == "GET":
            answer = self._read(path, environ.get("QUERY_STRING", ""))
            if answer is not None:
                _, headers, body = answer
                start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
                return [body]
        if path == "/set":
            answered = self._set(environ, start_response)
            if answered is not None:
                return answered
        return self.app(environ, start_response)

    def _plain_set(self, method: str, query: str) -> tuple[bytes, bytes | None] | None:
        """A leader's SET of a key it owns with no reshard under way: its key, and its value if
        the query has one (else it is the body's; a GET has none); None for any other (the app
        answers it)."""
        node = self.node
        if method not in SET_METHODS or not node.is_leader or node.maps.transition is not None:
            return None
        try:
            if "&" in query:
                params = parse_query(query)
                key = require_key(params)
                value = params.get("value")
            else:  # the key alone (PUT /set?key=k with the value as the body)
                key, value = query_key(query), None
        except ApiError:
            return None
        if not node.routes_here(key):
            return None
        if value is None:
            if method == "GET":
                return None
        elif len(value) > self.max_value:
            return None
        return key, value

    def _set(self, environ, start_response) -> list[bytes] | None:
        """:meth:`_plain_set`, applied here (or deferred), or None before anything is read:
        the app answers it."""
        method = environ["REQUEST_METHOD"]
        plain = self._plain_set(method, environ.get("QUERY_STRING", ""))
        if plain is None:
            return None
        key, value = plain
        if value is None:
            # Only a body whose length is known and within the limit; the app answers the rest.
            length = environ.get("CONTENT_LENGTH")
            if not length or not (length.isascii() and length.isdigit()):
                return None
            size = int(length)
            if size > self.max_value:
                return None
            value = environ["wsgi.input"].read(size)
            if len(value) != size:
                error = body_cut_short(len(value), size)
                return self._answer(start_response, error_response(error, method, "/set"))
        try:
            applied = submit_write(self.node, environ, [Put(Namespace.DATA, key, value)])
        except Exception as exc:  # noqa: BLE001 - answered as the app answers it
            return self._answer(start_response, error_response(exc, method, "/set"))
        if not applied:
            return []  # answered by the thread that applies it
        return self._answer(start_response, WRITTEN)

    @staticmethod
    def _answer(start_response, answer: tuple[str, list, bytes]) -> list[bytes]:
        status, headers, body = answer
        start_response(status, headers)
        return [body]


def body_cut_short(received: int, length: int) -> ApiError:
    """400 for a body that ended before its Content-Length: nothing of it is stored."""
    return ApiError(
        falcon.HTTP_400, "body cut short", f"the body is {received} of its {length} bytes"
    )


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
        if length is not None and len(data) < length:
            raise body_cut_short(len(data), length)
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
