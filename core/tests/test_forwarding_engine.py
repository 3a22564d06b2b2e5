"""The forwarding engine against small scripted owners on loopback: how it reads answers
(Content-Length, chunked, until close), reuses and replaces connections, and fails."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import quote_from_bytes, unquote_to_bytes

import msgpack
import pytest

from distribkv.http.forwarding import MAX_BATCH_READS, READS_PATIENCE, ForwardingEngine, burst
from distribkv.httpclient import RequestFailed, Response

REQUEST = b"GET /get?key=k HTTP/1.1\r\nHost: owner\r\n\r\n"


class ScriptedOwner:
    """A listener that reads each request head and answers it with ``answer(n)`` (the n-th
    request on that connection), closing the connection when ``answer`` gives None, and
    after an HTTP/1.0 answer."""

    def __init__(self, answer: Callable[[int], bytes | None]):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(5)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buffer = b""
        n = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                reply = self.reply(head, n)
                n += 1
                if reply is None:
                    return
                conn.sendall(reply)
                if reply.startswith(b"HTTP/1.0"):
                    return  # its body ends where the connection does

    def reply(self, head: bytes, n: int) -> bytes | None:
        """The answer to request ``n`` of a connection, whose head is ``head``."""
        return self.answer(n)

    def close(self) -> None:
        self.sock.close()


def exchange(engine: ForwardingEngine, address: str, data: bytes = REQUEST):
    """One exchange through ``engine``: (response, error)."""
    done = threading.Event()
    out: list = []

    def finished(response: Response | None, error: RequestFailed | None) -> None:
        out.extend((response, error))
        done.set()

    engine.submit(address, data, finished, "GET /get?key=k")
    assert done.wait(10), "the exchange did not end"
    return out[0], out[1]


@pytest.fixture
def engine():
    running = ForwardingEngine(1.0, source_host="127.0.0.1")
    yield running
    running.close()


def test_answers_by_length_chunked_and_until_close_come_back_whole(engine):
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 5\r\n"
        b"\r\n\x00\xff&/ ",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    ]
    owner = ScriptedOwner(lambda n: answers[n] if n < len(answers) else None)
    try:
        first, _ = exchange(engine, owner.address)
        assert (first.status, first.body) == (200, b"\x00\xff&/ ")
        assert first.header("content-type") == "application/octet-stream"
        second, _ = exchange(engine, owner.address)
        assert (second.status, second.body) == (404, b"abcde")
        third, _ = exchange(engine, owner.address)
        assert (third.status, third.body) == (200, b"until close")
        assert owner.connections == 1  # kept alive and reused until the owner closed it
    finally:
        owner.close()


def test_a_request_on_a_kept_connection_the_owner_closes_is_sent_again_on_a_new_one(engine):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    owner = ScriptedOwner(lambda n: ok if n == 0 else None)  # closes after one answer
    try:
        for _ in range(3):
            response, error = exchange(engine, owner.address)
            assert error is None and response.body == b"ok"
        assert owner.connections == 3
    finally:
        owner.close()


def test_a_malformed_answer_fails_the_exchange(engine):
    owner = ScriptedOwner(lambda n: b"SPDY/9 what\r\n\r\n")
    try:
        response, error = exchange(engine, owner.address)
        assert response is None and "malformed" in str(error) and error.sent
    finally:
        owner.close()


def test_refused_and_silent_owners_fail_as_unreachable_and_timed_out(engine):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{unused.getsockname()[1]}"
    response, error = exchange(engine, refused)
    assert response is None and not error.timed_out and not error.sent
    silent = ScriptedOwner(lambda n: None if n > 0 else b"")  # reads, never answers
    try:
        started = time.monotonic()
        response, error = exchange(engine, silent.address)
        assert response is None and error.timed_out
        assert 0.9 <= time.monotonic() - started < 3
    finally:
        silent.close()


def test_a_closed_engine_fails_what_it_is_given():
    engine = ForwardingEngine(1.0)
    engine.close()
    response, error = exchange(engine, "127.0.0.1:9")
    assert response is None and "stopping" in str(error)


# --- reads sent together ------------------------------------------------------------------

READ_HEAD = b"Host: owner\r\nX-Distribkv-Hop: front\r\n\r\n"


def read_answer(value: bytes | None) -> Response:
    if value is None:
        return Response(404, [("Content-Type", "application/json")], b'{"error": "not found"}')
    return Response(200, [("Content-Type", "application/octet-stream")], value)


class ReadsOwner(ScriptedOwner):
    """An owner of ``values`` that answers ``/forwarding/get`` with their msgpack list and
    ``/get`` alone with the value, records every request line it gets, and holds each answer
    until ``gate`` is set (set from the start unless ``held``). ``many`` replaces the answer
    to a request of reads (to answer it wrongly)."""

    def __init__(self, values: dict[bytes, bytes], *, held: bool = False, many=None):
        self.values = values
        self.many = many
        self.lines: list[bytes] = []
        self.received = threading.Semaphore(0)  # released for each request line
        self.gate = threading.Event()
        if not held:
            self.gate.set()
        super().__init__(lambda n: None)

    def reply(self, head: bytes, n: int) -> bytes | None:
        line = head.split(b"\r\n", 1)[0]
        self.lines.append(line)
        self.received.release()
        if not self.gate.wait(10):
            return None
        target = line.split(b" ")[1]
        path, _, query = target.partition(b"?")
        keys = [unquote_to_bytes(part[4:]) for part in query.split(b"&")]
        if path == b"/forwarding/get":
            if self.many is not None:
                return self.many
            body = msgpack.packb([self.values.get(key) for key in keys], use_bin_type=True)
            return _http(200, body, "application/msgpack")
        value = self.values.get(keys[0])
        if value is None:
            return _http(404, b'{"error": "not found"}', "application/json")
        return _http(200, value, "application/octet-stream")

    def wait_lines(self, count: int) -> list[bytes]:
        for _ in range(count):
            assert self.received.acquire(timeout=10), f"only {len(self.lines)} requests came"
        return list(self.lines)

    def close(self) -> None:
        self.gate.set()
        super().close()


def _http(status: int, body: bytes, kind: str) -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Reads:
    """Reads submitted to an engine, and their answers as they come."""

    def __init__(self, engine: ForwardingEngine, address: str):
        self.engine = engine
        self.address = address
        self.answers: dict[bytes, tuple] = {}
        self.lock = threading.Lock()
        self.all_in = threading.Condition(self.lock)

    def submit(self, key: bytes) -> None:
        def done(response, error, key=key):
            with self.lock:
                self.answers[key] = (response, error)
                self.all_in.notify_all()

        query = b"key=" + quote_from_bytes(key, safe="").encode()
        self.engine.submit_read(self.address, READ_HEAD, query, done, f"GET /get?{query!r}")

    def wait(self, count: int) -> dict[bytes, tuple]:
        with self.lock:
            assert self.all_in.wait_for(lambda: len(self.answers) >= count, timeout=10), (
                f"{len(self.answers)} of {count} reads were answered"
            )
            return dict(self.answers)


@pytest.fixture
def read_engine():
    running = ForwardingEngine(2.0, source_host="127.0.0.1", read_answer=read_answer)
    yield running
    running.close()


def _keys_of(line: bytes) -> list[bytes]:
    query = line.split(b" ")[1].partition(b"?")[2]
    return [unquote_to_bytes(part[4:]) for part in query.split(b"&")]


VALUES = {b"k%d" % i: b"\x00value \xff&/ %d" % i for i in range(0, 200, 2)}  # odd keys: none


def _check(answers: dict[bytes, tuple]) -> None:
    for key, (response, error) in answers.items():
        assert error is None, (key, error)
        if key in VALUES:
            assert (response.status, response.body) == (200, VALUES[key]), key
        else:
            assert response.status == 404, key


def test_reads_that_arrive_while_one_is_in_flight_go_out_together(read_engine):
    owner = ReadsOwner(VALUES, held=True)
    reads = Reads(read_engine, owner.address)
    try:
        reads.submit(b"k0")  # nothing in flight: it goes out at once, alone
        assert _keys_of(owner.wait_lines(1)[0]) == [b"k0"]
        later = [b"k%d" % i for i in range(1, 9)]
        for key in later:
            reads.submit(key)
        owner.gate.set()
        lines = owner.wait_lines(1)
        _check(reads.wait(9))
        assert len(lines) == 2 and lines[1].startswith(b"GET /forwarding/get?")
        assert _keys_of(lines[1]) == later  # the eight that waited, in one request, in order
    finally:
        owner.close()


def test_reads_submitted_in_a_burst_go_out_at_its_end_in_requests_of_at_most_128(read_engine):
    owner = ReadsOwner(VALUES)
    reads = Reads(read_engine, owner.address)
    keys = [b"k%d" % i for i in range(150)]
    try:
        with burst:
            for key in keys:
                reads.submit(key)
            time.sleep(0.2)  # held: nothing may go out before the end of the pass
            assert owner.lines == []
        _check(reads.wait(len(keys)))
        lines = owner.wait_lines(2)
        assert [len(_keys_of(line)) for line in lines] == [MAX_BATCH_READS, 150 - MAX_BATCH_READS]
        assert [key for line in lines for key in _keys_of(line)] == keys
    finally:
        owner.close()


@pytest.mark.parametrize(
    "many",
    [
        _http(421, b'{"error": "misdirected request"}', "application/json"),
        _http(200, msgpack.packb([b"one value for three reads"]), "application/msgpack"),
        _http(200, b"\xc1 not msgpack", "application/msgpack"),
    ],
    ids=["an error", "too few values", "not msgpack"],
)
def test_reads_whose_request_is_not_answered_with_their_values_are_sent_again_alone(
    read_engine, many
):
    owner = ReadsOwner(VALUES, many=many)
    reads = Reads(read_engine, owner.address)
    keys = [b"k2", b"k3", b"k\x00/&%"]
    try:
        with burst:
            for key in keys:
                reads.submit(key)
        answers = reads.wait(3)
        _check(answers)
        lines = owner.wait_lines(4)
        assert _keys_of(lines[0]) == keys
        assert sorted(lines[1:]) == sorted(
            b"GET /get?key=" + quote_from_bytes(key, safe="").encode() + b" HTTP/1.1"
            for key in keys
        )
    finally:
        owner.close()


def test_reads_whose_owner_never_answers_each_time_out():
    engine = ForwardingEngine(0.5, source_host="127.0.0.1", read_answer=read_answer)
    owner = ReadsOwner(VALUES, held=True)  # never answers while the reads wait
    reads = Reads(engine, owner.address)
    try:
        started = time.monotonic()
        reads.submit(b"k0")
        owner.wait_lines(1)
        for key in (b"k1", b"k2"):
            reads.submit(key)
        answers = reads.wait(3)
        took = time.monotonic() - started
        assert 0.45 <= took < 3, took
        for key, (response, error) in answers.items():
            assert response is None and error.timed_out, key
            assert key.decode() in str(error)  # named by its own request, not the batch's
    finally:
        owner.close()
        engine.close()


def test_reads_given_to_a_stopping_engine_fail_as_stopping():
    engine = ForwardingEngine(1.0, read_answer=read_answer)
    engine.close()
    reads = Reads(engine, "127.0.0.1:9")
    reads.submit(b"k1")
    response, error = reads.wait(1)[b"k1"]
    assert response is None and "stopping" in str(error)


def test_a_read_past_its_own_deadline_fails_alone_and_its_request_goes_on_for_the_others():
    engine = ForwardingEngine(1.0, source_host="127.0.0.1", read_answer=read_answer)
    owner = ReadsOwner(VALUES, held=True)
    reads = Reads(engine, owner.address)
    try:
        with burst:  # the two reads go out in one request, when the second is submitted
            reads.submit(b"k2")
            time.sleep(0.6)
            reads.submit(b"k4")
        owner.wait_lines(1)
        early = reads.wait(1)
        assert list(early) == [b"k2"]  # at its own deadline, while the request is held
        response, error = early[b"k2"]
        assert response is None and error.timed_out and "k2" in str(error)
        owner.gate.set()  # before k4's deadline
        response, error = reads.wait(2)[b"k4"]
        assert error is None and (response.status, response.body) == (200, VALUES[b"k4"])
        assert len(owner.lines) == 1
    finally:
        owner.close()
        engine.close()


def test_reads_behind_a_request_the_owner_is_slow_to_answer_go_out_beside_it(read_engine):
    owner = ReadsOwner(VALUES, held=True)
    reads = Reads(read_engine, owner.address)
    try:
        reads.submit(b"k0")
        owner.wait_lines(1)
        for key in (b"k1", b"k2", b"k3"):
            reads.submit(key)
        # The first request is held: the next read that comes once its patience is over goes
        # out beside it, with those waiting (unless the engine, awake, sent them already).
        time.sleep(READS_PATIENCE * 2)
        reads.submit(b"k4")
        lines = owner.wait_lines(1)  # while the first request is still held
        assert _keys_of(lines[1])[:3] == [b"k1", b"k2", b"k3"]
        owner.gate.set()
        _check(reads.wait(5))
        assert [key for line in owner.lines for key in _keys_of(line)] == [
            b"k0",
            b"k1",
            b"k2",
            b"k3",
            b"k4",
        ]
    finally:
        owner.close()


def test_an_owner_without_the_endpoint_gets_plain_reads_from_then_on(read_engine):
    unknown = _http(404, b'{"error": "not found", "detail": "no such route"}', "application/json")
    owner = ReadsOwner(VALUES, many=unknown)
    reads = Reads(read_engine, owner.address)
    try:
        reads.submit(b"k0")
        _check(reads.wait(1))
        assert [line.split(b"?")[0] for line in owner.wait_lines(2)] == [
            b"GET /forwarding/get",
            b"GET /get",
        ]
        with burst:
            for key in (b"k1", b"k2"):
                reads.submit(key)
        _check(reads.wait(3))
        assert [line.split(b"?")[0] for line in owner.wait_lines(2)[2:]] == [b"GET /get"] * 2
    finally:
        owner.close()
