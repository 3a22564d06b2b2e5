"""The key-value requests, ``/get``, ``/set`` and ``/delete``: one decision function each.

:class:`KeyValue` decides a request whole: the map check, the key and the value limit, where
the key is answered (:class:`~distribkv.http.routing.Router`: here, redirected, forwarded,
refused), and the answer, or the deferral of a write to the group commit. Every way a request
reaches the node calls it with what that way has at hand:

- :class:`distribkv.http.app.NodeApp`, the WSGI application servers get, for a request with
  an environ (``may_block``: it runs where ``Listen.inline`` said it may wait or not);
- the same application's ``Listen.direct``, for a request without one (``may_block=False``:
  it runs on the server's own thread, so a forward or a write that must wait is left to the
  application, which the server then calls on a worker thread; where the server can answer
  later, a forward is deferred instead, and answered when the owner answers);
- the Falcon resources below, which stand behind the application for what it does not take.

The answers are ``(status, headers, body)`` with an ``int`` status and no Content-Length (see
:mod:`distribkv.http.api`); errors are raised as :class:`~distribkv.http.errors.ApiError`
and answered by the one mapping in :mod:`distribkv.http.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import falcon
import msgpack

from distribkv.http.admin import HEALTHY, HEALTHY_TYPE
from distribkv.http.answers import NOT_FOUND, VALUE_HEADERS, read_answer
from distribkv.http.api import DEFER, DEFERRED, Answer, Completion, Header, as_wsgi
from distribkv.http.errors import ApiError, error_response
from distribkv.http.forwarding import MAX_BATCH_READS
from distribkv.http.limits import Limits
from distribkv.http.params import parse_query, query_key, require_key
from distribkv.http.routing import MAP, Blocks, Router, check_map, forwards_later
from distribkv.protocol import (
    FORWARDED_READS_PATH,
    JSON,
    LAG_ENTRIES_HEADER,
    LAG_SECONDS_HEADER,
    MSGPACK,
)
from distribkv.storage.api import Delete, Namespace, Op, Put

__all__ = [
    "DELETE_METHODS",
    "SET_METHODS",
    "DeleteResource",
    "ForwardedReadsResource",
    "GetResource",
    "KeyValue",
    "SetResource",
    "WsgiBody",
    "check_readable",
    "inline_requests",
    "respond",
]

SET_METHODS = frozenset(("GET", "PUT", "POST"))
DELETE_METHODS = frozenset(("GET", "POST", "DELETE"))

#: A write's answer: 200 with an empty body (unlike 204, it carries a Content-Length of 0, so
#: every server keeps the connection alive for the next request).
WRITTEN: Answer = (200, [("Content-Type", JSON)], b"")
_WRITTEN_WSGI = as_wsgi(WRITTEN)
HEALTHY_ANSWER: Answer = (200, [("Content-Type", HEALTHY_TYPE)], HEALTHY)
_MSGPACK_HEADERS = [("Content-Type", MSGPACK)]
#: The most bytes of values one answer to ``/forwarding/get`` carries (more: 413, and the
#: forwarding node asks for each value alone).
MAX_READS_ANSWER = 4 * 1024 * 1024


class Body(Protocol):
    """A request body not read yet (a server that read it whole passes ``bytes`` instead)."""

    def read(self, limits: Limits) -> bytes:
        """The whole body; 413 past the value limit (by its length, before reading it)."""
        ...


class WsgiBody:
    """The body of a WSGI request, read from ``wsgi.input``."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict[str, Any]):
        self.environ = environ

    def read(self, limits: Limits) -> bytes:
        environ = self.environ
        stream = environ["wsgi.input"]
        raw = environ.get("CONTENT_LENGTH")
        if not raw:  # no length given: read up to the limit, and one byte more to tell
            data = stream.read(limits.max_value + 1)
            limits.value(len(data), "the body", more=True)
            return data
        if not (raw.isascii() and raw.isdigit()):
            raise ApiError(falcon.HTTP_400, "bad request", f"malformed Content-Length {raw!r}")
        length = int(raw)
        limits.value(length, "the body")
        data = stream.read(length)
        if len(data) < length:
            raise ApiError(
                falcon.HTTP_400, "body cut short", f"the body is {len(data)} of its {length} bytes"
            )
        return data


class KeyValue:
    """The decisions of the node's key-value requests (see the module's docstring).

    Each gives an answer, ``DEFERRED`` (a write queued for the group commit, answered through
    ``defer()``'s completion once applied), or None: only where ``may_block`` is false, for a
    request that must wait (a forward, a write that is not deferred), which the caller leaves
    to a thread that may."""

    def __init__(self, node, router: Router, limits: Limits):
        self.node = node
        self.router = router
        self.limits = limits

    def get(
        self,
        query: str,
        header: Header,
        *,
        may_block: bool = True,
        defer: Callable[[], Completion] | None = None,
    ) -> Any:
        """An answer, ``DEFERRED`` (forwarded to the owner, answered through ``defer()``'s
        completion) or None (see the class's docstring)."""
        node = self.node
        theirs = header(MAP)
        if theirs is not None:
            check_map(node.maps, theirs)
        key = query_key(query)
        router = self.router
        if not router.leads(key):
            elsewhere = router.route(
                key, False, "GET", "/get", query, header, None, may_block, defer
            )
            if elsewhere is not None:
                return None if isinstance(elsewhere, Blocks) else elsewhere
            if not node.is_leader:
                return self._replica_read(key)
        value = node.get(key)
        return NOT_FOUND if value is None else (200, VALUE_HEADERS, value)

    def get_forwarded(self, query: str, header: Header) -> Answer:
        """``GET /forwarding/get?key=a&key=b``: a forwarding node's reads of many keys at once
        (:mod:`distribkv.http.forwarding`), answered with a msgpack list of their values (nil
        where none is stored). Only a leader of every key, with no reshard under way, answers
        it: anything else (a replica, a key of another shard, a map in transition) is a 421
        for all of them, and the forwarding node sends each read again on its own, which gets
        each the answer the full rules give it; so do a 400 for more than
        :data:`~distribkv.http.forwarding.MAX_BATCH_READS` keys and a 413 for values over
        :data:`MAX_READS_ANSWER` bytes in all (the answer is built in memory)."""
        node = self.node
        theirs = header(MAP)
        if theirs is not None:
            check_map(node.maps, theirs)
        parts = query.split("&")
        if len(parts) > MAX_BATCH_READS:
            raise ApiError(
                falcon.HTTP_400,
                "too many reads",
                f"{len(parts)} keys; the limit is {MAX_BATCH_READS} (ask for the rest apart)",
            )
        keys = [query_key(part) for part in parts]
        leads = self.router.leads
        for key in keys:
            if not leads(key):
                raise ApiError(
                    falcon.HTTP_421,
                    "misdirected request",
                    f"{node.name} does not lead the shard of every key now; ask for each alone",
                )
        values = node.get_many(keys)
        size = sum(len(value) for value in values if value is not None)
        if size > MAX_READS_ANSWER:
            raise ApiError(
                falcon.HTTP_413,
                "answer too large",
                f"the values come to {size} bytes, over {MAX_READS_ANSWER} for one answer; ask"
                " for each alone",
            )
        return 200, _MSGPACK_HEADERS, msgpack.packb(values, use_bin_type=True)

    def _replica_read(self, key: bytes) -> Answer:
        """A replica's read of its own shard's key: with its lag, or 503 while it resyncs."""
        lag = check_readable(self.node)
        value = self.node.get(key)
        status, headers, body = read_answer(value)
        return status, [*headers, *lag], body

    def set(
        self,
        method: str,
        query: str,
        header: Header,
        body: bytes | Body,
        defer: Callable[[], Completion] | None,
        *,
        may_block: bool = True,
    ) -> Any:
        """``method`` is one of :data:`SET_METHODS`; a GET has its value in the query, a PUT
        or POST in the query or else in ``body``."""
        theirs = header(MAP)
        if theirs is not None:
            check_map(self.node.maps, theirs)
        if "&" in query:
            params = parse_query(query)
            key = require_key(params)
            value = params.get("value")
        else:  # the key alone (PUT /set?key=k with the value as the body)
            key, value = query_key(query), None
        sent = None
        if value is not None:
            self.limits.value(len(value))
        elif method == "GET":
            raise ApiError(
                falcon.HTTP_400,
                "missing value",
                "give the 'value' parameter, or PUT/POST the value as the body",
            )
        elif type(body) is bytes:
            self.limits.value(len(body), "the body")
            value = sent = body
        else:
            value = sent = body.read(self.limits)  # type: ignore[union-attr]
        ops = [Put(Namespace.DATA, key, value)]
        return self._write(key, ops, method, "/set", query, header, sent, defer, may_block)

    def delete(
        self,
        method: str,
        query: str,
        header: Header,
        defer: Callable[[], Completion] | None,
        *,
        may_block: bool = True,
    ) -> Any:
        """``method`` is one of :data:`DELETE_METHODS`."""
        theirs = header(MAP)
        if theirs is not None:
            check_map(self.node.maps, theirs)
        key = query_key(query)
        ops = [Delete(Namespace.DATA, key)]
        return self._write(key, ops, method, "/delete", query, header, None, defer, may_block)

    def _write(
        self,
        key: bytes,
        ops: Sequence[Op],
        method: str,
        path: str,
        query: str,
        header: Header,
        body: bytes | None,
        defer: Callable[[], Completion] | None,
        may_block: bool,
    ) -> Any:
        router = self.router
        if not router.leads(key):
            elsewhere = router.route(key, True, method, path, query, header, body, may_block, defer)
            if elsewhere is not None:
                return None if isinstance(elsewhere, Blocks) else elsewhere
        node = self.node
        if defer is not None and node.defers_writes:
            # The request's thread only queues the write; the thread that applies its group
            # (one fsync for all of them) answers it, or it is answered at once if refused.
            completion = defer()

            def done(seq: int, error: BaseException | None) -> None:
                if error is None:
                    completion.finish(*_WRITTEN_WSGI)
                else:
                    completion.finish(*error_response(error, method, path))

            node.write_later(ops, done)
            return DEFERRED
        if not may_block:
            return None
        node.write(ops)
        return WRITTEN


def check_readable(node) -> list[tuple[str, str]]:
    """On a replica: 503 while its data is incomplete (a resync is reloading it), else the
    headers that say how far behind its leader it is. Nothing on a leader."""
    lag = node.lag()
    if lag is None:
        if node.is_leader:
            return []
        # A replica that follows nobody now (an election is under way): stale by how much,
        # it cannot tell.
        return [(LAG_ENTRIES_HEADER, "unknown"), (LAG_SECONDS_HEADER, "unknown")]
    if not node.readable:
        raise ApiError(
            falcon.HTTP_503,
            "replica resyncing",
            f"{node.name} is reloading its data; read from the leader {node.leader_of(node.me)}",
            leader=node.leader_of(node.me),
        )
    return [(LAG_ENTRIES_HEADER, str(lag[0])), (LAG_SECONDS_HEADER, f"{lag[1]:.3f}")]


def respond(resp: falcon.Response, answer: Any) -> None:
    """Put a decision's answer into a Falcon response (nothing for a deferred one: the
    serving wrapper ignores what the application answers itself then)."""
    if answer is DEFERRED:
        return
    status, headers, body = answer
    resp.status = status
    for name, value in headers:
        resp.set_header(name, value)
    resp.data = body


class _KeyValueResource:
    """A Falcon resource that hands its requests to their decision (the methods a resource
    has are the ones Falcon lets through; it answers 405 to the others)."""

    def __init__(self, kv: KeyValue):
        self.kv = kv


def _query(req: falcon.Request) -> str:
    return req.env.get("QUERY_STRING", "")


class GetResource(_KeyValueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        respond(resp, self.kv.get(_query(req), req.get_header, defer=req.env.get(DEFER)))


class ForwardedReadsResource(_KeyValueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        respond(resp, self.kv.get_forwarded(_query(req), req.get_header))


class SetResource(_KeyValueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, defer = WsgiBody(req.env), req.env.get(DEFER)
        respond(resp, self.kv.set(req.method, _query(req), req.get_header, body, defer))

    on_put = on_post = on_get


class DeleteResource(_KeyValueResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        defer = req.env.get(DEFER)
        respond(resp, self.kv.delete(req.method, _query(req), req.get_header, defer))

    on_post = on_delete = on_get


_WRITE_METHODS = {"/set": SET_METHODS, "/delete": DELETE_METHODS}


def inline_requests(node, *, deferred_writes: bool = False) -> Callable[[str, str, str], bool]:
    """The node's requests that never wait, for ``Listen.inline``: health checks, the map,
    reads, and (on a server that defers answers) writes and forwards.

    A read waits for nothing in redirect mode (a key of another shard is a 307). In proxy mode
    a read or write of another shard's key is forwarded: on a server that defers answers, and
    without ``[tls]``, the forwarding engine carries it and it waits for nothing here either
    (:func:`~distribkv.http.routing.forwards_later`); otherwise forwarding waits on the
    network, and only a leader's read of its own key is inline (a replica cannot tell from the
    request line whether the client asked for a leader-only read). A write of the node's own
    shard is inline where a leader defers it (it is queued, and the thread that applies it
    answers it; a replica refuses or redirects it at once). Roles can change at run time, so
    such writes are inline only without ``min_replicas``."""
    always = frozenset(("/healthz", "/cluster"))
    proxy = node.config.cluster.routing == "proxy"
    # Forwards go to the engine: a proxy node's requests then all wait for nothing here.
    later = deferred_writes and forwards_later(node)
    # A node's role can change while it runs (a failover, a switchover): a write is inline
    # only where any leader would defer it (no min_replicas wait); a replica answers it at once.
    writes = deferred_writes and not node.config.cluster.min_replicas

    def owned(query: str) -> bool:
        try:
            key = parse_query(query).get("key")
        except ApiError:
            return True  # answered 400 at once
        return not key or node.routes_here(key)

    def inline(method: str, path: str, query: str) -> bool:
        if path == "/get":
            if method != "GET":
                return False
            if not proxy or later:
                return True
            return node.is_leader and owned(query)
        if path == FORWARDED_READS_PATH:
            return method == "GET"  # answered from this node's storage, or refused at once
        methods = _WRITE_METHODS.get(path)
        if methods is not None:
            if method not in methods:
                return False
            if not proxy:
                return writes
            if owned(query):
                return writes
            return later
        return method == "GET" and path in always

    return inline
