"""Slow clients on waitress: deadlines for a request's headers and body, and room for new
connections at the connection limit.

waitress itself closes a connection only when it has been quiet for ``channel_timeout``, and
stops accepting at ``connection_limit``: a client that sends a header byte every few seconds
(slowloris) is never quiet, and a few hundred of them keep every other client out. Here:

- a request whose headers are not in ``header_timeout`` after its first byte is seen, or whose
  body arrives slower than ``min_body_rate`` after that grace, gets a 408 and its connection
  is closed (checked once a second, by the I/O thread, from a sweep over the connections: no
  cost per request);
- at the connection limit, the connection that has been idle the longest is closed to make
  room, or, when none is idle, the one stuck the longest in an unfinished request; a
  connection whose request is being served or answered, or that was accepted or active less
  than a quarter of a second ago, is never chosen. waitress's own behaviour (stop accepting, new
  connections wait in the backlog) is left for when no connection can be chosen.
"""

from __future__ import annotations

import logging
import time

from distribkv.http.api import Listen, body_deadline, error_answer, status_line

log = logging.getLogger(__name__)

__all__ = ["SlowClients"]

#: Seconds between two sweeps of the connections for deadlines.
SWEEP_INTERVAL = 1.0
#: Seconds a connection is left alone after it was accepted or last active before it may be
#: closed to make room (a new connection's request may not have been read yet).
FRESH = 0.25


def _late_answer(detail: str) -> bytes:
    status, headers, body = error_answer(408, "request timeout", detail)
    lines = [f"HTTP/1.1 {status_line(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class _Seen:
    """What a sweep saw of a connection's unfinished request: which one, in which phase
    (headers or body), and since when."""

    __slots__ = ("body", "request", "since")

    def __init__(self, request, body: bool, since: float):
        self.request, self.body, self.since = request, body, since


def _stamped(channel_class):
    class Stamped(channel_class):  # type: ignore[valid-type, misc]
        """A channel that knows when it was accepted."""

        def __init__(self, *args, **kwargs):
            self.accepted = time.monotonic()
            super().__init__(*args, **kwargs)

    return Stamped


class SlowClients:
    """Installed on a waitress server once its channel class is set: it takes over the
    server's ``readable()``, which waitress's I/O thread calls before each poll."""

    def __init__(self, server, listen: Listen, maintenance, log_answer=None):
        self.server = server
        self.log_answer = log_answer  # (remote, method, path, status): the access log
        server.channel_class = _stamped(server.channel_class)
        self.listen = listen
        self.maintenance = maintenance  # waitress's sweep for idle connections
        self.next_sweep = 0.0
        self.evicted = 0
        self.timed_out = 0
        self._full = False
        server.readable = self.readable

    def readable(self) -> bool:
        server = self.server
        now = time.monotonic()
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL
            self.maintenance(time.time())
            self.sweep(now)
        if not server.accepting:
            return False
        # The server's own dispatchers (itself, its trigger, the answer pipe) are in the map
        # too; a few more connections than the limit do no harm.
        if len(server.active_channels) < self.listen.connection_limit:
            self._note_full(False)
            return True
        if self.make_room():
            return True
        self._note_full(True)
        return False

    def _note_full(self, full: bool) -> None:
        if full and not self._full:
            log.warning(
                "%d connections, every one of them busy: not accepting more until one closes",
                len(self.server.active_channels),
            )
        self._full = full

    def make_room(self) -> bool:
        """Close the connection that has been idle the longest, else the one stuck the longest
        in an unfinished request; False when every connection is busy, or too new to judge."""
        idle = stuck = None
        idle_since = time.time() - FRESH  # waitress's clock, for last_activity
        stuck_since = time.monotonic() - FRESH  # for accepted
        for channel in self.server.active_channels.values():
            if (
                channel.requests
                or channel.total_outbufs_len
                or channel.will_close
                or channel.close_when_flushed
                or getattr(channel, "awaiting", False)
            ):
                continue
            if channel.request is None:
                if channel.last_activity < idle_since:
                    idle, idle_since = channel, channel.last_activity
            elif channel.accepted < stuck_since:
                stuck, stuck_since = channel, channel.accepted
        victim = idle if idle is not None else stuck
        if victim is None:
            return False
        self.evicted += 1
        log.debug("connection limit reached: closing %s to accept another", victim.addr)
        victim.handle_close()
        return True

    def sweep(self, now: float) -> None:
        listen = self.listen
        for channel in list(self.server.active_channels.values()):
            request = channel.request
            if request is None or channel.requests or channel.will_close:
                channel.slow_seen = None
                continue
            body = bool(request.headers_finished)
            seen = getattr(channel, "slow_seen", None)
            if seen is None or seen.request is not request or seen.body != body:
                channel.slow_seen = _Seen(request, body, now)
                continue
            if not body:
                if now - seen.since > listen.header_timeout:
                    self._time_out(
                        channel,
                        f"the request headers did not arrive within {listen.header_timeout:g}s",
                    )
                continue
            if request.chunked:
                receiver = request.body_rcv
                length = len(receiver.getbuf()) if receiver is not None else 0
            else:
                length = request.content_length
            if now > body_deadline(listen, seen.since, length):
                self._time_out(
                    channel,
                    f"the request body arrived slower than {listen.min_body_rate} bytes a second",
                )

    def _time_out(self, channel, detail: str) -> None:
        self.timed_out += 1
        log.debug("closing %s: %s", channel.addr, detail)
        if self.log_answer is not None:
            request = channel.request
            method = getattr(request, "command", None) or "-"
            path = getattr(request, "path", None) or "-"
            self.log_answer(str(channel.addr[0]), method, path, 408)
        channel.request = None
        channel.slow_seen = None
        try:
            channel.write_soon(_late_answer(detail))
        except Exception:  # noqa: BLE001 - the client is gone: nothing to tell it
            channel.will_close = True
            return
        channel.close_when_flushed = True
