"""Where the metrics are served: ``GET /metrics`` on the node's own port
(:class:`MetricsResource`), and optionally on a port of its own (:class:`MetricsListener`,
``[server] metrics_port``).

Both answer what ``/status`` answers to: without ``[auth]`` anyone who can reach the node
(loopback by default); with ``[auth]`` a token of ``status_role`` (``admin`` by default), as
the ``Authorization: Bearer`` header of the scrape. The separate listener listens on the
node's own host (beyond loopback only where the node itself may, with ``[tls]``, ``[auth]``
and a cluster token), and serves HTTPS with the node's certificate under ``[tls]``: it is
exactly as reachable and as protected as the node's port, never more.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import falcon
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from distribkv.auth import Authorizer
from distribkv.config import TlsConfig
from distribkv.http.api import Answer, error_answer, status_line
from distribkv.http.auth import deny

log = logging.getLogger(__name__)

__all__ = ["MetricsListener", "MetricsResource", "server_context"]

#: The separate listener: connections served at once (more are closed at once), seconds a
#: connection may take from accept to its last request header, and most header bytes.
MAX_CONNECTIONS = 4
REQUEST_TIMEOUT = 5.0
MAX_HEADER_BYTES = 16 * 1024


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asks for (``Accept``: OpenMetrics for
    Prometheus, the text format otherwise); (body, content type)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsResource:
    """``GET /metrics``; the token it needs is checked by the application's ``AuthCheck``
    (see :data:`distribkv.http.auth.STATUS_PATHS`)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data, resp.content_type = render(self.registry, req.get_header("Accept"))


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server side of ``[tls]`` for the listener: the node's certificate, TLS 1.3 as the
    node's port, and client certificates of the cluster's CA with ``verify_clients``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.verify_clients:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(tls.ca))
    return context


class MetricsListener:
    """``GET /metrics`` on ``host:port``, apart from the client port: a scrape is answered
    while every client connection and worker thread of the node is busy.

    A thread accepts; each connection gets a thread of its own, at most
    :data:`MAX_CONNECTIONS` at once (more are closed at once), one request per connection
    (``Connection: close``), and :data:`REQUEST_TIMEOUT` seconds from accept (TLS handshake
    included) to its last header line: a client that trickles is cut off."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        authorizer: Authorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.registry = registry
        self.authorizer = authorizer
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=16)
        self._socket.settimeout(0.2)  # the accept loop looks at _stopping this often
        self.address = self._socket.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="distribkv-metrics", daemon=True)

    def start(self) -> MetricsListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._socket.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("the metrics listener could not accept a connection")
                time.sleep(0.2)
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()  # enough scrapes at once
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="distribkv-metrics-request", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            deadline = time.monotonic() + REQUEST_TIMEOUT
            conn.settimeout(REQUEST_TIMEOUT)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            head = _read_head(conn, deadline)
            if head is None:
                return  # too slow, too large or broken off: closed without an answer
            status, headers, body = self._answer(*head)
            lines = [f"HTTP/1.1 {status_line(status)}"]
            lines += [f"{name}: {value}" for name, value in headers]
            lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall("\r\n".join(lines).encode("latin-1") + body)
        except (OSError, ssl.SSLError):
            pass  # the scraper went away, or failed its handshake
        except Exception:
            log.exception("serving a metrics scrape failed")
        finally:
            self._slots.release()
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, method: str, target: str, header: Callable[[str], str | None]) -> Answer:
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return error_answer(404, "not found", f"{path} is not served here; GET /metrics")
        if method != "GET":
            status, headers, body = error_answer(405, "method not allowed", "GET /metrics")
            return status, [*headers, ("Allow", "GET")], body
        if self.authorizer is not None:
            refused = deny(self.authorizer, header, self.authorizer.status_rank)
            if refused is not None:
                return refused
        body, content_type = render(self.registry, header("accept"))
        return 200, [("Content-Type", content_type)], body


def _read_head(
    conn: socket.socket, deadline: float
) -> tuple[str, str, Callable[[str], str | None]] | None:
    """The request line's method and target, and its headers by lower-case name; None when
    the head is not in by ``deadline``, is larger than :data:`MAX_HEADER_BYTES` or is not
    HTTP."""
    data = b""
    while b"\r\n\r\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(data) > MAX_HEADER_BYTES:
            return None
        conn.settimeout(remaining)
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers.get
