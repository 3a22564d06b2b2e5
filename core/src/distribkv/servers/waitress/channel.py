"""waitress's internals, subclassed for the node: its channel, parser and tasks, the pipe
that carries deferred answers to its I/O thread, and the dispatcher that serves some requests
in that thread.

These classes build on waitress's private internals, which is why the core pins waitress to
the release they were written and tested against (``core/pyproject.toml``); a test fails with
a clear message when another release is installed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from distribkv.http.api import DEFER, BodyCheck, body_too_large, error_answer, status_line

log = logging.getLogger(__name__)

__all__ = ["InlineDispatcher", "answer_pipe_class", "channel_class"]

#: Responses up to this size go out with their headers in one piece (one send, one segment).
ONE_WRITE_LIMIT = 64 * 1024


def channel_class(body_check: BodyCheck | None = None):
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
            self.reason = status_line(code).split(" ", 1)[1]

        def to_response(self, ident=None):
            status, headers, body = error_answer(self.code, self.error_name, self.body)
            return status_line(status), headers, body

    class NodeParser(HTTPRequestParser):
        # waitress's own attributes, set by its parser.
        error: Error | None
        expect_continue: bool

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
        wrote_header: bool  # waitress's own
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


def answer_pipe_class():
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


class InlineDispatcher:
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
