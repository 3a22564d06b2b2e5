"""Every hook the distribkv core calls: the plugin reference.

Plugins are modules (or objects) registered under the entry-point group ``distribkv``; they mark
implementations with :data:`distribkv.hookimpl`. Selection works by registration, not by
``firstresult``: each ``distribkv_*_*s`` hook returns a list of specs, the core merges them,
rejects duplicate names and picks the one ``sharding.toml`` names.

Hooks are called at start-up only, never per request or per key: resolve factories once, then
call plain objects. The core always calls hooks with keyword arguments, so a spec may gain
arguments later without breaking existing plugins.

The plugin guide, docs/plugins.md, has a section with a runnable example for each hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from distribkv import PROJECT

if TYPE_CHECKING:
    from distribkv.coordination.api import CoordinationSpec
    from distribkv.hashing.api import HashingSpec
    from distribkv.http.api import ServerSpec
    from distribkv.nodeview import NodeView
    from distribkv.replication.api import TransportSpec
    from distribkv.storage.api import BackendSpec

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def distribkv_storage_backends() -> list[BackendSpec]:
    """Return the storage backends this plugin provides (a list of ``BackendSpec``).

    Each spec's ``open`` must import the native library lazily, so that listing plugins, reading
    ``--help`` or validating a config never loads it. Return an empty list (or nothing) to
    provide none.
    """


@hookspec
def distribkv_hashing_schemes() -> list[HashingSpec]:
    """Return the hashing schemes this plugin provides (a list of ``HashingSpec``).

    A scheme must place a key identically in every process and on every machine.
    """


@hookspec
def distribkv_replication_transports() -> list[TransportSpec]:
    """Return the replication transports this plugin provides (a list of ``TransportSpec``)."""


@hookspec
def distribkv_http_servers() -> list[ServerSpec]:
    """Return the HTTP servers this plugin provides (a list of ``ServerSpec``).

    ``spec.create(app, listen)`` makes a ``ServerHandle`` for the node's WSGI application:
    ``run()`` serves on exactly ``listen.host:listen.port`` until ``stop()``, which drains.
    ``listen.inline`` names the requests that never wait, which a server may serve on the
    thread that parsed them; all others go to ``listen.threads`` worker threads. A server
    with ``spec.deferred`` puts ``environ[distribkv.http.api.DEFER]`` in the environ so that
    the application can finish an answer later, from another thread. A server may also call
    ``listen.direct`` for a request before it builds a WSGI environ, and send its answer if it
    gives one, or let it finish the answer later (see ``distribkv.http.api``). Wrap the
    application in ``distribkv.http.wrapper.ServingWrapper`` for the drain and the access log."""


@hookspec
def distribkv_coordinations() -> list[CoordinationSpec]:
    """Return the coordinations this plugin provides (a list of ``CoordinationSpec``).

    A coordination decides who leads each shard (``[cluster] coordination``): ``static``
    reads it from ``sharding.toml``; one that ``elects`` moves leadership when a leader dies,
    and fences a leader whose right to acknowledge has lapsed (see
    ``distribkv.coordination.api``).
    """


@hookspec
def distribkv_routes(node: NodeView) -> list[tuple[str, Any]]:
    """Return extra ``(path, resource)`` pairs to mount on ``node``'s Falcon application.

    Called once while the application is built; a path that is already taken is an error at
    start-up. (A replication transport gives its endpoints as ``TransportSpec.routes``
    instead: they are mounted only in a cluster that selects it.)
    """


@hookspec(historic=True)
def distribkv_node_started(node: NodeView) -> None:
    """Called once when ``node`` has opened its storage and is about to serve.

    Historic: a plugin registered later still receives the call.
    """


@hookspec
def distribkv_node_stopping(node: NodeView) -> None:
    """Called once when ``node`` stops serving, before its storage is closed; only for a node
    whose ``distribkv_node_started`` call was made (not when start-up failed before it)."""
