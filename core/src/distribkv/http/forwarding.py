"""The forwarding engine: requests sent on to their owners without holding a thread.

A node with ``routing = "proxy"`` forwards a request for another shard's key to that shard's
leader. Waiting for the owner on a server thread would hold that thread for a whole round trip
(and a hung owner would hold every thread until ``forward_timeout``); so a request that the
server lets the node answer later (``Listen.direct``'s ``defer``, ``environ[DEFER]``) is handed
to this engine instead, and the server thread goes on with the next request.

One thread runs every forwarded exchange with non-blocking sockets (:mod:`selectors`):

- per owner address, keep-alive connections that stay open and are reused, each carrying one
  exchange at a time (no pipelining: an owner that defers a write answers a connection's
  requests one by one, so one connection would let only one write per group commit through),
  at most :data:`CONNECTIONS_PER_OWNER` of them, and at most :data:`WAITING_PER_OWNER` requests
  waiting for one (beyond that, a request fails at once as "busy");
- the request goes out as bytes built once, the owner's answer comes back as its status, its
  headers and its body bytes, unchanged;
- every exchange has a deadline (``forward_timeout``), waiting for a connection included: past
  it the exchange fails as timed out and its connection is closed (an answer that arrives late
  must not be taken for the next request's);
- a pooled connection that the owner closed while it was idle is noticed as it closes (it is
  watched while idle), and an exchange that finds its connection closed before any byte of the
  answer is tried once more on a new connection, as :class:`distribkv.httpclient.HttpClient`
  does.

An exchange ends with ``done(response, None)`` or ``done(None, error)`` (a
:class:`~distribkv.httpclient.RequestFailed`), called exactly once: in the engine's thread,
after it let go of its lock (or in the submitting thread, for a request submitted once the
engine is closed).
TLS is not spoken here: a node with ``[tls]`` forwards through the blocking client.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from distribkv.httpclient import RequestFailed, Response, split_address

log = logging.getLogger(__name__)

__all__ = [
    "CONNECTIONS_PER_OWNER",
    "WAITING_PER_OWNER",
    "Done",
    "ForwardingEngine",
    "OwnerBusy",
]

#: Connections open to one owner at most (each carries one exchange at a time).
CONNECTIONS_PER_OWNER = 64
#: Requests waiting for a connection to one owner at most; beyond, they fail at once.
WAITING_PER_OWNER = 4096
#: The largest answer head read from an owner.
MAX_HEAD = 64 * 1024
#: Bytes asked of a socket per read.
READ_SIZE = 256 * 1024

#: ``done(response, error)``: exactly one of them is None.
Done = Callable[[Response | None, RequestFailed | None], None]

_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EAGAIN))


class OwnerBusy(RequestFailed):
    """Too many requests wait for one owner's connections: this one was not sent."""


class _Exchange:
    """One forwarded request: its bytes, where it goes, when it is late, who is told."""

    __slots__ = ("address", "connection", "data", "deadline", "done", "ended", "retried", "what")

    def __init__(self, address: str, data: bytes, deadline: float, done: Done, what: str):
        self.connection: _Connection | None = None  # the one carrying it now
        self.address = address
        self.data = data
        self.deadline = deadline
        self.done = done
        self.what = what
        self.ended = False
        self.retried = False


class _Owner:
    """The connections to one owner address, and the exchanges waiting for one."""

    __slots__ = ("address", "idle", "open", "waiting")

    def __init__(self, address: str):
        self.address = address
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiting: collections.deque[_Exchange] = collections.deque()


class _Connection:
    """A keep-alive connection to an owner, and the answer being read from it."""

    __slots__ = (
        "body_until_close",
        "buffer",
        "chunked",
        "close_after",
        "connecting",
        "exchange",
        "fresh",
        "head",
        "length",
        "owner",
        "pending",
        "sock",
        "status",
        "writing",
    )

    def __init__(self, owner: _Owner, sock: socket.socket):
        self.owner = owner
        self.sock = sock
        self.connecting = True
        self.fresh = True  # has carried no exchange yet
        self.exchange: _Exchange | None = None
        self.pending = memoryview(b"")  # request bytes not sent yet
        self.writing = False  # registered for EVENT_WRITE too
        self.buffer = bytearray()
        self._reset()

    def _reset(self) -> None:
        self.head: list[tuple[str, str]] | None = None
        self.status = 0
        self.length = -1
        self.chunked = False
        self.body_until_close = False
        self.close_after = False


class _Malformed(Exception):
    pass


class ForwardingEngine:
    """The thread and sockets of every forwarded exchange (see the module's docstring)."""

    def __init__(
        self,
        timeout: float,
        *,
        source_host: str | None = None,
        per_owner: int = CONNECTIONS_PER_OWNER,
        waiting: int = WAITING_PER_OWNER,
        name: str = "distribkv-forwarding",
    ):
        self.timeout = timeout
        self.source = source_host
        self.per_owner = max(1, per_owner)
        self.waiting_limit = max(0, waiting)
        self._selector = selectors.DefaultSelector()
        self._owners: dict[str, _Owner] = {}
        self._incoming: collections.deque[_Exchange] = collections.deque()
        # Every exchange in the order it was submitted, which is the order of its deadline.
        self._deadlines: collections.deque[_Exchange] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        # The engine's state is shared with the submitting threads, which send a request on
        # an idle connection themselves: the engine holds the lock except while it waits.
        self._lock = threading.Lock()
        self._sleeping = False
        self._sleep_until = math.inf  # when a sleeping engine wakes by itself
        self._woken = False
        #: Connections whose request a submitting thread could not send whole.
        self._unsent: list[_Connection] = []
        #: Exchanges that ended, to be told once the lock is released: telling one hands the
        #: answer to the server, which takes long enough that submitting threads would queue
        #: on the lock meanwhile (and on one core, each such wait is a context switch).
        self._ended: list[tuple[Done, Response | None, RequestFailed | None]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- from any thread ------------------------------------------------------------------

    def submit(self, address: str, data: bytes, done: Done, what: str) -> None:
        """Send ``data`` (a whole HTTP/1.1 request) to ``address`` and call ``done`` with the
        answer or the failure, in the engine's thread. ``what`` names the request in errors.

        On an idle connection to the owner the request is sent right here, and the engine only
        reads the answer: no hand-over to the engine's thread on the way out."""
        exchange = _Exchange(address, data, time.monotonic() + self.timeout, done, what)
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._deadlines.append(exchange)
                owner = self._owners.get(address)
                if owner is not None and owner.idle:
                    connection = owner.idle.pop()
                    connection.exchange = exchange
                    exchange.connection = connection
                    try:
                        sent = connection.sock.send(data)
                    except OSError:  # the engine sends it, and sees what went wrong
                        sent = 0
                    if sent < len(data):
                        connection.pending = memoryview(data)[sent:]
                        self._unsent.append(connection)
                        wake = self._sleeping
                    else:
                        # A sleeping engine with no earlier deadline must wake at this one.
                        wake = self._sleeping and exchange.deadline < self._sleep_until
                else:
                    self._incoming.append(exchange)
                    wake = self._sleeping
                if wake and not self._woken:
                    self._woken = True
                    try:
                        os.write(self._wake_write, b"x")
                    except BlockingIOError:  # the pipe is full: the engine is being woken
                        pass
        if closed:  # never seen by the engine: told here, in the submitting thread
            exchange.ended = True
            done(None, self._failure(exchange, "the node is stopping", sent=False))

    def close(self) -> None:
        """Stop the thread; exchanges not answered yet fail (the node is stopping)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)

    # --- the engine's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                self._loop_once()
        except BaseException:
            log.exception("the forwarding engine failed; forwarded requests now fail")
            with self._lock:
                self._closed = True
        finally:
            with self._lock:
                self._shut()
            self._tell()

    def _loop_once(self) -> None:
        with self._lock:
            timeout: float | None = None
            self._sleep_until = math.inf
            if self._incoming or self._unsent:
                timeout = 0.0
            elif self._deadlines:
                self._sleep_until = self._deadlines[0].deadline
                timeout = max(0.0, self._sleep_until - time.monotonic())
            self._sleeping = True
        events = self._selector.select(timeout)
        with self._lock:
            self._sleeping = False
            self._handle(events)
        self._tell()

    def _handle(self, events) -> None:
        for key, mask in events:
            connection = key.data
            if connection is None:
                self._woken = False
                try:
                    while os.read(self._wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if mask & selectors.EVENT_WRITE:
                self._writable(connection)
            if mask & selectors.EVENT_READ and connection.sock is not None:
                self._readable(connection)
        unsent = self._unsent
        while unsent:
            connection = unsent.pop()
            if connection.sock is not None and connection.exchange is not None:
                self._flush(connection)
        incoming = self._incoming
        while incoming:
            self._start(incoming.popleft())
        self._expire()

    def _start(self, exchange: _Exchange) -> None:
        owner = self._owners.get(exchange.address)
        if owner is None:
            owner = self._owners[exchange.address] = _Owner(exchange.address)
        if owner.idle:
            self._send(owner.idle.pop(), exchange)
        elif owner.open < self.per_owner:
            self._connect(owner, exchange)
        elif len(owner.waiting) < self.waiting_limit:
            owner.waiting.append(exchange)
        else:
            self._end(
                exchange,
                None,
                OwnerBusy(
                    f"{exchange.what}: {len(owner.waiting)} requests wait for the owner already",
                    address=owner.address,
                    sent=False,
                ),
            )

    def _connect(self, owner: _Owner, exchange: _Exchange) -> None:
        host, port = split_address(owner.address)
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            self._end(exchange, None, self._failure(exchange, str(exc), sent=False))
            return
        sock.setblocking(False)
        connection = _Connection(owner, sock)
        owner.open += 1
        connection.exchange = exchange
        exchange.connection = connection
        connection.pending = memoryview(exchange.data)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.source is not None:
                sock.bind((self.source, 0))
            code = sock.connect_ex((host, port))
        except OSError as exc:
            self._close(connection)
            self._end(exchange, None, self._failure(exchange, _reason(exc), sent=False))
            return
        if code not in _IN_PROGRESS and code != 0:
            self._close(connection)
            reason = os.strerror(code)
            self._end(exchange, None, self._failure(exchange, reason, sent=False))
            return
        connection.writing = True
        self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)

    def _send(self, connection: _Connection, exchange: _Exchange) -> None:
        connection.exchange = exchange
        exchange.connection = connection
        connection.pending = memoryview(exchange.data)
        self._flush(connection)

    def _flush(self, connection: _Connection) -> None:
        """Send what is left of the request; watch for room to send the rest, if any."""
        sock = connection.sock
        pending = connection.pending
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken(connection, _reason(exc))
            return
        connection.pending = pending = pending[sent:]
        want = bool(pending)
        if want != connection.writing:
            connection.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._selector.modify(sock, events, connection)

    def _writable(self, connection: _Connection) -> None:
        if connection.connecting:
            code = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                exchange = connection.exchange
                self._close(connection)
                if exchange is not None:
                    failure = self._failure(exchange, os.strerror(code), sent=False)
                    self._end(exchange, None, failure)
                self._next_waiting(connection.owner)
                return
            connection.connecting = False
        if connection.pending:
            self._flush(connection)
        elif connection.writing:
            connection.writing = False
            self._selector.modify(connection.sock, selectors.EVENT_READ, connection)

    def _readable(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(connection, _reason(exc))
            return
        exchange = connection.exchange
        if exchange is None:
            # An idle connection has nothing to say: the owner closed it, or it is out of step.
            self._close(connection)
            self._next_waiting(connection.owner)
            return
        if not data:
            if connection.body_until_close and connection.head is not None:
                self._answer(connection, bytes(connection.buffer))
                return
            self._broken(connection, "the connection was closed without an answer")
            return
        buffer = connection.buffer
        buffer += data
        try:
            self._parse(connection)
        except _Malformed as exc:
            self._close(connection)
            self._end(exchange, None, self._failure(exchange, f"a malformed answer: {exc}"))
            self._next_waiting(connection.owner)

    def _parse(self, connection: _Connection) -> None:
        """Take the answer from the bytes read so far, once it is whole."""
        buffer = connection.buffer
        while connection.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise _Malformed("its head is too large")
                return
            head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            del buffer[: end + 4]
            parts = head[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise _Malformed(f"status line {head[0][:80]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            headers = []
            for line in head[1:]:
                name, colon, value = line.partition(":")
                if not colon:
                    raise _Malformed(f"header line {line[:80]!r}")
                value = value.strip()
                lower = name.lower()
                if lower == "content-length":
                    if not value.isdigit():
                        raise _Malformed(f"Content-Length {value[:40]!r}")
                    connection.length = int(value)
                elif lower == "transfer-encoding":
                    connection.chunked = "chunked" in value.lower()
                elif lower == "connection" and "close" in value.lower():
                    connection.close_after = True
                headers.append((name, value))
            if parts[0] == "HTTP/1.0" and not any(
                n.lower() == "connection" and "keep-alive" in v.lower() for n, v in headers
            ):
                connection.close_after = True
            connection.status = status
            connection.head = headers
            if connection.chunked:
                connection.length = -1
            elif connection.length < 0:
                connection.body_until_close = status not in (204, 304)
                if not connection.body_until_close:
                    connection.length = 0
                connection.close_after = True
        if connection.chunked:
            body = _dechunk(buffer)
            if body is None:
                return
            self._answer(connection, body)
            return
        if connection.body_until_close:
            return  # the end of the connection ends the body
        length = connection.length
        if len(buffer) < length:
            return
        body = bytes(buffer[:length])
        del buffer[:length]
        self._answer(connection, body)

    def _answer(self, connection: _Connection, body: bytes) -> None:
        exchange = connection.exchange
        assert exchange is not None and connection.head is not None
        response = Response(connection.status, connection.head, body)
        reuse = not connection.close_after and not connection.buffer
        connection.exchange = None
        connection.fresh = False
        connection._reset()
        owner = connection.owner
        if reuse:
            owner.idle.append(connection)
        else:
            self._close(connection)
        self._end(exchange, response, None)
        self._next_waiting(owner)

    def _next_waiting(self, owner: _Owner) -> None:
        """Give a free connection (or room for one) to the first live waiting exchange."""
        waiting = owner.waiting
        while waiting and (owner.idle or owner.open < self.per_owner):
            exchange = waiting.popleft()
            if exchange.ended:
                continue
            if owner.idle:
                self._send(owner.idle.pop(), exchange)
            else:
                self._connect(owner, exchange)

    def _broken(self, connection: _Connection, reason: str) -> None:
        """The connection failed: its exchange is tried once more on a new connection if the
        connection was an idle one the owner closed and nothing of the answer came back."""
        exchange = connection.exchange
        retry = (
            exchange is not None
            and not connection.fresh
            and not exchange.retried
            and connection.head is None
            and not connection.buffer
        )
        owner = connection.owner
        sent = not connection.connecting
        self._close(connection)
        if exchange is not None:
            if retry:
                exchange.retried = True
                self._connect(owner, exchange)
            else:
                self._end(exchange, None, self._failure(exchange, reason, sent=sent))
        self._next_waiting(owner)

    def _close(self, connection: _Connection) -> None:
        sock = connection.sock
        if sock is None:
            return
        connection.sock = None  # type: ignore[assignment]
        owner = connection.owner
        owner.open -= 1
        if connection.exchange is None:
            try:
                owner.idle.remove(connection)
            except ValueError:
                pass
        else:
            connection.exchange.connection = None
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _expire(self) -> None:
        deadlines = self._deadlines
        if not deadlines:
            return
        now = time.monotonic()
        while deadlines and (deadlines[0].ended or deadlines[0].deadline <= now):
            exchange = deadlines.popleft()
            if exchange.ended:
                continue
            owner = self._owners.get(exchange.address)
            # Its connection, if it has one, is closed: a late answer would be taken for the
            # next exchange's.
            late = exchange.connection
            if late is not None:
                connecting = late.connecting
                late.exchange = None
                self._close(late)
                reason = "timed out connecting" if connecting else "timed out"
                sent = not connecting
            else:
                reason, sent = "timed out waiting for a connection", False
            failure = self._failure(exchange, reason, sent=sent, timed_out=True)
            self._end(exchange, None, failure)
            if owner is not None:
                self._next_waiting(owner)

    def _failure(
        self, exchange: _Exchange, reason: str, *, sent: bool = True, timed_out: bool = False
    ) -> RequestFailed:
        return RequestFailed(
            f"{exchange.what}: {reason}", address=exchange.address, sent=sent, timed_out=timed_out
        )

    def _end(
        self, exchange: _Exchange, response: Response | None, error: RequestFailed | None
    ) -> None:
        if exchange.ended:
            return
        exchange.ended = True
        exchange.data = b""
        exchange.connection = None
        self._ended.append((exchange.done, response, error))

    def _tell(self) -> None:
        """Tell every exchange that ended, in the engine's thread, without holding the lock."""
        with self._lock:
            ended, self._ended = self._ended, []
        for done, response, error in ended:
            try:
                done(response, error)
            except Exception:  # one request's failure must not stop the others
                log.exception("answering a forwarded request failed")

    def _shut(self) -> None:
        """Fail whatever is left, and close every socket (in the engine's thread)."""
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Connection):
                self._close(key.data)
        for owner in self._owners.values():
            owner.idle.clear()
        while True:
            leftovers = [*self._incoming, *self._deadlines]
            self._incoming.clear()
            self._deadlines.clear()
            if not leftovers:
                break
            for exchange in leftovers:
                self._end(exchange, None, self._failure(exchange, "the node is stopping"))
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


def _dechunk(buffer: bytearray) -> bytes | None:
    """The body of a whole chunked answer at the start of ``buffer`` (taken out of it), or
    None while it is incomplete."""
    body = bytearray()
    at = 0
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Malformed(f"chunk size {size_text[:20]!r}") from None
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            if trailer_end < 0:
                return None
            del buffer[: trailer_end + 4]
            return bytes(body)
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
