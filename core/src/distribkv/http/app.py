"""``create_app(node) -> falcon.App``: every route of a node, added in one place."""

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
from distribkv.http.kv import DeleteResource, GetResource, SetResource
from distribkv.http.locate import Locator, MapCheck
from distribkv.http.params import parse_query
from distribkv.http.routing import ConnectionPool
from distribkv.replication.logtransport import SnapshotResource


def forwarding_pool(node) -> ConnectionPool:
    """The keep-alive connections a node uses to forward requests (routing = "proxy")."""
    server = node.config.server
    return ConnectionPool(server.forward_timeout, per_address=server.threads)


def inline_requests(node):
    """The node's requests that never wait, for ``Listen.inline``: health checks, the map, and
    reads. A read waits for nothing in redirect mode (a key of another shard is a 307); in
    proxy mode only a leader's read of its own key does (any other read is forwarded, and
    forwarding waits on the network; a replica cannot tell from the request line whether the
    client asked for a leader-only read)."""
    always = frozenset(("/healthz", "/cluster"))
    if node.config.cluster.routing == "redirect":
        reads = always | {"/get"}

        def inline(method: str, path: str, query: str) -> bool:
            return method == "GET" and path in reads

        return inline

    me = node.me.name

    def inline_proxy(method: str, path: str, query: str) -> bool:
        if method != "GET":
            return False
        if path != "/get":
            return path in always
        if not node.is_leader:
            return False
        try:
            key = parse_query(query).get("key")
        except ApiError:
            return True  # answered 400 at once
        return not key or node.maps.route(key)[0].name == me

    return inline_proxy


def create_app(node, pool: ConnectionPool) -> falcon.App:
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
    return app
