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

A server with ``ServerSpec.deferred`` lets the application finish a response later, from
another thread: it puts a callable under ``environ[DEFER]``; an application that calls it gets a
:class:`Completion`, returns at once (whatever it returns is ignored), and calls
``completion.finish(status, headers, body)`` exactly once when the answer is known. The node
defers its writes that way: a request thread queues the write and goes on, and the thread that
applies the next group of writes (one fsync for all of them) answers every one of them. Writes
that can be deferred are then ``inline`` too.

``Listen.direct`` answers a request without WSGI: ``direct(method, path, query, header, body,
defer)`` returns ``(status, headers, body)`` (an ``int`` status; the server adds
Content-Length), ``DEFERRED``, or None, and never waits (it answers only what it can answer at
once). A server that uses it calls it through :meth:`distribkv.http.wrapper.ServingWrapper.direct`,
before it builds an environ, on the thread that parsed the request, with the whole body
(``b""`` for a GET); on None it serves the request through the application as usual.
``defer`` is None where the server cannot finish a response later; otherwise ``direct`` may
call it once to get the request's :class:`Completion`, finish that later (from any thread),
and give ``DEFERRED``. Building a WSGI environ costs as much as a read does; the node answers
its key-value requests this way (a forwarded one through ``defer``, when its owner answers),
and leaves to the application only those that wait (a write that waits for replicas, a forward
where the server cannot defer it).

A server whose thread serves several requests in one pass of its loop may run each pass inside
``with distribkv.http.forwarding.burst:``: the reads the thread forwards during it go to their
owners together at its end (see :mod:`distribkv.http.forwarding`).

``Listen.body_check(method, path, length)`` is asked, once a request's headers are in and before
its body is read, about a request with a Content-Length that waits for a ``100 Continue``: it
gives ``(status, error, detail)`` for a body the application would refuse (a value over
``max_value_size``), which the server answers at once without asking for the body, and then
closes the connection; or None. (A client that sends its body without waiting would find the
connection closed under it, with no answer: its body is read, and the application answers.)
Errors a server answers itself (this one, a body over ``max_request_body_size``, a malformed
request) have the node's form: :func:`error_answer`, and an access-log line
(:meth:`distribkv.http.wrapper.ServingWrapper.log_own_answer`). A request whose framing is
malformed is refused by the checks of :mod:`distribkv.http.framing`, and the connection closed.
Where a server's HTTP stack answers some malformed requests before the server sees them, and
cannot be made to do otherwise, the server names that in ``ServerSpec.stack_limits``
(:data:`PLAIN_PARSE_ERRORS`, :data:`TE_OVERRIDES_CL`); the server suite holds it to exactly
those.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import falcon

__all__ = [
    "DEFER",
    "DEFERRED",
    "PLAIN_PARSE_ERRORS",
    "TE_OVERRIDES_CL",
    "Answer",
    "BodyCheck",
    "Completion",
    "Direct",
    "Header",
    "Listen",
    "ListenTls",
    "ServerHandle",
    "ServerSpec",
    "as_wsgi",
    "body_deadline",
    "body_too_large",
    "error_answer",
    "status_line",
]

#: The WSGI environ key of a deferring server's ``defer() -> Completion``.
DEFER = "distribkv.defer"

#: A ``ServerSpec.stack_limits`` name: the server's HTTP stack answers a request it cannot
#: parse (a malformed request line or header, an unsupported version, a framing it refuses)
#: itself, with 400, 414 (a target too long) or 431 (a head too large), an empty body and no
#: access-log line, before the node sees the request. Still a 4xx, never a 5xx.
PLAIN_PARSE_ERRORS = "plain-parse-errors"
#: A ``ServerSpec.stack_limits`` name: the server's HTTP stack frames a request with both
#: Content-Length and Transfer-Encoding by its Transfer-Encoding and closes the connection
#: after the answer (RFC 9112 §6.3 allows this), and hides the Content-Length from the server,
#: which then cannot refuse the request with a 400. Nothing after it on the connection is read.
TE_OVERRIDES_CL = "te-overrides-content-length"


class _Deferred:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


#: What :meth:`distribkv.http.wrapper.ServingWrapper.direct` gives a server for a request that is
#: answered later: nothing to send now (the request's completion sends it).
DEFERRED: Any = _Deferred()


class Completion(Protocol):
    """The answer to a deferred request, sent by ``finish`` from any thread."""

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None: ...


#: An answer: an ``int`` status, the headers (without Content-Length) and the body.
Answer = tuple[int, list[tuple[str, str]], bytes]

#: ``header(name) -> str | None``: a request header by its lower-case name.
Header = Callable[[str], str | None]

#: ``direct(method, path, query, header, body, defer) -> Answer | DEFERRED | None`` (see the
#: module's docstring): ``path`` is percent-decoded, ``query`` raw.
Direct = Callable[
    [str, str, str, Header, bytes, Callable[[], "Completion"] | None],
    Any,
]


#: ``body_check(method, path, length) -> (status, error, detail) | None`` (see the module's
#: docstring): ``path`` is percent-decoded, ``length`` the request's Content-Length.
BodyCheck = Callable[[str, str, int], tuple[int, str, str] | None]


def status_line(code: int) -> str:
    """The status line of ``code`` (``"413 Content Too Large"``): one reason phrase per code,
    whichever way a request is answered."""
    line = _STATUS_LINES.get(code)
    if line is None:
        # Falcon's table, which names codes as RFC 9110 does (the standard library still says
        # "Request Entity Too Large" for 413), so the node's answers agree however they go out.
        line = _STATUS_LINES[code] = falcon.code_to_http_status(code)
    return line


_STATUS_LINES: dict[int, str] = {}


def as_wsgi(answer: Answer) -> tuple[str, list[tuple[str, str]], bytes]:
    """``answer`` as WSGI gives it: a status line, and a Content-Length among the headers."""
    status, headers, body = answer
    return status_line(status), [*headers, ("Content-Length", str(len(body)))], body


def error_answer(status: int, error: str, detail: str) -> Answer:
    """An error a server answers itself, as the node answers its errors: a JSON body
    ``{"error": ..., "detail": ...}`` (the server adds its framing headers)."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    return status, [("Content-Type", "application/json")], body


def body_deadline(listen: Listen, headers_done: float, length: int) -> float:
    """When a body of ``length`` bytes whose headers ended at ``headers_done`` is late."""
    return headers_done + listen.header_timeout + length / listen.min_body_rate


def body_too_large(length: int | None, limit: int) -> tuple[int, str, str]:
    """The 413 for a body over ``max_request_body_size`` (``length`` None: a chunked body)."""
    if length is None:
        return 413, "body too large", f"the body exceeds {limit} bytes"
    return 413, "body too large", f"the body is {length} bytes; the limit is {limit}"


@attrs.frozen
class Listen:
    """Where and how to serve."""

    host: str
    port: int
    threads: int = 8
    #: Open connections at most (see ``[server]`` in the README for how each server keeps it).
    connection_limit: int = 1024
    #: Seconds an idle keep-alive connection stays open.
    channel_timeout: float = 30.0
    #: Seconds from a request's first byte to the end of its headers: 408, and closed, after.
    header_timeout: float = 10.0
    #: Bytes a second: a body must arrive within ``header_timeout`` plus its length at this
    #: rate after its headers (a chunked one, plus the length received so far): 408 otherwise.
    min_body_rate: int = 4096
    #: ``listen()``'s backlog.
    backlog: int = 1024
    max_request_body_size: int = 64 * 1024 * 1024
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    #: ``inline(method, path, query) -> bool``: True for a request that never waits (see the
    #: module's docstring); ``path`` is percent-decoded, ``query`` raw. None: no request is.
    inline: Callable[[str, str, str], bool] | None = None
    #: The answer to a request without WSGI, for a server that can use it (see the module's
    #: docstring); None: none.
    direct: Direct | None = None
    #: Refuses a request by its Content-Length before its body is read (see the module's
    #: docstring); None: only ``max_request_body_size`` does.
    body_check: BodyCheck | None = None
    #: HTTPS: only for a server whose spec has ``tls``; None: plain HTTP.
    tls: ListenTls | None = None


@attrs.frozen
class ListenTls:
    """What a TLS server needs: PEM files by absolute path. With ``verify_clients`` every
    connection must present a certificate signed by ``ca`` (mutual TLS)."""

    cert: str
    key: str
    ca: str
    verify_clients: bool = False


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
    #: True if the server offers ``environ[DEFER]`` (see the module's docstring).
    deferred: bool = False
    #: True if the server serves the requests ``Listen.inline`` names without a worker thread,
    #: so that they are answered while every worker is busy (see the module's docstring).
    inline: bool = False
    #: True if the server serves HTTPS when ``Listen.tls`` is given (``[tls]`` is refused
    #: with a server that cannot).
    tls: bool = False
    #: What the server's HTTP stack does to malformed requests that the node cannot change:
    #: :data:`PLAIN_PARSE_ERRORS`, :data:`TE_OVERRIDES_CL` (none: every refusal is the node's).
    stack_limits: frozenset[str] = frozenset()
