"""The ``granian`` server plugin: the node's WSGI application served by granian's Rust HTTP
stack, in the node's own process.

Select it with ``[cluster] server = "granian"``. granian's own process manager starts workers as
separate processes that import the application by name; a node's application holds an open
storage engine, which one process must own. So this plugin runs one granian WSGI worker inside
the node process: Rust threads parse HTTP and keep connections, ``[server] threads`` Python
threads call the application.

Guarantees kept from the waitress plugin:
- it binds exactly the shard map's address, and refuses an address already bound by anyone
  (granian itself binds with ``SO_REUSEPORT``, which would let two nodes share a port silently);
- ``stop()`` closes the listener at once, lets in-flight requests finish (bounded by
  ``drain_timeout``), and after that answers 503 instead of calling the application, so no
  request can reach a storage engine that is being closed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from distribkv import hookimpl
from distribkv.http.api import Listen, ServerHandle, ServerSpec
from distribkv.server import ServingWrapper

log = logging.getLogger(__name__)

__all__ = ["SPEC", "GranianHandle"]


def _probe_bind(host: str, port: int) -> None:
    """Fail if any socket listens on ``host:port``, even one bound with SO_REUSEPORT.

    SO_REUSEADDR (as waitress sets it) lets the probe ignore connections of a previous run
    still in TIME_WAIT; without SO_REUSEPORT, Linux refuses it next to any listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


class GranianHandle(ServerHandle):
    def __init__(self, app: Callable[..., Any], listen: Listen):
        # Imported here: listing plugins or reading --help never loads the native module.
        from granian._granian import WorkerSignal, WSGIWorker
        from granian.http import HTTP1Settings
        from granian.net import SocketSpec

        self.listen = listen
        self.wrapper = app if isinstance(app, ServingWrapper) else ServingWrapper(app)
        self.drain_timeout = float(listen.settings.get("drain_timeout", 10.0))
        self._stopped = threading.Event()
        self._stopping = threading.Event()
        _probe_bind(listen.host, listen.port)
        self._spec = SocketSpec(listen.host, listen.port, max(128, listen.connection_limit))
        self._signal = WorkerSignal()
        # channel_timeout bounds how long a connection may take to send its headers.
        http1 = HTTP1Settings(header_read_timeout=int(listen.channel_timeout * 1000))
        no_tls = (False, None, None, None, "tls1.3", None, [], False)
        self._worker = WSGIWorker(
            1,  # worker id
            (self._spec, None),  # socket
            None,  # no IPC: metrics are off
            1,  # Rust runtime threads
            512,  # Rust blocking threads
            listen.threads,  # Python threads that call the application
            30,  # idle Python threads exit after this many seconds
            listen.connection_limit,  # requests waiting for a Python thread, at most
            "1",  # HTTP/1 only
            http1,
            None,
            None,  # no static files
            *no_tls,
            (None, None),  # no metrics
        )

    @property
    def port(self) -> int:
        return self.listen.port

    def run(self) -> None:
        from granian._futures import _new_cbscheduler
        from granian._loops import loops
        from granian.wsgi import _callback_wrapper

        loop = loops.get("asyncio")
        callback = _callback_wrapper(self.wrapper, {}, None)
        scheduler = _new_cbscheduler(loop, callback, impl_asyncio=False)
        try:
            # Returns once the Rust side listens; it serves from its own threads until the
            # signal is set.
            self._worker.serve_str(scheduler, loop, self._signal)
            log.info("serving on %s:%s (granian)", self.listen.host, self.listen.port)
            self._stopped.wait()
        finally:
            self.wrapper.close()
            loop.close()
        log.info("stopped serving on %s:%s", self.listen.host, self.listen.port)

    def stop(self) -> None:
        """Stop accepting and drain; safe from a signal handler."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._signal.set()
        threading.Thread(target=self._drain, name="distribkv-drain", daemon=True).start()

    def _drain(self) -> None:
        try:
            deadline = time.monotonic() + self.drain_timeout
            while self.wrapper.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.wrapper.in_flight:
                log.warning(
                    "requests still running after %.1fs; closing anyway", self.drain_timeout
                )
        finally:
            self.wrapper.refuse()
            self._stopped.set()


SPEC = ServerSpec(
    name="granian",
    create=GranianHandle,
    description="granian: Rust HTTP/1 server, one in-process WSGI worker (explicit bind, drain)",
)


@hookimpl
def distribkv_http_servers() -> list[ServerSpec]:
    return [SPEC]
