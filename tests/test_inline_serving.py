"""How the server plugins dispatch requests: the ones ``Listen.inline`` names are served where
they are parsed, everything else by worker threads, and a slow request never holds up the
others. Each test runs on every installed server plugin, in process, on 127.0.0.1."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import falcon
import pytest

from distribkv.http.api import DEFER, Listen
from distribkv.plugins import load_plugins

SERVERS = {"waitress": "waitress-", "granian": "distribkv-worker-"}
WAIT = 10.0  # seconds any single step may take before the test fails


class Fast:
    def on_get(self, req, resp):
        resp.data = f"{threading.current_thread().name}|{req.get_param('i') or ''}".encode()


class Slow:
    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def on_get(self, req, resp):
        self.entered.release()
        released = self.release.wait(WAIT)
        resp.data = f"{threading.current_thread().name}|{released}".encode()


class Echo:
    def __init__(self):
        self.calls = 0

    def on_put(self, req, resp):
        self.calls += 1
        resp.data = req.bounded_stream.read()


class Deferring:
    """Answers later, from a thread of its own once released (as the group commit does), where
    the server offers ``environ[DEFER]``; with ``?now`` it finishes before it returns (as a
    write refused at once is). Whatever it answers itself is to be ignored."""

    def __init__(self):
        self.release = threading.Event()
        self.deferred = threading.Semaphore(0)
        self.finishers: list[threading.Thread] = []

    def on_put(self, req, resp):
        body = req.bounded_stream.read()
        text = b"later|" + body
        answer = (
            "201 Created",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))],
            text,
        )
        defer = req.env.get(DEFER)
        if defer is None:  # served by a worker: answered here
            resp.status, resp.data = falcon.HTTP_201, text
            return
        completion = defer()
        resp.status, resp.data = falcon.HTTP_500, b"ignored"
        if req.get_param("now"):
            completion.finish(*answer)
            return

        def finish():
            self.release.wait(WAIT)
            completion.finish(*answer)

        finisher = threading.Thread(target=finish)
        self.finishers.append(finisher)
        finisher.start()
        self.deferred.release()


def read_response(reader) -> bytes:
    """One HTTP/1.1 response with a Content-Length from ``reader``; its body (status 200)."""
    status, body = read_response_any(reader)
    assert status == 200, status
    return body


def read_response_any(reader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from ``reader``: its status and body."""
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 "), status
    length = None
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    assert length is not None
    return int(status.split()[1]), reader.read(length)


def fast_is_inline(method: str, path: str, query: str) -> bool:
    return method == "GET" and path == "/fast"


class Served:
    def __init__(self, server: str, *, threads: int = 2, **listen):
        self.slow, self.echo, self.later = Slow(), Echo(), Deferring()
        app = falcon.App()
        app.add_route("/later", self.later)
        app.add_route("/fast", Fast())
        app.add_route("/slow", self.slow)
        app.add_route("/echo", self.echo)
        spec = load_plugins().http_server(server)
        inline = listen.pop("inline", fast_is_inline)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.handle = spec.create(
            app,
            Listen(
                "127.0.0.1",
                self.port,
                threads=threads,
                inline=inline,
                settings={"drain_timeout": WAIT},
                **listen,
            ),
        )
        self.runner = threading.Thread(target=self.handle.run, name="serving")
        self.runner.start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                if self.get("/fast")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{server} did not answer within {WAIT}s")

    def get(self, target: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def put_deferred(self, body: bytes) -> http.client.HTTPConnection:
        """A connection whose PUT /later has been deferred (its answer not yet sent)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        conn.request("PUT", "/later", body=body)
        assert self.later.deferred.acquire(timeout=WAIT), "the request was never deferred"
        return conn

    def stop(self) -> None:
        self.slow.release.set()
        self.later.release.set()
        self.handle.stop()
        self.runner.join(timeout=3 * WAIT)
        assert not self.runner.is_alive(), "run() did not return after stop()"


@pytest.fixture(params=sorted(SERVERS))
def server(request):
    if request.param == "granian":
        pytest.importorskip("distribkv_granian")
    return request.param


@pytest.fixture
def served(server):
    running = Served(server)
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


def test_inline_requests_are_answered_while_every_worker_is_busy(served):
    results: list = []

    def slow_call():
        results.append(served.get("/slow"))

    blocked = [threading.Thread(target=slow_call) for _ in range(2)]  # = threads
    for thread in blocked:
        thread.start()
    for _ in blocked:
        assert served.slow.entered.acquire(timeout=WAIT), "a slow request never started"
    # Both workers now wait for the release; reads must not need either of them.
    answers = [served.get(f"/fast?i={i}") for i in range(20)]
    assert answers == [(200, answers[0][1].split(b"|")[0] + b"|%d" % i) for i in range(20)]
    assert not results, "a slow request finished before it was released"
    served.slow.release.set()
    for thread in blocked:
        thread.join(timeout=WAIT)
    assert [status for status, _ in results] == [200, 200]


def test_pipelined_requests_are_answered_in_order(served):
    served.slow.release.set()
    targets = ["/fast?i=1", "/slow", "/fast?i=2", "/fast?i=3", "/slow", "/fast?i=4"]
    raw = "".join(f"GET {t} HTTP/1.1\r\nHost: x\r\n\r\n" for t in targets).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        bodies = [read_response(reader) for _ in targets]
    assert [b.split(b"|")[1] for b in bodies] == [b"1", b"True", b"2", b"3", b"True", b"4"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_request_bodies_reach_the_application_byte_exactly(served, chunked):
    value = bytes(range(256)) * 300 + b"\x00end"
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=WAIT)
    try:
        if chunked:
            pieces = [value[i : i + 7000] for i in range(0, len(value), 7000)]
            conn.request("PUT", "/echo", body=iter(pieces), encode_chunked=True)
        else:
            conn.request("PUT", "/echo", body=value)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, value)
    finally:
        conn.close()


def test_a_body_over_the_limit_is_refused_without_calling_the_application(server):
    running = Served(server, max_request_body_size=1000)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=WAIT)
        conn.request("PUT", "/echo", body=b"x" * 1001)
        assert conn.getresponse().status == 413
        conn.close()
        assert running.echo.calls == 0
    finally:
        running.stop()


def test_stop_lets_a_running_request_finish(served):
    results: list = []
    caller = threading.Thread(target=lambda: results.append(served.get("/slow")))
    caller.start()
    assert served.slow.entered.acquire(timeout=WAIT)
    served.handle.stop()
    served.slow.release.set()
    caller.join(timeout=WAIT)
    assert results and results[0][0] == 200


def test_granian_answers_408_to_a_body_that_never_arrives():
    pytest.importorskip("distribkv_granian")
    running = Served("granian", channel_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as sock:
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


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_chunked_body_broken_off_never_reaches_the_application(served, server):
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as sock:
        sock.sendall(
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        _wait(lambda: _holds_a_request(server, served.handle), "the request never arrived")
    _wait(lambda: not _holds_a_request(server, served.handle), "the broken request was kept")
    assert served.echo.calls == 0
    # The same body, finished, goes through.
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as sock:
        sock.sendall(
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert read_response(sock.makefile("rb")) == b"hello"
    assert served.echo.calls == 1


def test_granian_answers_direct_requests_and_refuses_them_once_stopping():
    pytest.importorskip("distribkv_granian")
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

    served = Served("granian", direct=direct, inline=inline)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=WAIT)
        conn.request("GET", "/direct?k=%FF", headers={"X-Probe": "1"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"direct|k=%FF")
        assert response.getheader("content-length") == "12"
        assert calls[-1] == ("GET", "/direct", "k=%FF", "1", b"")
        # A deferred answer, to a request with a body (read whole first), on the same
        # connection.
        conn.request("PUT", "/direct-later", body=b"\x00\xffbody")
        wrapper = served.handle.wrapper
        _wait(lambda: len(finishers) == 1, "the deferred request never started")
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
        _wait(lambda: served.handle.wrapper.in_flight == 0, "a direct request stayed counted")
        # Once refusing (the node is closing) no direct answer is asked for: 503.
        served.handle.wrapper.refuse()
        before = len(calls)
        assert served.get("/direct")[0] == 503
        assert len(calls) == before
    finally:
        served.stop()


def later_is_inline(method: str, path: str, query: str) -> bool:
    return fast_is_inline(method, path, query) or path == "/later"


def test_a_deferred_answer_is_sent_once_in_order_and_counted_until_sent(server):
    running = Served(server, inline=later_is_inline)
    later = running.later
    wrapper = running.handle.wrapper
    try:
        conn = running.put_deferred(b"\x00\xffbody")
        assert wrapper.in_flight == 1  # counted (so a drain waits) until it is answered
        # The thread that served it goes on with other connections meanwhile.
        status, body = running.get("/fast?i=1")
        assert status == 200 and body.endswith(b"|1")
        later.release.set()
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|\x00\xffbody")
        assert response.getheader("content-length") == "12"
        # Answered once: the next request on the connection gets its own answer.
        conn.request("GET", "/fast?i=2")
        response = conn.getresponse()
        assert response.status == 200 and response.read().endswith(b"|2")
        # Finished before the application returned (a write refused at once): the same.
        conn.request("PUT", "/later?now=1", body=b"now")
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|now")
        conn.request("GET", "/fast?i=3")
        response = conn.getresponse()
        assert response.status == 200 and response.read().endswith(b"|3")
        conn.close()
        _wait(lambda: wrapper.in_flight == 0, "a deferred request stayed counted")
        # Pipelined behind a deferred request, a request is answered after it.
        later.release.clear()
        raw = (
            b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
            b"GET /fast?i=4 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as sock:
            sock.sendall(raw)
            threading.Timer(0.2, later.release.set).start()
            reader = sock.makefile("rb")
            assert read_response_any(reader) == (201, b"later|a")
            status, body = read_response_any(reader)
            assert status == 200 and body.endswith(b"|4")
        # HTTP/1.0 without keep-alive: the connection closes after the deferred answer.
        later.release.set()
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as sock:
            sock.sendall(b"PUT /later HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.split(b" ", 2)[1] == b"201" and received.endswith(b"\r\n\r\nlater|abc")
        for finisher in later.finishers:
            finisher.join(WAIT)
        _wait(lambda: wrapper.in_flight == 0, "a deferred request stayed counted")
    finally:
        running.stop()


def test_a_deferred_answer_to_a_client_that_left_ends_the_request(server):
    running = Served(server, inline=later_is_inline)
    later = running.later
    wrapper = running.handle.wrapper
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as sock:
            sock.sendall(b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
            assert later.deferred.acquire(timeout=WAIT), "the request was never deferred"
        later.release.set()  # answered after the client went away
        _wait(lambda: wrapper.in_flight == 0, "the request of a client that left stayed counted")
        status, body = running.get("/fast?i=5")  # and the server goes on serving
        assert status == 200 and body.endswith(b"|5")
    finally:
        running.stop()


def test_waitress_stops_when_asked_while_its_thread_runs_deferred_answers():
    # A signal handler runs in the serving thread, possibly while that thread runs the trigger's
    # thunks, which it does holding the trigger's lock.
    running = Served("waitress")
    try:
        running.handle.server.trigger.pull_trigger(running.handle.stop)
        running.runner.join(timeout=3 * WAIT)
        assert not running.runner.is_alive(), "stop() from the serving thread never returned"
    finally:
        running.stop()


def test_stop_sends_the_deferred_answers_still_to_come(server):
    running = Served(server, inline=later_is_inline)
    later = running.later
    try:
        conn = running.put_deferred(b"last")
        running.handle.stop()
        threading.Timer(0.3, later.release.set).start()
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|last")
        conn.close()
        running.runner.join(timeout=3 * WAIT)
        assert not running.runner.is_alive(), "run() did not return after the drain"
    finally:
        running.stop()


def test_a_deferred_answer_outlasting_the_channel_timeout_is_still_sent(server):
    running = Served(server, inline=later_is_inline, channel_timeout=1.0)
    later = running.later
    try:
        conn = running.put_deferred(b"slow")
        # Past the timeout and the next clean-up (every second): a connection waiting for
        # its answer is not an idle one.
        time.sleep(2.5)
        later.release.set()
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|slow")
        conn.close()
    finally:
        running.stop()


def test_a_100_continue_behind_a_deferred_answer_waits_for_it(server):
    running = Served(server, inline=later_is_inline)
    later = running.later
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as sock:
            sock.sendall(
                b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
                b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 3\r\n\r\n"
            )
            assert later.deferred.acquire(timeout=WAIT), "the request was never deferred"
            threading.Timer(0.3, later.release.set).start()
            reader = sock.makefile("rb")
            assert read_response_any(reader) == (201, b"later|a")  # first, before any 100
            assert reader.readline().startswith(b"HTTP/1.1 100")
            assert reader.readline() == b"\r\n"
            sock.sendall(b"abc")
            assert read_response(reader) == b"abc"
    finally:
        running.stop()
