"""The forwarding engine against small scripted owners on loopback: how it reads answers
(Content-Length, chunked, until close), reuses and replaces connections, and fails."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from distribkv.http.forwarding import ForwardingEngine
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
                buffer = buffer.split(b"\r\n\r\n", 1)[1]
                reply = self.answer(n)
                n += 1
                if reply is None:
                    return
                conn.sendall(reply)
                if reply.startswith(b"HTTP/1.0"):
                    return  # its body ends where the connection does

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
