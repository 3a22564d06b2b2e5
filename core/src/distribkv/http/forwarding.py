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

Reads of a single key (:meth:`ForwardingEngine.submit_read`) are sent together: per owner (and
per set of carried headers) one request of reads is in flight, and the reads that arrive
meanwhile wait and then go out in one request (``GET /forwarding/get?key=a&key=b``, at most
:data:`MAX_BATCH_READS` of them), which the owner answers with one msgpack list of values. A
read that arrives when none is in flight goes out at once, alone, so a lightly loaded node adds
no delay; under load the owner parses, routes, logs and answers one request for many reads, and
the forwarding node reads one answer. An owner slow to answer does not hold the reads for it
back for long: a read that comes once the newest request of reads has waited
:data:`READS_PATIENCE` seconds goes out at once in another, with those waiting, up to
:data:`READ_BATCHES_PER_OWNER` in flight (and the engine sends them too whenever it wakes). A
server
that serves many requests in one pass of its loop (waitress's I/O thread) wraps the pass in
:data:`burst`: the reads its thread submits meanwhile go out together at the end of it.

Each read keeps its own deadline: past it, it fails alone, and its request goes on for the
others (its connection is closed once none of them waits for it). An answer other than a 200
with a value for every read (the owner is not the leader of every key any more, the maps
disagree, a token is refused, the values are too large for one answer) sends each of its reads
again on its own, as a plain ``GET /get``, so that every read gets exactly the answer the owner
gives it; an owner without the endpoint (404, 405: an older version) gets plain reads for the
next :data:`PLAIN_FOR` seconds.

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

import msgpack

from distribkv.httpclient import RequestFailed, Response, split_address
from distribkv.protocol import FORWARDED_READS_PATH, MSGPACK

log = logging.getLogger(__name__)

__all__ = [
    "CONNECTIONS_PER_OWNER",
    "MAX_BATCH_READS",
    "PLAIN_FOR",
    "READS_PATIENCE",
    "READ_BATCHES_PER_OWNER",
    "WAITING_PER_OWNER",
    "Done",
    "ForwardingEngine",
    "OwnerBusy",
    "burst",
]

#: Connections open to one owner at most (each carries one exchange at a time).
CONNECTIONS_PER_OWNER = 64
#: Requests waiting for a connection to one owner at most; beyond, they fail at once.
WAITING_PER_OWNER = 4096
#: The largest answer head read from an owner.
MAX_HEAD = 64 * 1024
#: Bytes asked of a socket per read.
READ_SIZE = 256 * 1024
#: Requests of reads in flight to one owner at most (per set of carried headers), and how
#: long the newest must have waited before another goes out beside it.
READ_BATCHES_PER_OWNER = 8
READS_PATIENCE = 0.02
#: Seconds an owner that does not know the endpoint for many reads gets plain ones.
PLAIN_FOR = 60.0
#: Reads in one request at most, and the most bytes of their keys' query parameters in it.
MAX_BATCH_READS = 128
MAX_BATCH_QUERY = 8 * 1024
#: The owner's endpoint for many reads at once (see :meth:`ForwardingEngine.submit_read`).
READS_PATH = FORWARDED_READS_PATH.encode()

#: ``done(response, error)``: exactly one of them is None.
Done = Callable[[Response | None, RequestFailed | None], None]
#: The answer to a read, from the value the owner gave for it (None: not found).
ReadAnswer = Callable[[bytes | None], Response]

_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EAGAIN))


class _Burst(threading.local):
    """``with burst:`` around one pass of a server's loop (see the module's docstring): the
    reads this thread submits during it wait for its end, and go out together then."""

    engines: list[ForwardingEngine] | None = None  # with reads held, while in a pass

    def __enter__(self) -> None:
        if self.engines is None:
            self.engines = []

    def __exit__(self, *exc_info) -> None:
        engines, self.engines = self.engines, None
        if engines:
            for engine in engines:
                engine._release()


#: One pass of a server's loop, in which forwarded reads are held (see :class:`_Burst`).
burst = _Burst()


class OwnerBusy(RequestFailed):
    """Too many requests wait for one owner's connections: this one was not sent."""


class _Exchange:
    """One forwarded request: its bytes, where it goes, when it is late, who is told.

    A read sent with others (:meth:`ForwardingEngine.submit_read`) is an exchange whose
    ``data`` is its query (``key=...``) and ``group`` the rest of its head, carried by the
    ``batch`` exchange of the request of reads it went out in (whose ``members`` they are)."""

    __slots__ = (
        "address",
        "batch",
        "connection",
        "data",
        "deadline",
        "done",
        "ended",
        "group",
        "members",
        "reads",
        "retried",
        "sent_at",
        "what",
    )

    def __init__(self, address: str, data: bytes, deadline: float, done: Done | None, what: str):
        self.connection: _Connection | None = None  # the one carrying it now
        self.address = address
        self.data = data
        self.deadline = deadline
        self.done = done
        self.what = what
        self.ended = False
        self.retried = False
        self.group: bytes | None = None  # a read not sent yet: its head after the request line
        self.batch: _Exchange | None = None  # a read: the request of reads carrying it
        self.members: list[_Exchange] | None = None  # a request of reads: its reads
        self.reads: _Reads | None = None  # a request of reads: whose
        self.sent_at = 0.0  # a request of reads: when it went out (monotonic)


class _Reads:
    """The reads for one owner with one head: those waiting, and the requests in flight (in
    the order they went out)."""

    __slots__ = ("address", "group", "in_flight", "queued")

    def __init__(self, address: str, group: bytes):
        self.address = address
        self.group = group
        self.in_flight: list[_Exchange] = []
        self.queued: collections.deque[_Exchange] = collections.deque()

    def patience_ends(self) -> float:
        """When reads that wait may go out beside the requests in flight (inf: they may not
        before one of those ends, or there is nothing to send)."""
        in_flight = self.in_flight
        if not self.queued or not in_flight or len(in_flight) >= READ_BATCHES_PER_OWNER:
            return math.inf
        return in_flight[-1].sent_at + READS_PATIENCE


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
        read_answer: ReadAnswer | None = None,
    ):
        self.timeout = timeout
        #: How a read's value becomes its answer (needed for :meth:`submit_read`).
        self.read_answer = read_answer
        self.source = source_host
        self.per_owner = max(1, per_owner)
        self.waiting_limit = max(0, waiting)
        self._selector = selectors.DefaultSelector()
        self._owners: dict[str, _Owner] = {}
        self._reads: dict[tuple[str, bytes], _Reads] = {}
        #: Owners that answered a request of reads as if they did not know it: until when
        #: their reads go out plain.
        self._plain: dict[str, float] = {}
        #: Reads held for the end of a :data:`burst`.
        self._held: set[_Reads] = set()
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
        self._sleep_until = math.inf  # when a sleeping engine wakes by itself (at the latest)
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
                self._go(exchange, exchange.deadline)
        if closed:  # never seen by the engine: told here, in the submitting thread
            exchange.ended = True
            done(None, self._failure(exchange, "the node is stopping", sent=False))

    def submit_read(self, address: str, group: bytes, query: bytes, done: Done, what: str) -> None:
        """:meth:`submit` for a read of one key, ``GET /get?{query}`` with the head ``group``
        after its request line (its Host, its headers and the blank line; reads with the same
        head may go out together): sent with the other reads of the same owner and head that
        wait when it arrives, in one request (see the module's docstring). ``done`` gets the
        owner's answer for this read alone, as :meth:`submit` would (:attr:`read_answer` of
        its value)."""
        now = time.monotonic()
        exchange = _Exchange(address, query, now + self.timeout, done, what)
        exchange.group = group
        refused: RequestFailed | None = None
        with self._lock:
            if self._closed:
                refused = self._failure(exchange, "the node is stopping", sent=False)
            elif self._plain.get(address, 0.0) > now:  # the owner knows only plain reads
                self._plain_read(exchange)
                self._deadlines.append(exchange)
                self._go(exchange, exchange.deadline)
            else:
                reads = self._reads.get((address, group))
                if reads is None:
                    reads = self._reads[address, group] = _Reads(address, group)
                if len(reads.queued) >= self.waiting_limit:
                    refused = OwnerBusy(
                        f"{what}: {len(reads.queued)} reads wait for the owner already",
                        address=address,
                        sent=False,
                    )
                else:
                    self._deadlines.append(exchange)
                    reads.queued.append(exchange)
                    held = burst.engines
                    if held is not None:  # held for the end of this thread's pass
                        if self not in held:
                            held.append(self)
                        self._held.add(reads)
                    else:
                        # Else it waits for an answer to the reads in flight (the engine
                        # wakes for that), or for a read that comes once their patience ended
                        # (it takes it along), or for the engine's own wake-up.
                        batch = self._next_batch(reads, now)
                        if batch is not None:
                            self._go(batch, exchange.deadline)
        if refused is not None:  # never seen by the engine: told here, in this thread
            exchange.ended = True
            done(None, refused)

    def _release(self) -> None:
        """Send the reads held for the end of a :data:`burst` (in the thread that held them)."""
        with self._lock:
            held, self._held = self._held, set()
            now = time.monotonic()
            for reads in held:
                while (batch := self._next_batch(reads, now)) is not None:
                    self._go(batch, batch.deadline)

    def _go(self, exchange: _Exchange, deadline: float) -> None:
        """Send ``exchange`` from the submitting thread if an idle connection to its owner is
        there, else leave it to the engine; wake the engine if it must see it (under the
        lock). ``deadline``: the earliest at which the engine must look at it."""
        owner = self._owners.get(exchange.address)
        if owner is not None and owner.idle:
            connection = owner.idle.pop()
            connection.exchange = exchange
            exchange.connection = connection
            data = exchange.data
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
                wake = self._sleeping and deadline < self._sleep_until
        else:
            self._incoming.append(exchange)
            wake = self._sleeping
        if wake:
            self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_write, b"x")
            except BlockingIOError:  # the pipe is full: the engine is being woken
                pass

    def _next_batch(self, reads: _Reads, now: float) -> _Exchange | None:
        """A request of the reads that wait in ``reads``, if one may go out now (under the
        lock); it counts as in flight from here on."""
        in_flight = reads.in_flight
        if self._closed or (in_flight and reads.patience_ends() > now):
            return None
        queued = reads.queued
        members: list[_Exchange] = []
        size = 0
        while queued and len(members) < MAX_BATCH_READS:
            read = queued[0]
            if read.ended:
                queued.popleft()
                continue
            if members and size + len(read.data) >= MAX_BATCH_QUERY:
                break
            queued.popleft()
            members.append(read)
            size += len(read.data) + 1
        if not members:
            key = (reads.address, reads.group)
            if not in_flight and self._reads.get(key) is reads:
                del self._reads[key]
            return None
        data = b"".join(
            (
                b"GET ",
                READS_PATH,
                b"?",
                b"&".join([read.data for read in members]),
                b" HTTP/1.1\r\n",
                reads.group,
            )
        )
        what = f"GET {READS_PATH.decode()} ({len(members)} reads)"
        # Its reads were queued in the order of their deadlines: the first is the earliest.
        batch = _Exchange(reads.address, data, members[0].deadline, None, what)
        batch.members = members
        batch.reads = reads
        batch.sent_at = now
        for read in members:
            read.batch = batch
        in_flight.append(batch)
        return batch

    @staticmethod
    def _plain_read(read: _Exchange) -> None:
        """Make ``read`` a plain ``GET /get`` request of its own."""
        group = read.group
        assert group is not None
        read.data = b"".join((b"GET /get?", read.data, b" HTTP/1.1\r\n", group))
        read.group = None

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
            if self._incoming or self._unsent:
                timeout = 0.0
                self._sleep_until = -math.inf
            else:
                # With nothing in flight the engine still wakes within ``timeout``: an exchange
                # submitted meanwhile is due later than that, so sending it needs no wake-up.
                now = time.monotonic()
                until = self._deadlines[0].deadline if self._deadlines else now + self.timeout
                for reads in self._reads.values():  # reads that may go out once patience ends
                    until = min(until, reads.patience_ends())
                self._sleep_until = until
                timeout = max(0.0, until - now)
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
        if self._reads:
            now = time.monotonic()
            for reads in list(self._reads.values()):
                if reads.queued:
                    while (batch := self._next_batch(reads, now)) is not None:
                        self._start(batch)
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
            reason = f"{len(owner.waiting)} requests wait for the owner already"
            self._end(exchange, None, self._failure(exchange, reason, sent=False, kind=OwnerBusy))

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
            batch = exchange.batch
            if batch is not None:
                # A read in a request of reads fails alone; the request goes on for the others
                # until none of them waits for it.
                self._end(exchange, None, self._late(batch, exchange))
                assert batch.members is not None
                if not all(read.ended for read in batch.members):
                    continue
                exchange = batch
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

    def _late(self, carrier: _Exchange, read: _Exchange) -> RequestFailed:
        """The failure of ``read``, past its deadline while ``carrier`` carries it."""
        connection = carrier.connection
        if connection is None:
            return self._failure(
                read, "timed out waiting for a connection", sent=False, timed_out=True
            )
        if connection.connecting:
            return self._failure(read, "timed out connecting", sent=False, timed_out=True)
        return self._failure(read, "timed out", timed_out=True)

    def _failure(
        self,
        exchange: _Exchange,
        reason: str,
        *,
        sent: bool = True,
        timed_out: bool = False,
        kind: type[RequestFailed] = RequestFailed,
    ) -> RequestFailed:
        failure = kind(
            f"{exchange.what}: {reason}", address=exchange.address, sent=sent, timed_out=timed_out
        )
        failure.reason = reason  # type: ignore[attr-defined]  # a request of reads passes it on
        return failure

    def _end(
        self, exchange: _Exchange, response: Response | None, error: RequestFailed | None
    ) -> None:
        if exchange.ended:
            return
        exchange.ended = True
        exchange.data = b""
        exchange.connection = None
        if exchange.members is not None:
            self._end_batch(exchange, response, error)
            return
        assert exchange.done is not None
        self._ended.append((exchange.done, response, error))

    def _end_batch(
        self, batch: _Exchange, response: Response | None, error: RequestFailed | None
    ) -> None:
        """A request of reads ended: each of its reads is answered with its value, fails as
        it failed, or (an answer that is not a value for each) is sent again on its own."""
        members = batch.members
        reads = batch.reads
        assert members is not None and reads is not None
        batch.members = None
        reads.in_flight.remove(batch)
        values = None
        if response is not None:
            if response.status == 200:
                values = _values(response, len(members))
            elif response.status in (404, 405):  # an owner that does not know the endpoint
                self._plain[reads.address] = time.monotonic() + PLAIN_FOR
                if len(self._plain) > 1024:  # one per owner address: a bound for many
                    self._plain.clear()
        answer = self.read_answer
        for i, read in enumerate(members):
            read.batch = None
            if read.ended:
                continue
            if error is not None:
                reason = getattr(error, "reason", None) or str(error)
                failure = self._failure(
                    read, reason, sent=error.sent, timed_out=error.timed_out, kind=type(error)
                )
                self._end(read, None, failure)
            elif values is not None and answer is not None:
                self._end(read, answer(values[i]), None)
            else:
                # Sent again on its own, with its own deadline (it is in _deadlines already).
                self._plain_read(read)
                self._start(read)
        now = time.monotonic()
        while (following := self._next_batch(reads, now)) is not None:
            self._start(following)

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


def _values(response: Response, count: int) -> list[bytes | None] | None:
    """The values of an answer to a request of ``count`` reads (a msgpack list of binary
    values and nils), or None if it is anything else."""
    if response.content_type != MSGPACK:
        return None
    try:
        values = msgpack.unpackb(response.body, raw=False, use_list=True)
    except (ValueError, msgpack.UnpackException):
        return None
    if type(values) is not list or len(values) != count:
        return None
    for value in values:
        if value is not None and type(value) is not bytes:
            return None
    return values


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
