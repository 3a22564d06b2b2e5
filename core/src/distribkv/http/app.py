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
from distribkv.http.kv import DeleteResource, GetResource, SetResource
from distribkv.http.locate import Locator, MapCheck
from distribkv.http.routing import ConnectionPool
from distribkv.replication.logtransport import SnapshotResource


def forwarding_pool(node) -> ConnectionPool:
    """The keep-alive connections a node uses to forward requests (routing = "proxy")."""
    server = node.config.server
    return ConnectionPool(server.forward_timeout, per_address=server.threads)


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
