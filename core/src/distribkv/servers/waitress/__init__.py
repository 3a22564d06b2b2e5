"""The ``waitress`` server plugin: the node's application on waitress, pure-Python threads.

waitress is configured deliberately: it binds exactly the shard map's address (never its 0.0.0.0
default), with an explicit thread count, connection limit, accept backlog, channel timeout and
body limit; requests that trickle in are timed out, and at the connection limit the idle
connections make room (:mod:`distribkv.servers.waitress.slow`).
Shutdown is orderly: ``stop()`` closes the listening socket, lets in-flight requests finish and
flush (bounded by ``drain_timeout``), then closes every connection so ``run()`` returns.

What the node changes inside waitress (the channel, parser and tasks) is in
:mod:`distribkv.servers.waitress.channel`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from distribkv import hookimpl
from distribkv.http.api import Listen, ServerHandle, ServerSpec
from distribkv.http.forwarding import burst
from distribkv.http.wrapper import ServingWrapper
from distribkv.servers.waitress.channel import InlineDispatcher, answer_pipe_class, channel_class
from distribkv.servers.waitress.slow import SlowClients

log = logging.getLogger(__name__)

__all__ = ["TESTED_WAITRESS", "WaitressHandle"]

#: The waitress releases the node's subclasses were tested against (see ``channel``).
TESTED_WAITRESS = "3.0"


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
        self.dispatcher = InlineDispatcher(listen.inline or _never, listen.threads)
        self.server = waitress.create_server(
            self.wrapper,
            host=listen.host,
            port=listen.port,
            threads=listen.threads,
            connection_limit=listen.connection_limit,
            backlog=listen.backlog,
            channel_timeout=listen.channel_timeout,
            # poll(), not select(): select() cannot watch a file descriptor above 1023.
            asyncore_use_poll=True,
            # waitress refuses a body of its max_request_body_size itself: one byte more, so
            # that the limit is the one given.
            max_request_body_size=listen.max_request_body_size + 1,
            ident="distribkv",
            clear_untrusted_proxy_headers=True,
            expose_tracebacks=False,
            _dispatcher=self.dispatcher,
        )
        self.server.channel_class = channel_class(listen.body_check, self.wrapper.log_own_answer)
        self.server.deferred_answers = answer_pipe_class()(self.server._map)
        self._maintenance = self.server.maintenance
        # Deadlines for slow requests and room at the connection limit (see ``slow``); it runs
        # waitress's sweep for idle connections too.
        self.slow_clients = SlowClients(
            self.server, listen, self._keep_awaiting_channels, self.wrapper.log_own_answer
        )
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
            self._serve()
            self.server.task_dispatcher.shutdown(cancel_pending=False, timeout=self.drain_timeout)
        finally:
            self.wrapper.close()
        log.info("stopped serving on %s:%s", self.listen.host, self.port)

    def _serve(self) -> None:
        """waitress's loop (``BaseWSGIServer.run``), each pass of it a forwarding
        :data:`~distribkv.http.forwarding.burst`: the reads forwarded while the I/O thread
        serves the requests that one poll found go to their owners together after it."""
        from waitress.wasyncore import poll2

        server = self.server
        connections = server._map
        timeout = server.adj.asyncore_loop_timeout
        try:
            while connections:
                with burst:
                    poll2(timeout, connections)
        except (SystemExit, KeyboardInterrupt):
            server.task_dispatcher.shutdown()

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


@hookimpl
def distribkv_http_servers() -> list[ServerSpec]:
    return [
        ServerSpec(
            "waitress",
            WaitressHandle,
            "waitress: pure-Python threaded WSGI server (explicit bind, limits, drain,"
            " deferred answers)",
            deferred=True,
            inline=True,
        )
    ]
