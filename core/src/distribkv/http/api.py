"""The HTTP-server contract: what serves the node's WSGI application.

A server is a plugin that returns :class:`ServerSpec` objects from the ``distribkv_http_servers``
hook, chosen by ``server`` in ``sharding.toml`` (``waitress`` by default). ``spec.create(app,
listen)`` returns a handle whose ``run()`` blocks until ``stop()`` is called from another thread
or a signal handler; it must bind exactly the given address and never a wildcard of its own
choosing.

``Listen.inline`` names the requests that never wait: not on another request, on a lock held for
long, on the network or on an fsync (the node's reads and health checks). A server may run those
on the thread that parsed them instead of handing them to a worker thread: one thread switch
fewer per request, and no other Python thread contending for the GIL while they run. Everything
else must go to one of ``threads`` worker threads, so a slow request (a replication long-poll, a
durable write) never holds up the others.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import attrs

__all__ = ["Listen", "ServerHandle", "ServerSpec"]


@attrs.frozen
class Listen:
    """Where and how to serve."""

    host: str
    port: int
    threads: int = 8
    connection_limit: int = 100
    channel_timeout: float = 30.0
    max_request_body_size: int = 64 * 1024 * 1024
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    #: ``inline(method, path, query) -> bool``: True for a request that never waits (see the
    #: module's docstring); ``path`` is percent-decoded, ``query`` raw. None: no request is.
    inline: Callable[[str, str, str], bool] | None = None


class ServerHandle(abc.ABC):
    """A server that is being started: ``run()`` blocks, ``stop()`` ends it gracefully."""

    @abc.abstractmethod
    def run(self) -> None:
        """Serve until stopped; in-flight requests finish before it returns."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop accepting; safe to call from a signal handler or another thread."""


@attrs.frozen
class ServerSpec:
    """An HTTP server offered by a plugin: ``create(app, listen) -> ServerHandle``."""

    name: str
    create: Callable[[Callable[..., Any], Listen], ServerHandle]
    description: str
