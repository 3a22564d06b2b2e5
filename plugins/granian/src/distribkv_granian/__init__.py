"""The ``granian`` server plugin: the node's WSGI application behind granian's Rust HTTP stack,
in the node's own process.

Select it with ``[cluster] server = "granian"``. granian's own process manager starts workers as
separate processes that import the application by name; a node's application holds an open
storage engine, which one process must own. So this plugin runs one granian worker inside the
node process, and bridges it to the WSGI application itself:

- Rust threads accept connections, parse HTTP and read request bodies;
- granian's one Python thread serves the requests that ``Listen.inline`` names (the node's reads,
  health checks and deferred writes) right where it receives them (a request with a body once
  it is read), so a read never waits for a thread switch, and no other Python thread contends
  for the GIL while reads run; a request that ``Listen.direct`` answers or defers (a leader's
  read of a key it holds, its SET of a key it owns, a request forwarded to its key's owner) is
  served from granian's request object, without a WSGI environ;
- every other request (writes that wait, replication long-polls, forwards under ``[tls]``)
  goes to one of ``[server] threads`` worker threads once granian has read its body, so a slow
  one never holds up the reads.

It uses granian's RSGI worker: a WSGI worker hands every request to a pool of Python threads,
and each storage call, which lets go of the GIL, then hands it to another of them, which halves
a read's throughput. The bridge drives the worker through granian's internal classes, so the
plugin pins granian to one minor release.

Guarantees kept from the waitress plugin:
- it binds exactly the shard map's address, and refuses an address already bound by anyone
  (granian itself binds with ``SO_REUSEPORT``, which would let two nodes share a port silently);
- a request body is bounded by ``max_request_body_size`` (413 beyond it) and must arrive within
  ``header_timeout`` plus its length at ``min_body_rate`` (408 otherwise); headers must arrive
  within ``header_timeout`` (hyper closes the connection otherwise);
- ``stop()`` closes the listener at once, lets accepted requests finish (bounded by
  ``drain_timeout``), and after that answers 503 instead of calling the application, so no
  request can reach a storage engine that is being closed.

Unlike waitress, it serves HTTPS (``Listen.tls``, from ``[tls]``): granian's own TLS, 1.3 only,
and with ``verify_clients`` it refuses a connection without a client certificate signed by the
cluster's CA.

Malformed requests. hyper, granian's HTTP stack, parses every request's head, and granian 2.8
offers no way to change what hyper answers to one it cannot parse (its HTTP/1 settings are
``header_read_timeout``, ``keep_alive``, ``max_buffer_size`` and ``pipeline_flush``; hyper
builds these answers itself). So these answers stay hyper's own, with an empty body, no JSON
and no access-log line (``PLAIN_PARSE_ERRORS`` in the spec's ``stack_limits``):

- 400 to a malformed request line: a control byte or a raw byte over 0x7f in the target, a
  method that is not a token, an HTTP/0.9 request, a version other than HTTP/1.0 and HTTP/1.1
  (waitress answers 505 to that); to a malformed header line: a control byte, a space in a name
  or before the colon, no colon, a folded line; to an invalid Content-Length or two that
  differ; to Transfer-Encoding in HTTP/1.0, or whose last coding is not ``chunked``;
- 414 to a target over 65,534 bytes;
- 431 to a head over granian's ``max_buffer_size`` (417,792 bytes by default).

hyper frames a request that has both Content-Length and Transfer-Encoding by its
Transfer-Encoding, answers it and closes the connection after the answer, so nothing smuggled
after it is read; but it drops the Content-Length before the request reaches the node, which
therefore cannot refuse it with a 400 (``TE_OVERRIDES_CL``). What hyper lets through, the node
refuses in its own form (:mod:`distribkv.http.framing`), logged: Transfer-Encoding other than
one ``chunked`` (repeated, or another coding before it), and a body cut short, also when the
client closed only its sending side (400 ``body cut short``; granian itself would answer a
bare 500). hyper takes lines that end in a bare LF (RFC 9112 §2.2 allows it; waitress refuses
them). A client that closes its sending side right after a complete request gets no answer:
hyper closes such a connection (its half-close support is off, and granian does not expose it).
"""

from __future__ import annotations

import importlib
import io
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from distribkv import hookimpl
from distribkv.http.api import (
    DEFER,
    DEFERRED,
    PLAIN_PARSE_ERRORS,
    TE_OVERRIDES_CL,
    Listen,
    ServerHandle,
    ServerSpec,
    body_deadline,
    body_too_large,
    error_answer,
)
from distribkv.http.framing import transfer_refusal
from distribkv.http.wrapper import ServingWrapper

log = logging.getLogger(__name__)

__all__ = ["SPEC", "TESTED_GRANIAN", "GranianHandle"]

#: The granian release series the bridge was written and tested against (its worker API is
#: granian's internal one; the pin in this plugin's pyproject.toml says the same).
TESTED_GRANIAN = "2.8"

#: How often pending request bodies are checked against their deadlines.
BODY_CHECK_INTERVAL = 1.0
#: How long requests already running when the node starts refusing may still take (seconds).
REFUSE_GRACE = 1.0
_EMPTY = b""


def _probe_bind(host: str, port: int) -> None:
    """Fail if any socket listens on ``host:port``, even one bound with SO_REUSEPORT.

    SO_REUSEADDR (as waitress sets it) lets the probe ignore connections of a previous run
    still in TIME_WAIT; without SO_REUSEPORT, Linux refuses it next to any listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


class _InlineLoop:
    """What granian takes for the asyncio loop. granian completes a request-body future in its
    Python thread and then calls the future's done-callback through the loop; here the
    callback runs right away in that thread. No coroutine and no real event loop is involved:
    the bridge only ever waits for body futures, through their callbacks."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            callback(*args)
        except Exception:  # a callback's failure must not reach granian
            log.exception("a request-body callback failed")

    call_soon = call_soon_threadsafe


def _never(method: str, path: str, query: str) -> bool:
    return False


class _Request:
    """A request whose body is being read; then it is served inline or by a worker."""

    __slots__ = (
        "chunks",
        "deadline",
        "finished",
        "inline",
        "reading",
        "size",
        "started",
        "watcher",
    )

    def __init__(self, watcher, started: float, deadline: float, inline: bool):
        self.watcher = watcher
        self.started = started  # when its headers were in
        self.deadline = deadline
        self.inline = inline
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished = False
        self.reading = None  # granian's future of the body (or of its next piece)


class _Exchange:
    """One request's way back: the answer the application returns, or, if it deferred the
    request (``environ[DEFER]``), the one it finishes later from another thread."""

    __slots__ = ("deferred", "watcher")

    def __init__(self, watcher):
        self.watcher = watcher
        self.deferred = False

    def defer(self) -> _Exchange:
        self.deferred = True
        return self

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            self.watcher.proto.response_bytes(int(status[:3]), headers, body)
        finally:
            self.watcher.done()


class GranianHandle(ServerHandle):
    def __init__(self, app: Callable[..., Any], listen: Listen):
        # Imported here: listing plugins or reading --help never loads the native module.
        from granian.http import HTTP1Settings
        from granian.net import SocketSpec

        # granian's internal worker: its stubs describe an older signature than the release
        # the plugin is pinned to, so it is used untyped.
        native: Any = importlib.import_module("granian._granian")
        CallbackScheduler, RSGIWorker, WorkerSignal = (
            native.CallbackScheduler,
            native.RSGIWorker,
            native.WorkerSignal,
        )
        self.listen = listen
        self.wrapper = app if isinstance(app, ServingWrapper) else ServingWrapper(app)
        self.drain_timeout = float(listen.settings.get("drain_timeout", 10.0))
        self.inline = listen.inline or _never
        self.direct = listen.direct
        self.max_body = listen.max_request_body_size
        self._stopped = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0  # handed over to the workers (body reads included), not yet answered
        self._reading: dict[int, _Request] = {}  # bodies being read, for the timeout check
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._direct_watcher = None
        self._defer_direct = self._defer_current  # bound once
        self._base_environ = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": listen.host,
            "SERVER_PORT": str(listen.port),
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        _probe_bind(listen.host, listen.port)
        self._spec = SocketSpec(listen.host, listen.port, listen.backlog)
        self._signal = WorkerSignal()
        self._loop = _InlineLoop()
        handle = self

        class Scheduler(CallbackScheduler):  # type: ignore[misc, valid-type]
            # granian calls ``_schedule_fn(watcher)`` for every request, in its Python thread.
            __slots__ = ()

            def __init__(self, *args):
                super().__init__()
                self._schedule_fn = handle._dispatch  # type: ignore[misc]

        def unused(*args):
            raise AssertionError("granian asked to run a coroutine; the bridge never makes one")

        self._scheduler = Scheduler(self._loop, unused, None, unused, unused)
        # header_timeout bounds how long a request may take to send its headers.
        http1 = HTTP1Settings(header_read_timeout=int(listen.header_timeout * 1000))
        # granian's TLS settings: enabled, cert, key, key password, lowest protocol, CA, CRLs,
        # client verification (mutual TLS).
        tls = listen.tls
        tls_settings: tuple[Any, ...] = (
            (False, None, None, None, "tls1.3", None, [], False)
            if tls is None
            else (True, tls.cert, tls.key, None, "tls1.3", tls.ca, [], tls.verify_clients)
        )
        self._worker = RSGIWorker(
            1,  # worker id
            (self._spec, None),  # socket
            None,  # no IPC: metrics are off
            1,  # Rust runtime threads
            512,  # Rust blocking threads
            1,  # the Python thread: inline requests, body callbacks, hand-over to workers
            30,  # seconds before an idle Python thread exits
            listen.connection_limit,  # connections at most (the rest wait in the backlog)
            "1",  # HTTP/1 only
            http1,
            None,
            False,  # no websockets
            None,  # no static files
            *tls_settings,
            (None, None),  # no metrics
        )
        self._threads = [
            threading.Thread(target=self._serve_queued, name=f"distribkv-worker-{i}", daemon=True)
            for i in range(max(1, listen.threads))
        ]

    @property
    def port(self) -> int:
        return self.listen.port

    # --- requests -------------------------------------------------------------------------

    def _environ(self, scope, body: bytes) -> dict[str, Any]:
        environ = self._base_environ.copy()
        environ["REQUEST_METHOD"] = scope.method
        path = scope.path  # percent-decoded UTF-8 (invalid sequences replaced)
        # WSGI's PATH_INFO holds bytes as latin-1 text, as waitress gives it (Falcon decodes it).
        environ["PATH_INFO"] = path if path.isascii() else path.encode().decode("latin-1")
        environ["QUERY_STRING"] = scope.query_string
        environ["SERVER_PROTOCOL"] = "HTTP/" + scope.http_version
        environ["REMOTE_ADDR"] = scope.client.rpartition(":")[0]
        environ["wsgi.url_scheme"] = scope.scheme
        environ["wsgi.input"] = io.BytesIO(body)
        for name, value in scope.headers.items():
            if name == "content-length" or "_" in name:
                # Content-Length: set from the body actually read. A name with "_" would be
                # taken for one with "-" (X_Distribkv_Map for X-Distribkv-Map, which
                # Listen.direct looks up by its real name): dropped, as waitress drops it.
                continue
            if name == "content-type":
                environ["CONTENT_TYPE"] = value
                continue
            key = "HTTP_" + name.upper().replace("-", "_")
            previous = environ.get(key)
            environ[key] = value if previous is None else f"{previous},{value}"
        if body or scope.method in ("POST", "PUT", "PATCH"):
            environ["CONTENT_LENGTH"] = str(len(body))
        return environ

    def _respond(self, watcher, body: bytes) -> None:
        """Call the application and send its answer (in whichever thread runs this)."""
        exchange = _Exchange(watcher)
        try:
            environ = self._environ(watcher.scope, body)
            environ[DEFER] = exchange.defer
            started: list = []

            def start_response(status, headers, exc_info=None):
                started[:] = (status, headers)

            chunks = self.wrapper(environ, start_response)
            if exchange.deferred:
                return  # answered by whoever finishes it
            status, headers = started
            watcher.proto.response_bytes(int(status[:3]), headers, b"".join(chunks))
        except BaseException:  # the client gets a 500; the traceback goes to the log
            log.exception("serving %s %s failed", watcher.scope.method, watcher.scope.path)
            if not exchange.deferred:
                self._error(watcher, 500, "internal error", "see the node's log")
        finally:
            if not exchange.deferred:
                watcher.done()  # sends a bare 500 if nothing was sent

    @staticmethod
    def _error(watcher, status: int, error: str, detail: str) -> None:
        """An error answered here, in the node's JSON form; the connection closes."""
        status, headers, body = error_answer(status, error, detail)
        watcher.proto.response_bytes(status, [*headers, ("connection", "close")], body)

    def _refuse(self, watcher, status: int, error: str, detail: str) -> None:
        """A request refused here, without the application: answered as :meth:`_error` and
        given its access-log line."""
        scope = watcher.scope
        try:
            self._error(watcher, status, error, detail)
        finally:
            self.wrapper.log_own_answer(
                scope.client.rpartition(":")[0], scope.method, scope.path, status
            )

    def _dispatch(self, watcher) -> None:
        """Every request, in granian's Python thread: served here, or handed to a worker
        (once its body is read, for both)."""
        request = None
        try:
            scope = watcher.scope
            method = scope.method
            path = scope.path
            query = scope.query_string
            headers = scope.headers
            coding = headers.get("transfer-encoding")
            if coding is not None:
                refusal = self._framing_refusal(scope, headers)
                if refusal is not None:
                    self._refuse(watcher, *refusal)
                    watcher.done()
                    return
            length = headers.get("content-length")
            chunked = coding is not None
            # A GET with a body goes the way of any request with one: its body is read first.
            # Answered unread, hyper would close the connection after the answer, without a
            # word to the client, dropping whatever it had sent after it.
            bodiless = not chunked and (length is None or length == "0")
            if (
                method == "GET"
                and bodiless
                and self._answer_direct(watcher, scope, method, path, query, _EMPTY)
            ):
                return
            inline = self.inline(method, path, query)
            if inline and method == "GET" and bodiless:
                self._respond(watcher, _EMPTY)
                return
            if bodiless:
                if inline:
                    self._respond(watcher, _EMPTY)
                else:
                    self._hand_over(watcher, _EMPTY)
                return
            if length is not None:
                refusal = self._refusal(method, path, length, headers)
                if refusal is not None:
                    self._refuse(watcher, *refusal)
                    watcher.done()
                    return
            now = time.monotonic()
            expected = 0 if chunked else int(length)  # chunked: extended as pieces arrive
            request = _Request(watcher, now, body_deadline(self.listen, now, expected), inline)
            with self._lock:
                self._pending += 1
                self._reading[id(request)] = request
            if chunked:
                watcher.proto.__aiter__()
                self._read_next(request)
            else:
                # The length is known and within the limit: granian reads it all at once.
                request.reading = whole = watcher.proto()
                whole.add_done_callback(lambda done: self._whole_body(request, done))
        except BaseException:  # never let an error escape into granian
            log.exception("dispatching a request failed")
            if request is not None:
                self._finish_read(request, (500, "internal error", "see the node's log"))
            else:
                watcher.done()

    @staticmethod
    def _framing_refusal(scope, headers) -> tuple[int, str, str] | None:
        """Transfer-Encoding as :mod:`distribkv.http.framing` takes it. hyper has refused
        what it cannot frame (a coding whose last is not chunked, any in HTTP/1.0); what it
        lets through, the node refuses: a coding other than one ``chunked``. (A Content-Length
        next to it never reaches the node: see the module's docstring.)"""
        codings = [value for name, value in headers.items() if name == "transfer-encoding"]
        return transfer_refusal(
            scope.http_version, codings, headers.get("content-length") is not None
        )

    def _refusal(self, method: str, path: str, length: str, headers) -> tuple[int, str, str] | None:
        """The error for a request by its Content-Length, answered before any of its body is
        read (so hyper sends no 100 Continue), or None to read the body. A refusal of
        ``body_check`` is answered only to a client that waits for a 100 Continue: one that is
        sending its body would find the connection closed under it (a reset, and no answer),
        so its body is read and the application answers."""
        if not (length.isascii() and length.isdigit()):
            return 400, "bad request", f"malformed Content-Length {length!r}"
        size = int(length)
        check = self.listen.body_check
        refusal = None if check is None else check(method, path, size)
        if size > self.max_body:
            return refusal or body_too_large(size, self.max_body)
        if refusal is not None and (headers.get("expect") or "").lower() != "100-continue":
            return None
        return refusal

    def _answer_direct(self, watcher, scope, method: str, path: str, query: str, body) -> bool:
        """True if ``Listen.direct`` answered the request (or deferred it). Only ever called in
        granian's one Python thread, one request at a time."""
        if self.direct is None:
            return False
        self._direct_watcher = watcher  # what _defer_direct defers: the request being asked
        answer = self.wrapper.direct(
            self.direct,
            method,
            path,
            query,
            scope.headers.get,
            body,
            scope.client.rpartition(":")[0],
            self._defer_direct,
        )
        if answer is None:
            return False
        if answer is not DEFERRED:
            watcher.proto.response_bytes(*answer)
            watcher.done()
        return True

    def _defer_current(self) -> _Exchange:
        """``defer`` for the request :meth:`_answer_direct` is asking about (the serving
        wrapper calls it, if at all, before it returns): no object per request that is not
        deferred."""
        return _Exchange(self._direct_watcher).defer()

    def _read_next(self, request: _Request) -> None:
        request.reading = future = request.watcher.proto.__anext__()
        future.add_done_callback(lambda done: self._body_chunk(request, done))

    def _received(self, request: _Request, future) -> bytes | None:
        """What a body read gave, or None once the read has failed or was cancelled (timed
        out): the body ended before its Content-Length (the client closed its side, or went
        away: then the answer is lost)."""
        if future.cancelled():
            return None
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - hyper says only that the body was broken off
            self._finish_read(
                request,
                (400, "body cut short", "the connection ended before the whole body arrived"),
            )
            return None

    def _body_chunk(self, request: _Request, future) -> None:
        """A piece of a request body arrived (in granian's Python thread)."""
        chunk = self._received(request, future)
        if chunk is None or request.finished:
            return  # dropped, or timed out meanwhile
        if chunk:
            request.size += len(chunk)
            if request.size > self.max_body:
                self._finish_read(request, body_too_large(None, self.max_body))
                return
            request.chunks.append(chunk)
            request.deadline = body_deadline(self.listen, request.started, request.size)
            self._read_next(request)
            return
        # granian answers an empty piece both at the end of the body and for a body broken
        # off (or a trailer): only after the end does asking again fail at once.
        try:
            request.watcher.proto.__anext__()
        except StopAsyncIteration:
            self._queue_read(request, b"".join(request.chunks))
            return
        self._finish_read(request, (400, "body cut short", "the request body was broken off"))

    def _whole_body(self, request: _Request, future) -> None:
        body = self._received(request, future)
        if body is not None:
            self._queue_read(request, body)

    def _queue_read(self, request: _Request, body: bytes) -> None:
        with self._lock:
            if request.finished:
                return  # timed out meanwhile
            request.finished = True
            self._reading.pop(id(request), None)
        watcher = request.watcher
        scope = watcher.scope
        # Asked again: while the body arrived, a reshard may have moved the key elsewhere, and
        # a request that waits for another node must not hold up this thread.
        if not (request.inline and self.inline(scope.method, scope.path, scope.query_string)):
            self._work.put((watcher, body))
            return
        try:
            try:
                answered = self._answer_direct(
                    watcher, scope, scope.method, scope.path, scope.query_string, body
                )
            except BaseException:  # the client gets a 500; the traceback goes to the log
                log.exception("serving %s %s failed", scope.method, scope.path)
                self._error(watcher, 500, "internal error", "see the node's log")
                watcher.done()
                return
            if not answered:
                self._respond(watcher, body)
        finally:
            with self._lock:
                self._pending -= 1

    def _finish_read(self, request: _Request, answer: tuple[int, str, str] | None) -> None:
        """End a body read that will not reach the application: ``answer`` it, or drop it."""
        with self._lock:
            if request.finished:
                return
            request.finished = True
            self._reading.pop(id(request), None)
            self._pending -= 1
        if answer is not None:
            # A body still on its way (too slow, too large): cancelling granian's read of it
            # makes hyper close the connection after the answer, instead of reading the rest.
            reading = request.reading
            if reading is not None and not reading.done():
                reading.cancel()
            try:
                self._refuse(request.watcher, *answer)
            except Exception:  # noqa: BLE001 - the connection may be gone
                pass
        request.watcher.done()

    def _hand_over(self, watcher, body: bytes) -> None:
        with self._lock:
            self._pending += 1
        self._work.put((watcher, body))

    def _serve_queued(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            watcher, body = item
            try:
                self._respond(watcher, body)
            except BaseException:  # _respond answers its errors; a worker must not die of one
                log.exception("a worker thread's request failed")
            finally:
                with self._lock:
                    self._pending -= 1

    def _expire_slow_bodies(self) -> None:
        while not self._stopped.wait(BODY_CHECK_INTERVAL):
            now = time.monotonic()
            with self._lock:
                late = [r for r in self._reading.values() if r.deadline < now]
            for request in late:
                self._finish_read(
                    request,
                    (
                        408,
                        "request timeout",
                        f"the request body arrived slower than {self.listen.min_body_rate}"
                        " bytes a second",
                    ),
                )

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        for thread in self._threads:
            thread.start()
        reaper = threading.Thread(
            target=self._expire_slow_bodies, name="distribkv-body-timeouts", daemon=True
        )
        reaper.start()
        try:
            # Returns once the Rust side listens; it serves from its own threads until the
            # signal is set.
            self._worker.serve_str(self._scheduler, self._loop, self._signal)
            log.info("serving on %s:%s (granian)", self.listen.host, self.listen.port)
            # Python runs signal handlers in the main thread only, and a signal may reach one of
            # granian's threads instead: wake up now and then so a SIGTERM is never left
            # waiting.
            while not self._stopped.wait(0.2):
                pass
        finally:
            for _ in self._threads:
                self._work.put(None)
            for thread in self._threads:
                thread.join(timeout=self.drain_timeout)
            self.wrapper.close()
        log.info("stopped serving on %s:%s", self.listen.host, self.listen.port)

    def stop(self) -> None:
        """Stop accepting and drain; safe from a signal handler."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._signal.set()
        threading.Thread(target=self._drain, name="distribkv-drain", daemon=True).start()

    def _busy(self) -> bool:
        return bool(self.wrapper.in_flight or self._pending)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        try:
            while self._busy() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._busy():
                log.warning(
                    "requests still running after %.1fs; closing anyway", self.drain_timeout
                )
        finally:
            self.wrapper.refuse()
            # A request that got past the wrapper just before it refused may still be running
            # (under steady load there is always one): let it finish before the node closes its
            # storage, for a moment more even when the drain timeout has passed.
            grace = max(deadline, time.monotonic() + REFUSE_GRACE)
            while self.wrapper.in_flight and time.monotonic() < grace:
                time.sleep(0.005)
            self._stopped.set()


SPEC = ServerSpec(
    name="granian",
    create=GranianHandle,
    description="granian: Rust HTTP/1 server, one in-process worker; reads served inline,"
    " other requests on worker threads, deferred answers (explicit bind, drain)",
    deferred=True,
    inline=True,
    tls=True,
    stack_limits=frozenset({PLAIN_PARSE_ERRORS, TE_OVERRIDES_CL}),
)


@hookimpl
def distribkv_http_servers() -> list[ServerSpec]:
    return [SPEC]
