"""The ``waitress`` server plugin, and the serving wrapper every server plugin gets.

waitress is configured deliberately: it binds exactly the shard map's address (never its 0.0.0.0
default), with an explicit thread count, connection limit, channel timeout and body limit.
Shutdown is orderly: ``stop()`` closes the listening socket, lets in-flight requests finish and
flush (bounded by ``drain_timeout``), then closes every connection so ``run()`` returns.
"""

from __future__ import annotations

import atexit
import collections
import http
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from distribkv import hookimpl
from distribkv.http.api import (
    DEFER,
    DEFERRED,
    BodyCheck,
    Completion,
    Direct,
    Listen,
    ServerHandle,
    ServerSpec,
    body_too_large,
    error_answer,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("distribkv.access")


class AccessLog:
    """One line per request, in the format of the node's log, written by a background thread
    in batches: a ``logging`` call per request costs more than serving a GET. Bounded: beyond
    ``max_pending`` unwritten lines, new ones are counted and dropped (and the count logged)."""

    def __init__(self, stream=None, *, interval: float = 0.1, max_pending: int = 100_000):
        self.stream = stream
        self.interval = interval
        self.max_pending = max_pending
        self.pending: collections.deque = collections.deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distribkv-access", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, remote: str, method: str, path: str, status: str, ms: float) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        self.pending.append((time.time(), remote, method, path, status, ms))

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the access log must never stop the node
                self.pending.clear()

    def flush(self) -> None:
        lines = []
        pending = self.pending
        second, stamp = -1, ""
        for _ in range(len(pending)):  # what is there now: one bounded batch
            try:
                at, remote, method, path, status, ms = pending.popleft()
            except IndexError:  # another flush (close) took it
                break
            if int(at) != second:  # one strftime per second of lines, not one per line
                second = int(at)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            lines.append(
                f"{stamp},{int(at * 1000) % 1000:03d} INFO distribkv.access:"
                f" {remote} {method} {path} {status} {ms:.1f}ms\n"
            )
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            lines.append(f"WARNING distribkv.access: {dropped} access-log lines dropped\n")
        if lines:
            stream = self.stream or sys.stderr
            try:
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError):
                pass  # nowhere to write: the node goes on serving

    def close(self) -> None:
        self._wake.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - closing the log must not fail the shutdown
            pass


class ServingWrapper:
    """WSGI wrapper: counts in-flight requests (for draining) and writes one access-log line."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app
        self._lock = threading.Lock()
        self.in_flight = 0
        self.refusing = False
        self.access = AccessLog() if access_log.isEnabledFor(logging.INFO) else None

    def refuse(self) -> None:
        """From now on answer 503 without calling the application (the node is closing)."""
        with self._lock:
            self.refusing = True

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        call = _Call(self, environ, start_response)
        with self._lock:
            if self.refusing:
                start_response(
                    "503 Service Unavailable",
                    [
                        ("Content-Type", "text/plain"),
                        ("Content-Length", "17"),
                        ("Connection", "close"),
                    ],
                )
                return [b"node is stopping\n"]
            self.in_flight += 1
        server_defer = environ.get(DEFER)
        if server_defer is not None:
            call.server_defer = server_defer
            environ[DEFER] = call.defer
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
                self._done(environ, call.status, call.started)

    def direct(
        self,
        answer: Direct,
        method: str,
        path: str,
        query: str,
        header,
        body: bytes,
        client: str,
        defer: Callable[[], Completion] | None = None,
    ):
        """``answer(method, path, query, header, body, can_defer)`` (``Listen.direct``),
        counted and logged like a request through the wrapper: the answer to send, None if it
        gives none or once refusing (the application's way then answers), or ``DEFERRED``: it
        answers later, through ``defer()`` (the server's completion for this request, asked
        for before this returns), and is counted in flight until then."""
        with self._lock:
            if self.refusing:
                return None
            self.in_flight += 1
        started = time.monotonic()
        try:
            result = answer(method, path, query, header, body, defer is not None)
        except BaseException:  # the server answers 500; the line says it was not answered here
            self._finished(client, method, path, "-", started)
            raise
        if result is None:
            with self._lock:
                self.in_flight -= 1
            return None
        if type(result) is tuple:
            self._finished(client, method, path, str(result[0]), started)
            return result
        call = _DirectCall(self, client, method, path, started)
        try:
            call.completion = defer()
            result.start(call)
        except BaseException:
            # A Later must answer its errors through the completion; one that raised instead
            # is counted out here, and a later finish of it is ignored.
            if not call.done:
                call.done = True
                self._finished(client, method, path, "-", started)
            raise
        return DEFERRED

    def _done(self, environ: dict[str, Any], status: str, started: float) -> None:
        self._finished(
            environ.get("REMOTE_ADDR", "-"),
            environ.get("REQUEST_METHOD", "-"),
            environ.get("PATH_INFO", "-"),
            status,
            started,
        )

    def _finished(self, remote: str, method: str, path: str, status: str, started: float) -> None:
        """A request ends: it is counted out and gets its access-log line."""
        with self._lock:
            self.in_flight -= 1
        if self.access is not None:
            self.access.add(
                remote, method, path, status.split(" ", 1)[0], (time.monotonic() - started) * 1000
            )

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
        self.completion = self.server_defer()
        return self

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.done:  # once: a second finish would count the request out twice
            return
        self.done = True
        try:
            self.completion.finish(status, headers, body)
        finally:
            self.wrapper._done(self.environ, status, self.started)


INTERNAL_ERROR = (
    "500 Internal Server Error",
    [("Content-Type", "text/plain"), ("Content-Length", "15")],
    b"internal error\n",
)


def _ignore(data: bytes) -> None:
    pass


class _DirectCall:
    """A request answered through :meth:`ServingWrapper.direct` later: finishing it also ends
    the request for the wrapper (in-flight count, access log)."""

    __slots__ = ("client", "completion", "done", "method", "path", "started", "wrapper")

    def __init__(self, wrapper, client: str, method: str, path: str, started: float):
        self.wrapper = wrapper
        self.client = client
        self.method = method
        self.path = path
        self.started = started
        self.completion: Completion | None = None
        self.done = False

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the answer (once: a second finish is ignored); never raises, so a write
        answered at once (refused before it was queued) is never answered twice."""
        if self.done:
            return
        self.done = True
        try:
            self.completion.finish(status, headers, body)
        except Exception:  # the client may be gone; the request ends all the same
            log.exception("sending the answer to %s %s failed", self.method, self.path)
        finally:
            self.wrapper._finished(self.client, self.method, self.path, status, self.started)


#: Responses up to this size go out with their headers in one piece (one send, one segment).
ONE_WRITE_LIMIT = 64 * 1024


def _channel_class(body_check: BodyCheck | None = None):
    """waitress's channel, with four changes.

    One piece: a task that hands the header and a small body to the socket buffer in one call.
    waitress appends them in two calls, and its I/O thread, woken by any other connection in
    between, often sends the header alone: two sends and two segments per response, which
    cost a third of a small GET's throughput under load.

    Inline: a request the dispatcher marked (see :class:`_InlineDispatcher`) is served right
    here in the I/O thread, once ``received`` has parsed it and let go of the channel's lock.

    Deferred: a request served inline may be answered later (``environ[DEFER]``, see
    :mod:`distribkv.http.api`). The I/O thread then goes on with other connections; this one
    reads nothing more until the answer is sent, so answers stay in request order. Whoever
    finishes the answer hands it to the I/O thread (:class:`_DeferredAnswer`), which writes it
    through the request's task (the same headers as any other answer) and sends it.

    Bodies: a request that waits for a ``100 Continue`` and that ``body_check`` refuses by its
    Content-Length is answered at once, before its body is sent, and every error waitress
    answers itself (a malformed request, a body over the limit) has the node's JSON form."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import ErrorTask, WSGITask
    from waitress.utilities import Error, RequestEntityTooLarge

    class NodeError(Error):
        def __init__(self, code: int, error: str, detail: str):
            super().__init__(detail)
            self.code, self.error_name = code, error
            self.reason = http.HTTPStatus(code).phrase

        def to_response(self, ident=None):
            status, headers, body = error_answer(self.code, self.error_name, self.body)
            return f"{status} {self.reason}", headers, body

    class NodeParser(HTTPRequestParser):
        def received(self, data):
            headers_were_in = self.headers_finished
            consumed = super().received(data)
            if self.headers_finished and not headers_were_in:
                error = self.error
                # Only a client that waits for a 100 Continue is answered before its body: one
                # that is sending it would find the connection closed under it (a reset, and no
                # answer), so its body is read and the application answers. A body over
                # waitress's own limit is refused anyway: the application's limit names it.
                if (
                    body_check is not None
                    and self.content_length > 0
                    and (
                        (error is None and self.expect_continue)
                        or isinstance(error, RequestEntityTooLarge)
                    )
                ):
                    refusal = body_check(self.command, self.path, self.content_length)
                    if refusal is not None:
                        self.error = NodeError(*refusal)
                        self.completed = True
                if self.error is not None:
                    self.expect_continue = False  # nothing is to be sent: no 100 Continue
            return consumed

    class NodeErrorTask(ErrorTask):
        """Every error waitress answers itself, in the node's JSON form."""

        def execute(self):
            request = self.request
            error = request.error
            if not isinstance(error, NodeError):
                if isinstance(error, RequestEntityTooLarge):
                    length = None if request.chunked else request.content_length
                    limit = self.channel.server.adj.max_request_body_size - 1
                    request.error = NodeError(*body_too_large(length, limit))
                else:
                    request.error = NodeError(error.code, error.reason.lower(), str(error.body))
            super().execute()

    class NodeTask(WSGITask):
        completion: _DeferredAnswer | None = None
        answering = False  # writing the deferred answer (the application's own is ignored)

        def get_environment(self):
            environ = super().get_environment()
            if self.channel.serving_inline:  # only the I/O thread may leave a request unanswered
                environ[DEFER] = self.defer
            return environ

        def defer(self) -> _DeferredAnswer:
            self.channel.awaiting = True
            self.completion = _DeferredAnswer(self)
            return self.completion

        def execute(self):
            try:
                super().execute()
            except Exception:
                if self.completion is None:
                    raise  # waitress answers 500
                # Deferred: the answer that follows is the only one the client may get.
                log.exception(
                    "serving %s %s failed after deferring it",
                    self.request.command,
                    self.request.path,
                )

        def finish(self):
            if self.completion is None:  # a deferred answer is written when it is finished
                super().finish()

        def write(self, data):
            if self.completion is not None and not self.answering:
                return  # what the application writes for a deferred request is ignored
            if (
                self.complete
                and not self.wrote_header
                and data
                and len(data) <= ONE_WRITE_LIMIT
                and self.has_body
                and not self.chunked_response
                and self.content_length is not None
                and len(data) <= self.content_length - self.content_bytes_written
            ):
                header = self.build_response_header()
                self.wrote_header = True
                self.content_bytes_written += len(data)
                self.channel.write_soon(header + data)
                return
            super().write(data)

        def answer(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
            """Write the deferred answer (in the I/O thread): the node's own answers are well
            formed and carry a Content-Length, so start_response's checks are not needed."""
            self.answering = True
            self.status = status
            self.complete = True
            self.response_headers = list(headers)
            self.content_length = None
            for name, value in headers:
                if name.lower() == "content-length":
                    self.content_length = int(value)
            if body:
                self.write(body)
            super().finish()

    class InlineChannel(HTTPChannel):
        task_class = NodeTask
        error_task_class = NodeErrorTask
        parser_class = NodeParser
        inline_pending = False
        serving_inline = False  # the I/O thread is serving this channel's request itself
        awaiting = False  # a deferred answer is still to be written: read nothing more
        continue_held = False  # a 100 Continue waits for that answer

        def readable(self):
            return not self.awaiting and super().readable()

        def send_continue(self):
            if self.awaiting:  # it would go out before the answer that is still to come
                self.continue_held = True
                return
            super().send_continue()

        def received(self, data):
            result = super().received(data)
            while self.inline_pending:
                self.inline_pending = False
                # Served here only while nothing can make the I/O thread wait for itself:
                # waitress's service() blocks on a full output buffer when more requests are
                # queued behind this one, and only the I/O thread empties that buffer.
                if self.connected and len(self.requests) == 1 and not self.total_outbufs_len:
                    self.serving_inline = True
                    try:
                        self.service()
                    finally:
                        self.serving_inline = False
                elif self.requests:
                    self.server.task_dispatcher.dispatch(self)
            return result

        def send_deferred(self, task: NodeTask, answer: tuple[str, list, bytes]) -> None:
            """Write a deferred answer and read the next request (in the I/O thread, which
            sends it next)."""
            try:
                if self.connected:  # else the client is gone: nothing to send it
                    task.answer(*answer)
            except Exception:  # the connection goes; the node goes on
                if self.connected:
                    log.exception(
                        "sending the answer to %s %s failed",
                        task.request.command,
                        task.request.path,
                    )
                task.close_on_finish = True
            if task.close_on_finish:
                with self.requests_lock:
                    self.close_when_flushed = True
            self.last_activity = time.time()
            self.awaiting = False
            if self.continue_held:
                self.continue_held = False
                if self.connected and not self.close_when_flushed:
                    self.send_continue()

    return InlineChannel


class _DeferredAnswer:
    """The completion of a request that waitress serves inline and the application defers.
    ``finish`` (any thread) hands the answer to the I/O thread, which alone touches the
    request's channel and task: the one waitress hands it to, after it served the request."""

    __slots__ = ("task",)

    def __init__(self, task):
        self.task = task

    def finish(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        # Once: waitress always serves the node through the serving wrapper, whose call
        # ignores a second finish.
        self.task.channel.server.deferred_answers.add(self.task, (status, headers, body))


def _answer_pipe_class():
    from waitress import wasyncore

    class AnswerPipe(wasyncore.file_dispatcher):
        """Deferred answers on their way to waitress's I/O thread: a queue, and a pipe that
        wakes the I/O thread when the queue stops being empty (one wake for a whole group of
        answers). Not waitress's trigger: that runs its callbacks holding a lock that a
        signal handler in the same thread may want."""

        def __init__(self, map):
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)
            super().__init__(self._read_fd, map=map)
            self._lock = threading.Lock()
            self._queued: list = []
            self._closed = False

        def readable(self):
            return True

        def writable(self):
            return False

        def handle_connect(self):
            pass

        def add(self, task, answer) -> None:
            with self._lock:
                if self._closed:  # the server has closed its connections: nothing to send
                    return
                self._queued.append((task, answer))
                if len(self._queued) == 1:
                    try:
                        os.write(self._write_fd, b"x")
                    except BlockingIOError:  # the pipe is full: the I/O thread is woken
                        pass

        @property
        def pending(self) -> bool:
            return bool(self._queued)

        def handle_read(self):
            try:
                self.recv(4096)
            except OSError:
                pass
            with self._lock:
                queued, self._queued = self._queued, []
            for task, answer in queued:
                task.channel.send_deferred(task, answer)

        def handle_close(self):
            self.close()

        def close(self):
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                self._queued = []
                os.close(self._write_fd)
                os.close(self._read_fd)
            super().close()

    return AnswerPipe


class _InlineDispatcher:
    """waitress's task dispatcher, except for the requests ``inline`` names: when the I/O
    thread hands over a channel whose only queued request is one of those, the channel is
    marked to serve it itself. That saves the handover to a worker (a condition wait and a
    thread switch) and leaves the worker threads idle, so nothing contends for the GIL while a
    read runs. Every other request goes to the worker threads as usual."""

    def __init__(self, inline: Callable[[str, str, str], bool], threads: int):
        from waitress.task import ThreadedTaskDispatcher

        self.inline = inline
        self.io_thread: int | None = None  # set by run(), in the I/O thread
        self.workers = ThreadedTaskDispatcher()
        self.workers.set_thread_count(threads)

    def add_task(self, channel) -> None:
        if threading.get_ident() == self.io_thread and len(channel.requests) == 1:
            request = channel.requests[0]
            if not request.error and self.inline(request.command, request.path, request.query):
                channel.inline_pending = True
                return
        self.workers.add_task(channel)

    def dispatch(self, channel) -> None:
        self.workers.add_task(channel)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        return self.workers.shutdown(cancel_pending=cancel_pending, timeout=timeout)


class WaitressHandle(ServerHandle):
    def __init__(self, app: Callable[..., Any], listen: Listen):
        import waitress

        self.listen = listen
        self.wrapper = app if isinstance(app, ServingWrapper) else ServingWrapper(app)
        self.drain_timeout = float(listen.settings.get("drain_timeout", 10.0))
        self._stopping = threading.Event()
        # waitress warns "Task queue depth is N" for every request that waits for a thread:
        # under load, thousands of lines a second, each costing more than a GET. The queue is
        # bounded by connection_limit; errors still get through.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self.dispatcher = _InlineDispatcher(listen.inline or _never, listen.threads)
        self.server = waitress.create_server(
            self.wrapper,
            host=listen.host,
            port=listen.port,
            threads=listen.threads,
            connection_limit=listen.connection_limit,
            channel_timeout=listen.channel_timeout,
            # waitress refuses a body of its max_request_body_size itself: one byte more, so
            # that the limit is the one given.
            max_request_body_size=listen.max_request_body_size + 1,
            cleanup_interval=min(30, max(1, int(listen.channel_timeout))),
            ident="distribkv",
            clear_untrusted_proxy_headers=True,
            expose_tracebacks=False,
            _dispatcher=self.dispatcher,
        )
        self.server.channel_class = _channel_class(listen.body_check)
        self.server.deferred_answers = _answer_pipe_class()(self.server._map)
        self._maintenance = self.server.maintenance
        self.server.maintenance = self._keep_awaiting_channels
        # A channel's service() wakes the I/O thread when it is done; served inline, the I/O
        # thread is awake already (and looks at every channel again right after).
        self._pull_trigger = self.server.pull_trigger
        self.server.pull_trigger = self._wake_io_thread

    @property
    def port(self) -> int:
        return self.server.effective_port

    def _keep_awaiting_channels(self, now: float) -> None:
        """waitress's clean-up closes each channel with no request that has been quiet for
        ``channel_timeout``; a channel waiting for a deferred answer is not idle (its request
        is off waitress's list already)."""
        for channel in list(self.server.active_channels.values()):
            if getattr(channel, "awaiting", False):
                channel.last_activity = now
        self._maintenance(now)

    def _wake_io_thread(self) -> None:
        if threading.get_ident() != self.dispatcher.io_thread:
            self._pull_trigger()

    def run(self) -> None:
        log.info("serving on %s:%s", self.listen.host, self.port)
        self.dispatcher.io_thread = threading.get_ident()
        try:
            self.server.run()
            self.server.task_dispatcher.shutdown(cancel_pending=False, timeout=self.drain_timeout)
        finally:
            self.wrapper.close()
        log.info("stopped serving on %s:%s", self.listen.host, self.port)

    def stop(self) -> None:
        """Stop accepting and drain; safe from a signal handler in the serving thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Not from here: the serving thread runs the trigger's thunks holding the trigger's
        # lock, and a signal handler that waited for that lock in the same thread (as pulling
        # the trigger with a thunk does) would wait forever.
        threading.Thread(target=self._drain, name="distribkv-drain", daemon=True).start()

    def _close_listener(self) -> None:
        # Runs in the serving thread: the listening socket goes, open connections stay.
        import waitress.wasyncore as wasyncore

        if self.server.accepting:
            wasyncore.dispatcher.close(self.server)

    def _busy(self) -> bool:
        if self.wrapper.in_flight:
            return True
        if self.server.deferred_answers.pending:
            return True
        for channel in list(self.server._map.values()):
            if (
                getattr(channel, "requests", None)
                or getattr(channel, "total_outbufs_len", 0)
                or getattr(channel, "awaiting", False)  # its answer is on its way
            ):
                return True
        return False

    def _drain(self) -> None:
        try:
            try:
                self.server.trigger.pull_trigger(self._close_listener)
            except OSError:  # the serving loop has ended: nothing to drain
                return
            self._wait_idle()
        finally:
            # Whatever happened while waiting, the serving loop must end.
            try:
                self.server.trigger.pull_trigger(self._close_everything)
            except OSError:
                log.debug("the serving loop had already ended", exc_info=True)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.02)
        if self._busy():
            log.warning("requests still running after %.1fs; closing anyway", self.drain_timeout)

    def _close_everything(self) -> None:
        # Runs in the serving thread: with the map empty, waitress's loop returns.
        for dispatcher in list(self.server._map.values()):
            if dispatcher is self.server.trigger:
                continue
            try:
                dispatcher.handle_close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)
        self.server.trigger.close()


def _never(method: str, path: str, query: str) -> bool:
    return False


SPEC = ServerSpec(
    name="waitress",
    create=WaitressHandle,
    description="waitress: pure-Python threaded WSGI server (explicit bind, limits, drain,"
    " deferred answers)",
    deferred=True,
)


@hookimpl
def distribkv_http_servers() -> list[ServerSpec]:
    return [SPEC]
