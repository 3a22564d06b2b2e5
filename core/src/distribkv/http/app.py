"""``create_app(node, pool)``: every route of a node, added in one place, behind the fast paths
for reads and writes (``FastPaths``)."""

from __future__ import annotations

import falcon

from distribkv.http import errors, reshard
from distribkv.http.admin import (
    ClusterResource,
    DigestResource,
    HealthResource,
    PurgeResource,
    ResyncResource,
    StatusResource,
)
from distribkv.http.batch import BatchResource
from distribkv.http.errors import ApiError
from distribkv.http.kv import (
    SET_METHODS,
    DeleteResource,
    FastPaths,
    GetResource,
    SetResource,
)
from distribkv.http.locate import Locator, MapCheck
from distribkv.http.params import parse_query
from distribkv.http.routing import ConnectionPool
from distribkv.replication.logtransport import SnapshotResource


def forwarding_pool(node) -> ConnectionPool:
    """The keep-alive connections a node uses to forward requests (routing = "proxy")."""
    server = node.config.server
    return ConnectionPool(server.forward_timeout, per_address=server.threads)


WRITE_METHODS = {"/set": SET_METHODS, "/delete": frozenset(("GET", "POST", "DELETE"))}


def inline_requests(node, *, deferred_writes: bool = False):
    """The node's requests that never wait, for ``Listen.inline``: health checks, the map,
    reads, and (on a server that defers answers) writes.

    A read waits for nothing in redirect mode (a key of another shard is a 307); in proxy mode
    only a leader's read of its own key is inline (any other read is forwarded, and forwarding
    waits on the network; a replica cannot tell from the request line whether the client asked
    for a leader-only read). A write is inline where the node defers it (it is queued, and the
    thread that applies it answers it) and on a replica (refused or redirected at once); in
    proxy mode a write of another shard's key is forwarded, so it is not."""
    always = frozenset(("/healthz", "/cluster"))
    proxy = node.config.cluster.routing == "proxy"
    writes = deferred_writes and (node.defers_writes or not node.is_leader)

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
            if not proxy:
                return True
            return node.is_leader and owned(query)
        methods = WRITE_METHODS.get(path)
        if methods is not None:
            if not writes or method not in methods:
                return False
            return not proxy or owned(query)
        return method == "GET" and path in always

    return inline


def body_check(node):
    """``Listen.body_check``: a PUT/POST /set body over ``max_value_size`` and a /batch body
    over ``max_batch_bytes`` are refused with 413 before they are read (the owner of the key
    would refuse them too: every node has the cluster's limits)."""
    max_value = node.config.storage.max_value_size
    max_batch = node.config.server.max_batch_bytes

    def check(method: str, path: str, length: int) -> tuple[int, str, str] | None:
        if path == "/set" and method in ("PUT", "POST") and length > max_value:
            return 413, "value too large", f"the body is {length} bytes; the limit is {max_value}"
        if path == "/batch" and length > max_batch:
            return 413, "batch too large", f"the body is {length} bytes; the limit is {max_batch}"
        return None

    return check


def create_app(node, pool: ConnectionPool) -> FastPaths:
    locator = Locator(node, pool)
    app = falcon.App(middleware=[MapCheck(node)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    routes = [
        ("/get", GetResource(node, locator)),
        ("/set", SetResource(node, locator)),
        ("/delete", DeleteResource(node, locator)),
        ("/batch", BatchResource(node, locator)),
        ("/purge", PurgeResource(node)),
        ("/healthz", HealthResource()),
        ("/status", StatusResource(node)),
        ("/cluster", ClusterResource(node)),
        ("/digest", DigestResource(node)),
        ("/replication/snapshot", SnapshotResource(node)),
        ("/replication/resync", ResyncResource(node)),
        *reshard.routes(node),
    ]
    taken = {path for path, _ in routes}
    for extra in node.registry.manager.hook.distribkv_routes(node=node):
        for path, resource in extra or []:
            if path in taken:
                raise ValueError(f"a plugin mounts {path!r}, which is already taken")
            taken.add(path)
            routes.append((path, resource))
    for path, resource in routes:
        app.add_route(path, resource)
    return FastPaths(node, app)
