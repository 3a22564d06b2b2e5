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
from distribkv.http.framing import Refusal, head_refusal, transfer_refusal

log = logging.getLogger(__name__)

__all__ = ["InlineDispatcher", "answer_pipe_class", "channel_class"]

#: Responses up to this size go out with their headers in one piece (one send, one segment).
ONE_WRITE_LIMIT = 64 * 1024
#: How much of a head that is still arriving is checked as it arrives (see ``NodeParser``).
PARTIAL_HEAD_CHECK = 8 * 1024
_TRANSFER_ENCODING = b"transfer-encoding:"


def channel_class(
    body_check: BodyCheck | None = None,
    log_own_answer: Callable[[str, str, str, int], None] | None = None,
):
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
    answers itself (a malformed request, a body over the limit) has the node's JSON form and
    an access-log line.

    Framing: every head is held to :mod:`distribkv.http.framing` (waitress takes HTTP/9.9, a
    NUL in a target, Content-Length next to Transfer-Encoding); a head still arriving is
    checked as it arrives, so an HTTP/0.9 request or a bare LF is answered at once instead of
    waiting for a blank line that never comes. A chunk larger than what is left of the body
    limit is refused when its size line arrives, and a body cut short by the client's end of
    input is answered 400 (the client may have closed only its sending side)."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser, ParsingError
    from waitress.task import ErrorTask, WSGITask
    from waitress.utilities import Error, InternalServerError, RequestEntityTooLarge

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
        completed: bool
        refusal: Refusal | None = None  # the framing check's, answered as it is

        def received(self, data):
            if not self.headers_finished and not self.completed:
                refused = self._check_partial_head(data)
                if refused:
                    return len(data)
            headers_were_in = self.headers_finished
            consumed = super().received(data)
            if self.refusal is not None:
                self.error = NodeError(*self.refusal)
                return len(data)  # what follows a refused head is not read as a request
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
                if self.error is not None or self.body_rcv is None:
                    # Nothing is to be sent (a refusal, or no body): no 100 Continue. waitress
                    # would send one to a request without a body, and then wait for a body
                    # that never comes instead of answering.
                    self.expect_continue = False
            if self.chunked and not self.completed:
                # A chunk announced larger than what is left of the limit: refused now, not
                # once that many bytes have arrived (if they ever do).
                left = self.adj.max_request_body_size - self.body_bytes_received
                if self.body_rcv.chunk_remainder >= left:
                    self.error = RequestEntityTooLarge("a chunk exceeds the body limit")
                    self.completed = True
            return consumed

        def _check_partial_head(self, data) -> bool:
            """Refuse a head still arriving for what no more bytes can mend; True if refused.
            Only its first bytes are looked at, so that a head trickling in costs a bounded
            check per piece; a complete head is checked whole by ``parse_header``."""
            head = self.header_plus
            if len(head) >= PARTIAL_HEAD_CHECK or b"\r\n\r\n" in head[-3:] + data:
                return False
            refusal = head_refusal((head + data)[:PARTIAL_HEAD_CHECK], complete=False)
            if refusal is None:
                return False
            self._refuse(refusal, head + data)
            self.error = NodeError(*refusal)
            self.completed = True
            return True

        def parse_header(self, header_plus):
            refusal = head_refusal(header_plus, complete=True) or _framing_refusal(header_plus)
            if refusal is not None:
                self._refuse(refusal, header_plus)
                raise ParsingError(refusal[2])  # waitress ends the request; received answers
            super().parse_header(header_plus)

        def _refuse(self, refusal: Refusal, head: bytes) -> None:
            self.refusal = refusal
            # For the access log, where the request line says it.
            parts = head.lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")
            if len(parts) == 3:
                self.command = parts[0].decode("latin-1")
                self.path = parts[1].split(b"?", 1)[0].decode("latin-1")

    class NodeErrorTask(ErrorTask):
        """Every error waitress answers itself, in the node's JSON form, as HTTP/1.1 (waitress
        answers HTTP/1.0 to a request whose version it has not read yet)."""

        def __init__(self, channel, request):
            super().__init__(channel, request)
            self.version = "1.1"

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
            # The application's own failure (a 500) is logged by the wrapper already.
            if log_own_answer is not None and not isinstance(error, InternalServerError):
                log_own_answer(
                    self.channel.addr[0] if self.channel.addr else "-",
                    getattr(request, "command", None) or "-",
                    getattr(request, "path", None) or "-",
                    request.error.code,
                )

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
        request: NodeParser | None  # waitress's own: the request being read

        def readable(self):
            return not self.awaiting and super().readable()

        def handle_read(self):
            request = self.request
            if request is None or not request.headers_finished or request.completed:
                super().handle_read()
                return
            # A body is on its way. waitress closes at once on an end of input; a client that
            # closed only its sending side with a body shorter than it announced is answered.
            try:
                data = self.socket.recv(self.adj.recv_bytes)
            except OSError:
                self.handle_close()
                return
            if data:
                self.last_activity = time.time()
                self.received(data)
                return
            if request.chunked:
                detail = "the connection ended inside the chunked body"
            else:
                detail = (
                    f"the connection ended after {request.body_bytes_received} of the body's"
                    f" {request.content_length} bytes"
                )
            request.error = NodeError(400, "body cut short", detail)
            request.completed = True
            with self.requests_lock:
                self.request = None
                self.requests.append(request)
                first = len(self.requests) == 1
            if first:
                self.server.add_task(self)

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


def _framing_refusal(head: bytes) -> Refusal | None:
    """Transfer-Encoding and Content-Length of a head whose request line is well formed."""
    lower = head.lower()
    if _TRANSFER_ENCODING not in lower:
        return None
    line_end = head.find(b"\r\n", len(head) - len(head.lstrip(b"\r\n")))
    version = head[line_end - 3 : line_end].decode("latin-1")
    codings = [
        line[len(_TRANSFER_ENCODING) :].decode("latin-1")
        for line in lower.split(b"\r\n")
        if line.startswith(_TRANSFER_ENCODING)
    ]
    return transfer_refusal(version, codings, b"\r\ncontent-length:" in lower)


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
