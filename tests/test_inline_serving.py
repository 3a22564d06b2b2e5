"""What the built-in servers do beyond the server contract that
``distribkv.testing.server_suite`` checks (core/tests/test_conformance_waitress.py and
plugins/granian/tests/test_conformance_granian.py run it): which threads serve what, granian's
timeouts and direct answers, how each notices a request broken off, and waitress stopped from
its own thread. In process, on loopback hosts of each test's own."""

from __future__ import annotations

import threading
import time

import pytest

from distribkv.plugins import load_plugins
from distribkv.testing.server_suite import WAIT, Served, fast_is_inline, poll, read_response

#: The name each built-in server gives its worker threads.
SERVERS = {"waitress": "waitress-", "granian": "distribkv-worker-"}


def serve(name: str, hosts, **listen) -> Served:
    if name == "granian":
        pytest.importorskip("distribkv_granian")
    return Served(load_plugins().http_server(name), hosts.host(), **listen)


@pytest.fixture(params=sorted(SERVERS))
def server(request):
    if request.param == "granian":
        pytest.importorskip("distribkv_granian")
    return request.param


@pytest.fixture
def served(server, hosts):
    running = serve(server, hosts)
    yield running
    running.stop()


def test_inline_requests_skip_the_workers_and_the_rest_use_them(served, server):
    status, body = served.get("/fast?i=1")
    assert status == 200
    assert not body.decode().startswith(SERVERS[server]), body
    served.slow.release.set()
    status, body = served.get("/slow")
    assert status == 200
    assert body.decode().startswith(SERVERS[server]) and body.endswith(b"|True"), body


def test_granian_answers_408_to_a_body_that_never_arrives(hosts):
    running = serve("granian", hosts, header_timeout=1.0)
    try:
        with running.connect() as sock:
            sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            started = time.monotonic()
            answer = sock.recv(1000)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - started < WAIT
        assert running.echo.calls == 0
    finally:
        running.stop()


def _holds_a_request(server: str, handle) -> bool:
    """The server has a request of an open connection (waitress: a connection besides the
    listener and the trigger; granian: a body being read or a request handed over)."""
    if server == "granian":
        return bool(handle._reading or handle._pending)
    return any(hasattr(dispatcher, "requests") for dispatcher in handle.server._map.values())


def test_a_chunked_body_broken_off_never_reaches_the_application(served, server):
    with served.connect() as sock:
        sock.sendall(
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        poll(lambda: _holds_a_request(server, served.handle), "the request never arrived")
    poll(lambda: not _holds_a_request(server, served.handle), "the broken request was kept")
    assert served.echo.calls == 0
    # The same body, finished, goes through.
    with served.connect() as sock:
        sock.sendall(
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert read_response(sock.makefile("rb")) == b"hello"
    assert served.echo.calls == 1


def test_granian_answers_direct_requests_and_refuses_them_once_stopping(hosts):
    from distribkv.http.api import DEFERRED

    calls = []
    finishers = []
    release = threading.Event()

    def finish_later(completion, body):  # answered from another thread, as the group commit
        release.wait(WAIT)
        completion.finish("201 Created", [("content-type", "text/plain")], b"later|" + body)

    def direct(method, path, query, header, body, defer):
        calls.append((method, path, query, header("x-probe"), body))
        if path == "/direct-broken":
            raise RuntimeError("a direct answer failed")
        if path == "/direct-later":
            assert defer is not None  # granian finishes answers later
            finisher = threading.Thread(target=finish_later, args=(defer(), body))
            finishers.append(finisher)
            finisher.start()
            return DEFERRED
        if path != "/direct":
            return None
        return 200, [("content-type", "text/plain")], b"direct|" + query.encode()

    def inline(method, path, query):
        return fast_is_inline(method, path, query) or path.startswith("/direct")

    served = serve("granian", hosts, direct=direct, inline=inline)
    try:
        conn = served.connection()
        conn.request("GET", "/direct?k=%FF", headers={"X-Probe": "1"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"direct|k=%FF")
        assert response.getheader("content-length") == "12"
        assert calls[-1] == ("GET", "/direct", "k=%FF", "1", b"")
        # A deferred answer, to a request with a body (read whole first), on the same
        # connection.
        conn.request("PUT", "/direct-later", body=b"\x00\xffbody")
        wrapper = served.handle.wrapper
        poll(lambda: len(finishers) == 1, "the deferred request never started")
        assert wrapper.in_flight == 1  # counted (so a drain waits) until it is answered
        release.set()
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|\x00\xffbody")
        assert calls[-1] == ("PUT", "/direct-later", "", None, b"\x00\xffbody")
        # Answered once: the next request on the connection gets its own answer.
        conn.request("GET", "/direct?again")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"direct|again")
        conn.close()
        for finisher in finishers:
            finisher.join(WAIT)
        # None: the application answers (served inline, not by a worker).
        status, body = served.get("/fast?i=7")
        assert status == 200 and body.endswith(b"|7")
        assert calls[-1][1] == "/fast"
        # A failing direct answer is a 500, and the server goes on serving.
        assert served.get("/direct-broken")[0] == 500
        assert served.get("/direct")[0] == 200
        poll(lambda: served.handle.wrapper.in_flight == 0, "a direct request stayed counted")
        # Once refusing (the node is closing) no direct answer is asked for: 503.
        served.handle.wrapper.refuse()
        before = len(calls)
        assert served.get("/direct")[0] == 503
        assert len(calls) == before
    finally:
        served.stop()


def test_waitress_stops_when_asked_while_its_thread_runs_deferred_answers(hosts):
    # A signal handler runs in the serving thread, possibly while that thread runs the trigger's
    # thunks, which it does holding the trigger's lock.
    running = serve("waitress", hosts)
    try:
        running.handle.server.trigger.pull_trigger(running.handle.stop)
        running.runner.join(timeout=3 * WAIT)
        assert not running.runner.is_alive(), "stop() from the serving thread never returned"
    finally:
        running.stop()
