"""The serving wrapper every server plugin puts around the node's application.

It does for every server what a drain and an operator need, whichever way a request is
answered (WSGI, ``Listen.direct``, or later through a completion):

- it counts the requests in flight, so that ``stop()`` can wait for them, and once the node is
  closing it answers 503 without calling the application;
- it writes one access-log line per request, when the request ends (for a deferred one: when
  its answer is finished, from whichever thread finishes it), and counts it for the node's
  metrics (``app.request_counts``, a :class:`~distribkv.metrics.counts.RequestCounts`, when
  the application has one);
- a deferred request (``environ[DEFER]``, or ``defer`` of ``Listen.direct``) is finished once:
  a second finish is ignored, and a request that fails after deferring is answered 500 here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from distribkv.http.accesslog import AccessLog, query_key
from distribkv.http.api import DEFER, DEFERRED, Completion, Direct, Header, as_wsgi, error_answer
from distribkv.logformat import json_formatter
from distribkv.metrics.counts import FOLD_AT, RequestCounts

log = logging.getLogger(__name__)
access_log = logging.getLogger("distribkv.access")

__all__ = ["INTERNAL_ERROR", "STOPPING", "ServingWrapper"]


#: The answer to a request that failed after it was deferred.
INTERNAL_ERROR = as_wsgi(error_answer(500, "internal error", "see the node's log"))
#: The answer once the node is closing.
STOPPING = as_wsgi(error_answer(503, "stopping", "the node is stopping; try another node"))


class ServingWrapper:
    """WSGI wrapper: counts in-flight requests (for draining) and writes one access-log line."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app
        #: Requests by route, status and latency, counted when each ends (None: not counted).
        self.requests: RequestCounts | None = getattr(app, "request_counts", None)
        # One lock for the in-flight count and the request counts, taken once as a request ends.
        self._lock = threading.Lock() if self.requests is None else self.requests.lock
        self.in_flight = 0
        self.refusing = False
        self.access: AccessLog | None = None
        #: Answer sizes are counted, and keys given at debug level, only for a JSON log: a
        #: text line has neither, and costs nothing more than before.
        self.sized = False
        self.keys = False
        if access_log.isEnabledFor(logging.INFO):
            formatter = json_formatter(access_log)
            self.access = AccessLog(json=formatter, routes=getattr(app, "routes", ()))
            self.sized = formatter is not None
            self.keys = access_log.isEnabledFor(logging.DEBUG)

    def refuse(self) -> None:
        """From now on answer 503 without calling the application (the node is closing)."""
        with self._lock:
            self.refusing = True

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        call = _Call(self, environ, start_response)
        with self._lock:
            if self.refusing:
                status, headers, stopping = STOPPING
                start_response(status, [*headers, ("Connection", "close")])
                return [stopping]
            self.in_flight += 1
        server_defer = environ.get(DEFER)
        if server_defer is not None:
            call.server_defer = server_defer
            environ[DEFER] = call.defer
        body: Iterable[bytes] = ()
        try:
            body = self.app(environ, call.start_response)
            # Falcon answers with a list of bytes; materialise anything lazier so the request
            # is finished (and counted as such) when this call returns.
            if not isinstance(body, list):
                produced = body
                try:
                    body = list(produced)
                finally:
                    close = getattr(produced, "close", None)
                    if close is not None:
                        close()
            if call.completion is not None:
                return []  # deferred: its answer follows; what the application returned is not
            return body
        except BaseException:
            if call.completion is not None:
                # Deferred, then failed: nothing may answer it any more, so answer it here
                # (a later finish is ignored).
                call.finish(*INTERNAL_ERROR)
            raise
        finally:
            if server_defer is not None:
                del environ[DEFER]  # it refers to the call: no reference cycle per request
            if call.completion is None:
                self._finished(
                    environ.get("REMOTE_ADDR", "-"),
                    environ.get("REQUEST_METHOD", "-"),
                    environ.get("PATH_INFO", "-"),
                    call.status,
                    call.started,
                    sum(map(len, body)) if self.sized and isinstance(body, list) else -1,
                    query_key(environ.get("QUERY_STRING", "")) if self.keys else None,
                )

    def direct(
        self,
        answer: Direct,
        method: str,
        path: str,
        query: str,
        header: Header,
        body: bytes,
        client: str,
        defer: Callable[[], Completion] | None = None,
    ) -> Any:
        """``answer(method, path, query, header, body, defer)`` (``Listen.direct``), counted
        and logged like a request through the wrapper. Gives the answer to send, None if
        ``answer`` gives none or the node is closing (the application's way then answers), or
        ``DEFERRED``: ``answer`` took the request's completion (``defer()``, the server's
        completion for this request) and finishes it later; it is counted in flight until
        then."""
        with self._lock:
            if self.refusing:
                return None
            self.in_flight += 1
        started = time.monotonic()
        # A read is deferred too where it is forwarded to its owner.
        call = (
            None
            if defer is None
            else _DirectCall(self, client, method, path, started, defer, query)
        )
        try:
            result = answer(method, path, query, header, body, None if call is None else call.defer)
        except BaseException:
            if call is not None and call.completion is not None:
                # Deferred, then failed: only its completion may answer it now (once).
                log.exception("serving %s %s failed after deferring it", method, path)
                call.finish(*INTERNAL_ERROR)
                return DEFERRED
            # The server answers 500; the line says it was not answered here.
            self._finished(client, method, path, "-", started, -1, self._key(query))
            raise
        if result is DEFERRED:
            return DEFERRED
        if result is None:
            with self._lock:
                self.in_flight -= 1
            return None
        self._finished(
            client,
            method,
            path,
            str(result[0]),
            started,
            len(result[2]) if self.sized else -1,
            self._key(query),
        )
        return result

    def _key(self, query: str) -> str | None:
        return query_key(query) if self.keys else None

    def _finished(
        self,
        remote: str,
        method: str,
        path: str,
        status: str,
        started: float,
        size: int = -1,
        key: str | None = None,
    ) -> None:
        """A request ends: it is counted out (and counted for the metrics) and gets its
        access-log line (``size``: its answer's body, -1 when not counted; ``key`` only at
        debug level)."""
        seconds = time.monotonic() - started
        requests = self.requests
        with self._lock:
            self.in_flight -= 1
            if requests is not None:  # under the lock: exact counts, and no lock of its own
                # RequestCounts.count, inline: this runs for every request, and a call costs
                # as much as the counting.
                route = requests.routes.get(path) or requests.other
                statuses = route.statuses
                statuses.append(status)
                route.seconds.append(seconds)
                if len(statuses) >= FOLD_AT:
                    route.fold()
        if self.access is not None:
            self.access.add(
                remote,
                method,
                path,
                status.split(" ", 1)[0],
                seconds * 1000,
                size,
                key,
            )

    def log_own_answer(self, remote: str, method: str, path: str, status: int) -> None:
        """The access-log line of a request the server answered itself, without the
        application (a malformed request, a body over the limit or cut short): every answer
        the node gives has its line."""
        if self.access is not None:
            self.access.add(remote, method, path, str(status), 0.0)

    def close(self) -> None:
        if self.access is not None:
            self.access.close()


class _Call:
    """One request through the wrapper: it records the status for the access log, and, if the
    application defers the request, is its completion: finishing it also ends the request for
    the wrapper (in-flight count, access log)."""

    __slots__ = (
        "completion",
        "done",
        "environ",
        "server_defer",
        "start",
        "started",
        "status",
        "wrapper",
    )

    def __init__(self, wrapper: ServingWrapper, environ: dict[str, Any], start: Callable):
        self.wrapper = wrapper
        self.environ = environ
        self.start = start
        self.started = time.monotonic()
        self.status = "-"
        self.server_defer: Callable[[], Completion] | None = None
        self.completion: Completion | None = None
        self.done = False

    def start_response(self, status, headers, exc_info=None):
        if self.completion is not None:
            return _ignore  # deferred: what the application answers itself is ignored
        self.status = status
        return self.start(status, headers, exc_info)

    def defer(self) -> _Call:
        assert self.server_defer is not None
        self.completion = self.server_defer()
        return self

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.done:  # once: a second finish would count the request out twice
            return
        self.done = True
        environ = self.environ
        try:
            assert self.completion is not None
            self.completion.finish(status, headers, body)
        finally:
            wrapper = self.wrapper
            wrapper._finished(
                environ.get("REMOTE_ADDR", "-"),
                environ.get("REQUEST_METHOD", "-"),
                environ.get("PATH_INFO", "-"),
                status,
                self.started,
                len(body),
                query_key(environ.get("QUERY_STRING", "")) if wrapper.keys else None,
            )


def _ignore(data: bytes) -> None:
    pass


class _DirectCall:
    """A request of :meth:`ServingWrapper.direct` that may be answered later: once ``defer``
    gave its completion, finishing it also ends the request for the wrapper (in-flight count,
    access log)."""

    __slots__ = (
        "client",
        "completion",
        "done",
        "method",
        "path",
        "query",
        "server_defer",
        "started",
        "wrapper",
    )

    def __init__(
        self,
        wrapper: ServingWrapper,
        client: str,
        method: str,
        path: str,
        started: float,
        server_defer: Callable[[], Completion],
        query: str,
    ):
        self.wrapper = wrapper
        self.query = query
        self.client = client
        self.method = method
        self.path = path
        self.started = started
        self.server_defer = server_defer
        self.completion: Completion | None = None
        self.done = False

    def defer(self) -> _DirectCall:
        self.completion = self.server_defer()
        return self

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the answer (once: a second finish is ignored); never raises, so a write
        answered at once (refused before it was queued) is never answered twice."""
        if self.done:
            return
        self.done = True
        try:
            assert self.completion is not None
            self.completion.finish(status, headers, body)
        except Exception:  # the client may be gone; the request ends all the same
            log.exception("sending the answer to %s %s failed", self.method, self.path)
        finally:
            wrapper = self.wrapper
            wrapper._finished(
                self.client,
                self.method,
                self.path,
                status,
                self.started,
                len(body),
                wrapper._key(self.query),
            )
