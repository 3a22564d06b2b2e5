"""The node's application: ``create_app(node)`` gives the WSGI callable every server serves.

:class:`NodeApp` takes the key-value requests itself, straight to their decisions in
:mod:`distribkv.http.kv` (with an environ, and without one as ``Listen.direct``), and hands
every other request to the Falcon application, where each route has its resource; all routes
are added in one place, :func:`create_app`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import falcon

from distribkv.auth import Authorizer
from distribkv.http import errors, reshard, ui
from distribkv.http.admin import (
    ClusterResource,
    CompactResource,
    DigestResource,
    HandoverResource,
    HealthResource,
    LeaderRecordResource,
    PurgeResource,
    ResyncResource,
    StatusResource,
)
from distribkv.http.api import DEFER, DEFERRED, Answer, Completion, Header, status_line
from distribkv.http.auth import PATH_RANKS, AuthCheck, deny
from distribkv.http.batch import BatchResource
from distribkv.http.errors import error_answer_for, error_response
from distribkv.http.kv import (
    DELETE_METHODS,
    HEALTHY_ANSWER,
    SET_METHODS,
    DeleteResource,
    ForwardedReadsResource,
    GetResource,
    KeyValue,
    SetResource,
    WsgiBody,
)
from distribkv.http.limits import Limits
from distribkv.http.routing import Forwarder, MapCheck, Router
from distribkv.metrics.counts import RequestCounts
from distribkv.protocol import FORWARDED_READS_PATH, MAP_HEADER
from distribkv.replication.snapshot import SnapshotResource

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["NodeApp", "create_app", "environ_header"]

#: The map fingerprint header, as a WSGI environ key.
MAP_ENVIRON = "HTTP_" + MAP_HEADER.upper().replace("-", "_")

#: The rank each key-value path needs with ``[auth]`` (checked before it is answered).
KV_RANKS = {
    path: rank
    for path in ("/get", "/set", "/delete", FORWARDED_READS_PATH)
    if (rank := PATH_RANKS[path])
}

_ENVIRON_KEYS = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


def environ_header(environ: dict[str, Any]) -> Header:
    """``header(name)`` of a WSGI request, by the lower-case name."""
    get = environ.get

    def header(name: str) -> str | None:
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = _ENVIRON_KEYS[name] = "HTTP_" + name.upper().replace("-", "_")
        return get(key)

    return header


class NodeApp:
    """The WSGI application of a node (see the module's docstring). :meth:`direct` is
    ``Listen.direct``: the same decisions for a server that answers without an environ."""

    def __init__(
        self,
        app: falcon.App,
        kv: KeyValue,
        forwarder: Forwarder,
        auth: Authorizer | None = None,
        metrics: CollectorRegistry | None = None,
        request_counts: RequestCounts | None = None,
        closing: Iterable[Any] = (),
    ):
        self.app = app
        self.kv = kv
        self.forwarder = forwarder
        #: With ``[auth]``: the key-value requests are checked here, before they are answered.
        self.auth = auth
        #: The node's metrics (``/metrics``; None with ``[server] metrics = false``), and the
        #: requests the serving wrapper counts for them as each ends.
        self.metrics = metrics
        self.request_counts = request_counts
        #: Resources that hold threads or connections of their own, closed with the app.
        self.closing = list(closing)
        #: Every path the node answers (the access log's ``route``).
        self.routes: frozenset[str] = frozenset()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ["PATH_INFO"]
        kv = self.kv
        auth = self.auth
        try:
            if auth is not None and path in KV_RANKS:
                answer = deny(auth, environ_header(environ), KV_RANKS[path])
                if answer is not None:
                    return _send(answer, start_response)
            if path == "/get" and method == "GET":
                answer = kv.get(
                    environ.get("QUERY_STRING", ""),
                    environ_header(environ),
                    defer=environ.get(DEFER),
                )
            elif path == "/set" and method in SET_METHODS:
                answer = kv.set(
                    method,
                    environ.get("QUERY_STRING", ""),
                    environ_header(environ),
                    WsgiBody(environ),
                    environ.get(DEFER),
                )
            elif path == "/delete" and method in DELETE_METHODS:
                answer = kv.delete(
                    method,
                    environ.get("QUERY_STRING", ""),
                    environ_header(environ),
                    environ.get(DEFER),
                )
            elif path == "/healthz" and method == "GET" and MAP_ENVIRON not in environ:
                answer = HEALTHY_ANSWER
            elif path == FORWARDED_READS_PATH and method == "GET":
                answer = kv.get_forwarded(environ.get("QUERY_STRING", ""), environ_header(environ))
            else:
                return self.app(environ, start_response)
        except Exception as exc:  # noqa: BLE001 - answered by the one error mapping
            status_text, headers, body = error_response(exc, method, path)
            start_response(status_text, headers)
            return [body]
        if answer is DEFERRED:
            return []  # answered by whoever finishes it
        assert answer is not None  # None only where the caller may not wait, not here
        return _send(answer, start_response)

    def direct(
        self,
        method: str,
        path: str,
        query: str,
        header: Header,
        body: bytes,
        defer: Callable[[], Completion] | None,
    ) -> Any:
        kv = self.kv
        auth = self.auth
        if auth is not None and path in KV_RANKS:
            refused = deny(auth, header, KV_RANKS[path])
            if refused is not None:
                return refused
        try:
            if path == "/get":
                if method != "GET":
                    return None
                return kv.get(query, header, may_block=False, defer=defer)
            if path == "/set":
                if method not in SET_METHODS:
                    return None
                return kv.set(method, query, header, body, defer, may_block=False)
            if path == "/delete":
                if method not in DELETE_METHODS:
                    return None
                return kv.delete(method, query, header, defer, may_block=False)
            if path == "/healthz" and method == "GET" and header(MAP_HEADER.lower()) is None:
                return HEALTHY_ANSWER
            if path == FORWARDED_READS_PATH and method == "GET":
                return kv.get_forwarded(query, header)
        except Exception as exc:  # noqa: BLE001 - answered by the one error mapping
            return error_answer_for(exc, method, path)
        return None

    def close(self) -> None:
        self.forwarder.close()
        for resource in self.closing:
            resource.close()


def _send(answer: Answer, start_response: Callable) -> list[bytes]:
    status, headers, body = answer
    line = "200 OK" if status == 200 else status_line(status)
    start_response(line, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def create_app(node) -> NodeApp:
    forwarder = Forwarder(node)
    router = Router(node, forwarder)
    limits = Limits.of(node)
    kv = KeyValue(node, router, limits)
    auth = node.authorizer
    middleware: list = [MapCheck(node)] if auth is None else [AuthCheck(auth), MapCheck(node)]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    routes = [
        ("/get", GetResource(kv)),
        (FORWARDED_READS_PATH, ForwardedReadsResource(kv)),
        ("/set", SetResource(kv)),
        ("/delete", DeleteResource(kv)),
        ("/batch", BatchResource(node, router, limits)),
        ("/purge", PurgeResource(node)),
        ("/compact", CompactResource(node)),
        ("/healthz", HealthResource()),
        ("/status", StatusResource(node)),
        ("/cluster", ClusterResource(node)),
        ("/digest", DigestResource(node)),
        ("/replication/snapshot", SnapshotResource(node)),
        ("/replication/resync", ResyncResource(node)),
        ("/coordination/handover", HandoverResource(node)),
        ("/coordination/leader", LeaderRecordResource(node)),
        *reshard.routes(node),
        *ui.routes(node),
    ]
    transport = node.registry.replication_transport(node.config.cluster.replication)
    if transport.routes is not None:
        routes += transport.routes(node)
    counts = node.metrics
    registry = None
    if counts is not None:
        from distribkv.metrics.collector import node_registry
        from distribkv.metrics.exposition import MetricsResource

        registry = node_registry(node, counts)
        routes.append(("/metrics", MetricsResource(registry)))
    taken = {path for path, _ in routes}
    for extra in node.registry.manager.hook.distribkv_routes(node=node):
        for path, resource in extra or []:
            if path in taken:
                raise ValueError(f"a plugin mounts {path!r}, which is already taken")
            taken.add(path)
            routes.append((path, resource))
    for path, resource in routes:
        app.add_route(path, resource)
    if counts is not None:
        # Every route is a label value of its own; any other path counts as "other".
        counts.requests = RequestCounts(taken)
    requests = None if counts is None else counts.requests
    closing = [resource for _, resource in routes if isinstance(resource, ui.DataResource)]
    node_app = NodeApp(app, kv, forwarder, auth, registry, requests, closing)
    node_app.routes = frozenset(taken)
    return node_app
