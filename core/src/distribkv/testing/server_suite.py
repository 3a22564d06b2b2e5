"""The HTTP-server conformance suite: every server plugin must pass all of it.

Import it into a test module of the server's distribution and name the server::

    # tests/test_conformance.py
    from distribkv.testing.server_suite import *  # noqa: F403

    pytest -p distribkv.testing --distribkv-server=myserver tests/

(or define a ``server_name`` fixture in that module, see :mod:`distribkv.testing`). The server
must be installed: the suite's nodes are processes that find it by name.

It has two parts:

- the server contract of :mod:`distribkv.http.api`, in this process: a small Falcon
  application served through ``spec.create(app, Listen(...))`` on a loopback host of the
  test's own — pipelining, bodies byte for byte, the body limit, a drain that lets running
  requests finish, requests ``Listen.inline`` names answered while every worker is busy
  (servers that declare ``ServerSpec.inline``), and deferred answers (servers that declare
  ``ServerSpec.deferred``);
- the node's HTTP behaviour on that server: real clusters (`distribkv launch`) whose nodes
  serve with it, on the backend under test (``--distribkv-backend``) — any node answers for
  any key, bytes end to end, limits and errors as JSON with real status codes, malformed and
  smuggling requests refused (RFC 9112) and the connection closed, redirects and proxying,
  replicas that refuse writes, batches, the access log, a taken address refused by name, and a
  drain on SIGTERM that loses no acknowledged write.

A server whose HTTP stack answers some malformed requests itself, in a way the node cannot
change, declares it in ``ServerSpec.stack_limits``; the suite allows exactly what is declared
there (see :func:`stack_answered`).
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import falcon
import msgpack
import pytest

from distribkv.hashing.modulo import fnv1_64
from distribkv.http.api import DEFER, PLAIN_PARSE_ERRORS, TE_OVERRIDES_CL, Listen, ServerSpec
from distribkv.http.wrapper import ServingWrapper
from distribkv.plugins import load_plugins
from distribkv.testing import cluster_fixture
from distribkv.testing.cluster import (
    Cluster,
    HostRange,
    NodeProcess,
    alive,
    allocate_hosts,
    call,
    node_addresses,
    q,
    wait_until,
    write_config,
)
from distribkv.testing.rawhttp import Answer, exchange

__all__ = [
    "MALFORMED_REQUESTS",
    "deferring",
    "proxy_cluster",
    "redirect_cluster",
    "served",
    "server_spec",
    "stack_answered",
    "test_a_100_continue_behind_a_deferred_answer_waits_for_it",
    "test_a_body_cut_short_by_a_half_close_is_a_400_in_json_and_logged",
    "test_a_body_over_a_limit_is_refused_by_its_length_before_it_is_sent",
    "test_a_body_over_the_limit_is_refused_without_calling_the_application",
    "test_a_deferred_answer_is_sent_once_in_order_and_counted_until_sent",
    "test_a_deferred_answer_outlasting_the_channel_timeout_is_still_sent",
    "test_a_deferred_answer_to_a_client_that_left_ends_the_request",
    "test_a_forwarded_request_for_a_foreign_key_gets_421",
    "test_a_key_set_through_any_node_is_read_through_any_node",
    "test_a_malformed_batch_is_a_4xx_with_a_json_body",
    "test_a_malformed_request_is_refused_in_json_and_the_connection_closed",
    "test_a_method_a_route_does_not_take_is_405_naming_the_allowed_ones",
    "test_a_replica_refuses_writes_and_points_to_its_leader",
    "test_a_request_routed_with_another_map_gets_409",
    "test_a_value_over_the_limit_is_refused_with_413_whether_sent_at_once_or_not",
    "test_a_wrong_shard_request_is_redirected_to_the_owner",
    "test_an_address_in_use_is_refused_with_its_name",
    "test_an_expect_100_continue_without_a_body_is_answered",
    "test_bad_requests_get_real_status_codes_with_json",
    "test_batch_in_msgpack_and_json",
    "test_cluster_and_status_describe_the_node",
    "test_delete_removes_the_key",
    "test_each_request_writes_one_access_log_line",
    "test_inline_requests_are_answered_while_every_worker_is_busy",
    "test_keys_and_values_round_trip_byte_exactly",
    "test_modulo_places_keys_as_the_go_original",
    "test_pipelined_requests_are_answered_in_order",
    "test_proxy_mode_forwards_and_returns_the_owners_status",
    "test_request_bodies_reach_the_application_byte_exactly",
    "test_sigterm_drains_in_flight_writes_and_nothing_acknowledged_is_lost",
    "test_stop_lets_a_running_request_finish",
    "test_stop_sends_the_deferred_answers_still_to_come",
    "test_the_nodes_are_served_by_the_server_under_test",
    "test_values_in_the_query_string_are_bytes_too",
]

WAIT = 10.0  # seconds any single step may take before the test fails


# --- the server contract, in process ------------------------------------------------------


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


def later_is_inline(method: str, path: str, query: str) -> bool:
    return fast_is_inline(method, path, query) or path == "/later"


def poll(predicate, what: str) -> None:
    """Wait for ``predicate`` for at most ``WAIT`` seconds."""
    wait_until(predicate, WAIT, interval=0.02, message=what)


class Served:
    """A test application served by ``spec`` on ``host`` from a thread of this process.

    The application is wrapped in a :class:`ServingWrapper` here (a server uses a wrapper it
    is given as it is), so the tests see what it counts in flight."""

    def __init__(self, spec: ServerSpec, host: str, *, threads: int = 2, **listen):
        self.spec = spec
        self.host = host
        self.slow, self.echo, self.later = Slow(), Echo(), Deferring()
        app = falcon.App()
        app.add_route("/later", self.later)
        app.add_route("/fast", Fast())
        app.add_route("/slow", self.slow)
        app.add_route("/echo", self.echo)
        self.wrapper = ServingWrapper(app)
        inline = listen.pop("inline", fast_is_inline)
        with socket.socket() as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.handle = spec.create(
            self.wrapper,
            Listen(
                host,
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
        raise AssertionError(f"{spec.name} did not answer within {WAIT}s")

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=WAIT)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=WAIT)

    def get(self, target: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def put_deferred(self, body: bytes) -> http.client.HTTPConnection:
        """A connection whose PUT /later has been deferred (its answer not yet sent)."""
        conn = self.connection()
        conn.request("PUT", "/later", body=body)
        assert self.later.deferred.acquire(timeout=WAIT), "the request was never deferred"
        return conn

    def stop(self) -> None:
        self.slow.release.set()
        self.later.release.set()
        self.handle.stop()
        self.runner.join(timeout=3 * WAIT)
        assert not self.runner.is_alive(), "run() did not return after stop()"


@pytest.fixture
def server_spec(server_name: str) -> ServerSpec:
    """The ``ServerSpec`` of the server under test."""
    return load_plugins().http_server(server_name)


@pytest.fixture
def served(server_spec: ServerSpec, hosts: HostRange) -> Iterator[Served]:
    running = Served(server_spec, hosts.host())
    yield running
    running.stop()


def needs_deferred(spec: ServerSpec) -> None:
    if not spec.deferred:
        pytest.skip(f"server {spec.name!r} does not offer deferred answers")


def test_inline_requests_are_answered_while_every_worker_is_busy(server_spec, served):
    if not server_spec.inline:
        pytest.skip(f"server {server_spec.name!r} serves every request with a worker")
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
    # The slow requests ran on worker threads, never on the thread that answered the reads.
    inline_thread = answers[0][1].split(b"|")[0]
    assert all(body.split(b"|")[0] != inline_thread for _, body in results), results


def test_pipelined_requests_are_answered_in_order(served):
    served.slow.release.set()
    targets = ["/fast?i=1", "/slow", "/fast?i=2", "/fast?i=3", "/slow", "/fast?i=4"]
    raw = "".join(f"GET {t} HTTP/1.1\r\nHost: x\r\n\r\n" for t in targets).encode()
    with served.connect() as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        bodies = [read_response(reader) for _ in targets]
    assert [b.split(b"|")[1] for b in bodies] == [b"1", b"True", b"2", b"3", b"True", b"4"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_request_bodies_reach_the_application_byte_exactly(served, chunked):
    value = bytes(range(256)) * 300 + b"\x00end"
    conn = served.connection()
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


def test_a_body_over_the_limit_is_refused_without_calling_the_application(server_spec, hosts):
    running = Served(server_spec, hosts.host(), max_request_body_size=1000)
    try:
        conn = running.connection()
        conn.request("PUT", "/echo", body=b"x" * 1001)
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == "body too large"
        conn.close()
        assert running.echo.calls == 0
        # One byte less is the application's.
        conn = running.connection()
        conn.request("PUT", "/echo", body=b"x" * 1000)
        assert conn.getresponse().status == 200
        conn.close()
        assert running.echo.calls == 1
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
    served.runner.join(timeout=3 * WAIT)
    assert not served.runner.is_alive(), "run() did not return after the drain"


def test_a_deferred_answer_is_sent_once_in_order_and_counted_until_sent(server_spec, hosts):
    needs_deferred(server_spec)
    running = Served(server_spec, hosts.host(), inline=later_is_inline)
    later = running.later
    wrapper = running.wrapper
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
        poll(lambda: wrapper.in_flight == 0, "a deferred request stayed counted")
        # Pipelined behind a deferred request, a request is answered after it.
        later.release.clear()
        raw = (
            b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
            b"GET /fast?i=4 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        with running.connect() as sock:
            sock.sendall(raw)
            # Released a moment later (whether it is deferred or, pipelined, served by a
            # worker): a server that answered the next request first would have done so by then.
            threading.Timer(0.2, later.release.set).start()
            reader = sock.makefile("rb")
            assert read_response_any(reader) == (201, b"later|a")
            status, body = read_response_any(reader)
            assert status == 200 and body.endswith(b"|4")
        # HTTP/1.0 without keep-alive: the connection closes after the deferred answer.
        poll(later.release.is_set, "the deferred request was released")
        with running.connect() as sock:
            sock.sendall(b"PUT /later HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.split(b" ", 2)[1] == b"201" and received.endswith(b"\r\n\r\nlater|abc")
        for finisher in later.finishers:
            finisher.join(WAIT)
        poll(lambda: wrapper.in_flight == 0, "a deferred request stayed counted")
    finally:
        running.stop()


@pytest.fixture
def deferring(server_spec, hosts):
    """The server under test, serving /later inline and answering it later (a server that
    cannot defer answers skips the test)."""
    needs_deferred(server_spec)
    running = Served(server_spec, hosts.host(), inline=later_is_inline)
    yield running
    running.stop()


def test_a_deferred_answer_to_a_client_that_left_ends_the_request(deferring):
    running = deferring
    later = running.later
    with running.connect() as sock:
        sock.sendall(b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
        assert later.deferred.acquire(timeout=WAIT), "the request was never deferred"
    later.release.set()  # answered after the client went away
    poll(
        lambda: running.wrapper.in_flight == 0,
        "the request of a client that left stayed counted",
    )
    status, body = running.get("/fast?i=5")  # and the server goes on serving
    assert status == 200 and body.endswith(b"|5")


def test_stop_sends_the_deferred_answers_still_to_come(deferring):
    running = deferring
    later = running.later
    conn = running.put_deferred(b"last")
    running.handle.stop()
    # Released once the drain is under way: it must wait for this answer.
    threading.Timer(0.3, later.release.set).start()
    response = conn.getresponse()
    assert (response.status, response.read()) == (201, b"later|last")
    conn.close()
    running.runner.join(timeout=3 * WAIT)
    assert not running.runner.is_alive(), "run() did not return after the drain"


def test_a_deferred_answer_outlasting_the_channel_timeout_is_still_sent(server_spec, hosts):
    needs_deferred(server_spec)
    running = Served(server_spec, hosts.host(), inline=later_is_inline, channel_timeout=1.0)
    later = running.later
    try:
        conn = running.put_deferred(b"slow")
        # Past the timeout and the next clean-up (every second): a connection waiting for
        # its answer is not an idle one. What is tested is a time that passes, so this waits.
        time.sleep(2.5)
        later.release.set()
        response = conn.getresponse()
        assert (response.status, response.read()) == (201, b"later|slow")
        conn.close()
    finally:
        running.stop()


def test_a_100_continue_behind_a_deferred_answer_waits_for_it(deferring):
    running = deferring
    later = running.later
    with running.connect() as sock:
        sock.sendall(
            b"PUT /later HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\n"
        )
        assert later.deferred.acquire(timeout=WAIT), "the request was never deferred"
        # Released a moment later: a 100 sent before the deferred answer would be first.
        threading.Timer(0.3, later.release.set).start()
        reader = sock.makefile("rb")
        assert read_response_any(reader) == (201, b"later|a")  # first, before any 100
        assert reader.readline().startswith(b"HTTP/1.1 100")
        assert reader.readline() == b"\r\n"
        sock.sendall(b"abc")
        assert read_response(reader) == b"abc"


# --- the node on this server: real clusters ------------------------------------------------


#: The two clusters the module's tests share (write_config's arguments).
REDIRECT_LAYOUT = {"shards": 2, "replicas": {0: 1}, "extra": "max_value_size = 100000"}
PROXY_LAYOUT = {"shards": 3, "replicas": {1: 1}, "routing": "proxy", "hashing": "ring"}


def _shared_cluster(factory, name: str, backend: str, server: str, layout: dict[str, Any]):
    """A cluster of ``layout`` on hosts of its own, served by ``server``, stopped and checked
    to leave no node behind at the end."""
    with allocate_hosts() as hosts:
        path = write_config(
            factory.mktemp(name), hosts=hosts, backend=backend, server=server, **layout
        )
        cluster = Cluster(path).start()
        yield cluster
        assert cluster.stop() == 0, "".join(cluster.output)
        assert not [pid for pid in cluster.pids if alive(pid)]


@cluster_fixture
def redirect_cluster(tmp_path_factory, backend_name, server_name) -> Iterator[Cluster]:
    """Two shards (modulo), shard-0 with one read-only replica; routing = redirect."""
    yield from _shared_cluster(
        tmp_path_factory, "redirect", backend_name, server_name, REDIRECT_LAYOUT
    )


@cluster_fixture
def proxy_cluster(tmp_path_factory, backend_name, server_name) -> Iterator[Cluster]:
    """Three shards (ring), shard-1 with one replica; routing = proxy."""
    yield from _shared_cluster(tmp_path_factory, "proxy", backend_name, server_name, PROXY_LAYOUT)


def leaders(cluster: Cluster) -> list[str]:
    names = sorted(k.split("/")[0] for k in cluster.nodes if k.endswith("/leader"))
    return [cluster.address(name) for name in names]


def owner_index(key: bytes, shards: int) -> int:
    """The shard that owns ``key`` under modulo (the redirect cluster's scheme)."""
    return fnv1_64(key) % shards


def owner_of(cluster: Cluster, key: bytes) -> int:
    """The shard that owns ``key`` in ``cluster``, as its node shard-0 names it."""
    response = call(cluster.address("shard-0"), "GET", f"/get?key={q(key)}")
    return int(response.headers.get("x-distribkv-shard", "shard-0").split("-")[1])


def test_the_nodes_are_served_by_the_server_under_test(redirect_cluster, server_name):
    logs = redirect_cluster.config.parent / "data" / "logs"
    for name in redirect_cluster.nodes:
        log = (logs / f"{name.replace('/', '-')}.log").read_text()
        address = redirect_cluster.nodes[name]["ADDRESS"]
        assert f"serving on http://{address} with {server_name}" in log, log[-2000:]


def test_a_key_set_through_any_node_is_read_through_any_node(redirect_cluster):
    nodes = leaders(redirect_cluster)
    rng = random.Random(3)
    keys = {b"key-%d" % i: rng.randbytes(rng.randint(0, 300)) for i in range(40)}
    for i, (key, value) in enumerate(keys.items()):
        response = call(nodes[i % 2], "PUT", f"/set?key={q(key)}", body=value, follow=2)
        assert response.status == 200, response
    for node in nodes:
        for key, value in keys.items():
            response = call(node, "GET", f"/get?key={q(key)}", follow=2)
            assert (response.status, response.body) == (200, value)


def test_a_wrong_shard_request_is_redirected_to_the_owner(redirect_cluster):
    nodes = leaders(redirect_cluster)
    key = b"Soviet"  # FNV-1 64 mod 2 == 1: owned by shard-1
    response = call(nodes[0], "PUT", f"/set?key={key.decode()}", body=b"ussr")
    assert response.status == 307
    assert response.headers["location"] == f"http://{nodes[1]}/set?key=Soviet"
    assert response.headers["x-distribkv-shard"] == "shard-1"
    assert json.loads(response.body)["error"] == "wrong shard"
    assert call(nodes[0], "PUT", "/set?key=Soviet", body=b"ussr", follow=1).status == 200
    assert call(nodes[1], "GET", "/get?key=Soviet").body == b"ussr"


def test_modulo_places_keys_as_the_go_original(redirect_cluster):
    """Each key lives on shard FNV-1-64(key) mod N: the node that does not own it redirects."""
    nodes = leaders(redirect_cluster)
    vectors = [b"USA", b"Soviet", b"a", b"ab", b"abc", b"foobar", b"Moscow", b"\xff\x00"]
    assert owner_index(b"USA", 2) == 0 and owner_index(b"Soviet", 2) == 1
    for key in vectors:
        owner = owner_index(key, 2)
        for i, node in enumerate(nodes):
            response = call(node, "GET", f"/get?key={q(key)}")
            if i == owner:
                assert response.status in (200, 404), (key, response)
            else:
                assert response.status == 307
                assert response.headers["location"].startswith(f"http://{nodes[owner]}/")


EDGE_KEYS = [
    b"\xff\xfe",
    b"\xfe\xff",
    b"/",
    b"a/b",
    b"&",
    b"a&b=c",
    b"+",
    b"a b",
    b"\x00",
    b"a\x00b",
    b"%FF",
    b"%2F",
    "ключ".encode(),
    b"k" * 511,
]


def test_keys_and_values_round_trip_byte_exactly(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    for i, key in enumerate(EDGE_KEYS):
        value = bytes([i]) + b"\x00\xff%FF&/+ " + key
        assert call(node, "PUT", f"/set?key={q(key)}", body=value, follow=1).status == 200
    for i, key in enumerate(EDGE_KEYS):
        response = call(node, "GET", f"/get?key={q(key)}", follow=1)
        assert response.status == 200, (key, response)
        assert response.body == bytes([i]) + b"\x00\xff%FF&/+ " + key
        assert response.headers["content-type"] == "application/octet-stream"
    # %FF%FE and %FE%FF are two keys, not one replaced-character key.
    a = call(node, "GET", "/get?key=%FF%FE", follow=1).body
    b = call(node, "GET", "/get?key=%FE%FF", follow=1).body
    assert a != b


def test_values_in_the_query_string_are_bytes_too(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    assert call(node, "GET", "/set?key=USA&value=%00%FF%26+x", follow=1).status == 200
    assert call(node, "GET", "/get?key=USA", follow=1).body == b"\x00\xff& x"


@pytest.mark.parametrize(
    ("target", "status", "error"),
    [
        ("/get?key=" + "k" * 512, 414, "key too long"),
        ("/get?key=", 400, "empty key"),
        ("/get", 400, "missing key"),
        ("/get?key=a&key=b", 400, "bad request"),
        ("/get?key=never-written-USA", None, "not found"),
        ("/set?key=USA", 400, "missing value"),
        ("/nowhere", 404, "not found"),
        ("/get?key=%ZZ", 400, "bad request"),
        ("/get?key=ab%", 400, "bad request"),
    ],
)
def test_bad_requests_get_real_status_codes_with_json(redirect_cluster, target, status, error):
    response = call(leaders(redirect_cluster)[0], "GET", target, follow=1)
    assert response.status == (status or 404), response
    body = json.loads(response.body)
    if error:
        assert body["error"] == error


def test_a_method_a_route_does_not_take_is_405_naming_the_allowed_ones(redirect_cluster):
    response = call(leaders(redirect_cluster)[0], "PATCH", "/get?key=USA")
    assert response.status == 405
    body = json.loads(response.body)
    assert body["error"] == "method not allowed"
    assert "PATCH is not allowed on /get" in body["detail"] and "GET" in body["detail"]


def test_a_value_over_the_limit_is_refused_with_413_whether_sent_at_once_or_not(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    response = call(node, "PUT", "/set?key=USA", body=b"x" * 100_001)
    assert response.status == 413
    assert json.loads(response.body)["error"] == "value too large"
    # A client that sends a large body at once (no Expect: 100-continue) gets its answer, not a
    # connection closed under it.
    response = call(node, "PUT", "/set?key=USA", body=b"x" * 20_000_000)
    assert response.status == 413
    assert json.loads(response.body)["error"] == "value too large"
    assert call(node, "PUT", "/set?key=USA", body=b"x" * 100_000).status == 200


def _headers_only(address: str, head: bytes) -> bytes:
    """Send a request's headers and no body; what the node answers within 10 s (it must
    answer without waiting for the body)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            if time.monotonic() > deadline:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("target", "length", "error"),
    [
        ("/set?key=USA", 20_000_000, "value too large"),
        ("/batch", 64 * 1024 * 1024 + 1, "batch too large"),
        ("/set?key=USA", 70 * 1024 * 1024, "value too large"),
        ("/anything", 70 * 1024 * 1024, "body too large"),
    ],
)
def test_a_body_over_a_limit_is_refused_by_its_length_before_it_is_sent(
    redirect_cluster, target, length, error
):
    node = leaders(redirect_cluster)[0]
    answer = _headers_only(
        node,
        f"PUT {target} HTTP/1.1\r\nHost: {node}\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n".encode(),
    )
    # No 100 Continue first: the client is not asked for a body that would be refused.
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"] == error
    assert str(length).encode() in body or error == "body too large"


def test_delete_removes_the_key(redirect_cluster):
    node = leaders(redirect_cluster)[1]
    assert call(node, "PUT", "/set?key=gone", body=b"v", follow=1).status == 200
    assert call(node, "DELETE", "/delete?key=gone", follow=1).status == 200
    assert call(node, "GET", "/get?key=gone", follow=1).status == 404
    assert call(node, "POST", "/delete?key=gone", follow=1).status == 200


def test_a_replica_refuses_writes_and_points_to_its_leader(redirect_cluster, proxy_cluster):
    replica = redirect_cluster.address("shard-0", "replica-0")
    response = call(replica, "PUT", "/set?key=USA", body=b"v")
    assert response.status == 307
    assert response.headers["location"].startswith(f"http://{redirect_cluster.address('shard-0')}/")
    # With proxy routing the replica answers 403 and names the leader.
    replica = proxy_cluster.address("shard-1", "replica-0")
    key = next(k for k in (b"k%d" % i for i in range(1000)) if owner_of(proxy_cluster, k) == 1)
    response = call(replica, "PUT", f"/set?key={q(key)}", body=b"v")
    assert response.status == 403
    body = json.loads(response.body)
    assert body["leader"] == proxy_cluster.address("shard-1")
    assert proxy_cluster.address("shard-1") in body["detail"]


def test_a_request_routed_with_another_map_gets_409(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    cluster = json.loads(call(node, "GET", "/cluster").body)
    assert call(
        node, "GET", "/get?key=USA", headers={"X-Distribkv-Map": cluster["fingerprint"]}, follow=1
    ).status in (200, 404)
    response = call(node, "GET", "/get?key=USA", headers={"X-Distribkv-Map": "0123456789abcdef"})
    assert response.status == 409
    body = json.loads(response.body)
    assert body["ours"] == cluster["fingerprint"] and body["yours"] == "0123456789abcdef"
    # Spelled with underscores it is not the map header (servers drop such names), whichever
    # way the node answers the read: from a fast path (a stored key) or the application.
    underscores = {"X_Distribkv_Map": "0123456789abcdef"}
    assert call(node, "PUT", "/set?key=USA", body=b"v").status == 200
    assert call(node, "GET", "/get?key=USA", headers=underscores).status == 200
    absent = call(node, "GET", "/get?key=absent-USA-0", headers=underscores, follow=1)
    assert absent.status == 404


def test_cluster_and_status_describe_the_node(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    cluster = json.loads(call(node, "GET", "/cluster").body)
    assert [s["leader"] for s in cluster["shards"]] == leaders(redirect_cluster)
    assert cluster["hashing"] == "modulo"
    status = json.loads(call(node, "GET", "/status").body)
    assert status["role"] == "leader" and status["shard"] == "shard-0"
    assert status["fingerprint"] == cluster["fingerprint"]
    assert call(node, "GET", "/healthz").body == b"ok\n"


def test_batch_in_msgpack_and_json(redirect_cluster):
    nodes = leaders(redirect_cluster)
    keys = [k for k in (b"batch-%d\xff" % i for i in range(40)) if owner_index(k, 2) == 0][:5]
    ops = [["set", k, b"\x00v" + k] for k in keys] + [["get", keys[0]], ["delete", keys[1]]]
    response = call(
        nodes[0],
        "POST",
        "/batch",
        body=msgpack.packb({"ops": ops}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 200, response
    results = msgpack.unpackb(response.body)["results"]
    # Gets read the state before the batch's writes.
    assert results == [True] * 5 + [None, True]
    response = call(
        nodes[0],
        "POST",
        "/batch",
        body=msgpack.packb({"ops": [["get", k] for k in keys]}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert msgpack.unpackb(response.body)["results"] == [
        b"\x00v" + keys[0],
        None,
        *[b"\x00v" + k for k in keys[2:]],
    ]
    # JSON with base64, sent to the wrong shard as a whole: redirected with its body.
    doc = {"encoding": "base64", "ops": [["get", base64.b64encode(k).decode()] for k in keys]}
    response = call(
        nodes[1],
        "POST",
        "/batch",
        body=json.dumps(doc).encode(),
        follow=1,
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200
    assert json.loads(response.body)["results"][0] == base64.b64encode(b"\x00v" + keys[0]).decode()
    # In JSON without base64, a stored value that is not UTF-8 comes back as {"base64": ...}.
    text_keys = [
        k for k in (f"batch-text-{i}" for i in range(40)) if owner_index(k.encode(), 2) == 0
    ]
    ops = [["set", text_keys[0], b"\xff\xfe"], ["set", text_keys[1], "caf\u00e9".encode()]]
    response = call(
        nodes[0],
        "POST",
        "/batch",
        body=msgpack.packb({"ops": ops}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 200, response
    gets = {"ops": [["get", text_keys[0]], ["get", text_keys[1]], ["get", text_keys[2]]]}
    response = call(nodes[0], "POST", "/batch", body=json.dumps(gets).encode(), follow=1)
    assert response.status == 200, response
    assert json.loads(response.body)["results"] == [{"base64": "//4="}, "caf\u00e9", None]
    # One batch for two shards is refused, naming the owners.
    mixed = {"ops": [["get", "USA"], ["get", "Soviet"]]}
    response = call(nodes[0], "POST", "/batch", body=json.dumps(mixed).encode())
    assert response.status == 421
    doc = json.loads(response.body)
    assert doc["error"] == "batch spans shards"
    assert doc["owners"] == ["shard-0", "shard-1"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b'{"ops": [["set", "\\ud800", "v"]]}', "application/json", 400, "bad batch"),
        (
            b'{"ops": [["get", "k"]], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            None,
            400,
            "bad batch",
        ),
        (b'{"ops": [["get", "k"]]}', "text/plain", 415, "unsupported media type"),
        (
            b'{"ops": [["get", "k"]]}',
            "application/x-www-form-urlencoded",
            415,
            "unsupported media type",
        ),
        (b"\xc1", "application/msgpack", 400, "bad batch"),
        (b'{"ops": "none"}', "application/json; charset=utf-8", 400, "bad batch"),
    ],
    ids=["lone-surrogate", "deep-nesting", "text-plain", "form", "bad-msgpack", "no-ops-list"],
)
def test_a_malformed_batch_is_a_4xx_with_a_json_body(
    redirect_cluster, body, content_type, status, error
):
    node = leaders(redirect_cluster)[0]
    headers = {"Content-Type": content_type} if content_type else {}
    response = call(node, "POST", "/batch", body=body, headers=headers)
    assert response.status == status, response
    assert json.loads(response.body)["error"] == error
    assert call(node, "GET", "/healthz").status == 200


#: What a smuggling request carries after its own body: never to be answered.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

#: Malformed requests (RFC 9112) that every server refuses, with the status the node gives
#: each, in its JSON form; the connection closes after the answer, and nothing that follows
#: on it (a smuggled request) is answered.
MALFORMED_REQUESTS: dict[str, tuple[bytes, int]] = {
    "content-length-and-chunked": (
        b"POST /set?key=smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "chunked-then-content-length": (
        b"POST /set?key=smuggled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "chunked-twice": (
        b"POST /set?key=smuggled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "gzip-then-chunked": (
        b"POST /set?key=smuggled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "chunked-then-identity": (
        b"POST /set?key=smuggled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "chunked-in-http-1.0": (
        b"POST /set?key=smuggled HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + SMUGGLED,
        400,
    ),
    "bad-chunk-size": (
        b"PUT /set?key=smuggled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nab\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    "http-9.9": (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n" + SMUGGLED, 505),
    "http-0.9": (b"GET /\r\n", 400),
    "nul-in-target": (b"GET /get?key=a\x00b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    "escape-in-target": (b"GET /get?key=a\x1bb HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    "raw-byte-over-7f-in-target": (
        b"GET /get?key=a\xffb HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED,
        400,
    ),
    "folded-header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED,
        400,
    ),
    "two-content-lengths": (
        b"PUT /set?key=smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab" + SMUGGLED,
        400,
    ),
}


def stack_answered(spec: ServerSpec, answer: Answer) -> bool:
    """True for an answer of the server's HTTP stack that the server declares it cannot make
    the node's (``PLAIN_PARSE_ERRORS``): 400, 414 or 431 with an empty body, and without the
    Server header that every answer of the node has."""
    return (
        PLAIN_PARSE_ERRORS in spec.stack_limits
        and answer.status in (400, 414, 431)
        and not answer.body
        and "server" not in answer.headers
    )


@pytest.mark.parametrize("case", list(MALFORMED_REQUESTS))
def test_a_malformed_request_is_refused_in_json_and_the_connection_closed(
    redirect_cluster, server_spec, case
):
    raw, status = MALFORMED_REQUESTS[case]
    node = leaders(redirect_cluster)[0]
    answers, closed = exchange(node, raw, timeout=WAIT)
    assert closed, f"the connection stayed open after {answers}"
    assert len(answers) == 1, f"answered what followed the malformed request: {answers}"
    (answer,) = answers
    if stack_answered(server_spec, answer):
        pass  # the stack's own 400, 414 or 431: declared, and a 4xx
    elif case.startswith(("content-length-and", "chunked-then-content")) and (
        TE_OVERRIDES_CL in server_spec.stack_limits
    ):
        # Served by its Transfer-Encoding alone, and the connection closed after it.
        assert answer.status < 500, answer
    else:
        assert answer.status == status, answer
        assert answer.headers["content-type"] == "application/json"
        assert json.loads(answer.body)["error"]
    assert call(node, "GET", "/healthz").status == 200


@pytest.mark.parametrize(
    ("target", "content_type", "body"),
    [("/set?key=cut-USA", None, b"abc"), ("/batch", "application/json", b'{"ops": [["get"')],
    ids=["set", "batch"],
)
def test_a_body_cut_short_by_a_half_close_is_a_400_in_json_and_logged(
    redirect_cluster, target, content_type, body
):
    node = leaders(redirect_cluster)[0]
    log_file = redirect_cluster.config.parent / "data" / "logs" / "shard-0-leader.log"
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
    if content_type:
        head = head.replace("PUT", "POST") + f"Content-Type: {content_type}\r\n"
    before = _access_log_after(node, log_file, f"cut-{target[1:4]}-before")
    answers, closed = exchange(node, head.encode() + b"\r\n" + body, half_close=True)
    assert [a.status for a in answers] == [400], answers
    assert json.loads(answers[0].body)["error"] == "body cut short"
    assert closed
    after = _access_log_after(node, log_file, f"cut-{target[1:4]}-after")
    line = f" {head.split()[0]} {target.split('?')[0]} 400 "
    assert after.count(line) - before.count(line) == 1, after[-2000:]
    assert call(node, "GET", "/get?key=cut-USA", follow=1).status == 404  # nothing stored


def test_an_expect_100_continue_without_a_body_is_answered(redirect_cluster):
    # waitress sent a 100 Continue to such a request and then waited for a body.
    node = leaders(redirect_cluster)[0]
    head = b"POST /status HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
    answers, _ = exchange(node, head + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", expect=2)
    assert [a.status for a in answers] == [405, 200], answers


def _access_log_after(node: str, log_file, tag: str) -> str:
    """The node's log once every access-log line before now is in it: lines are written in
    order, in batches by a background thread, so a marker request's line comes after them."""
    call(node, "GET", f"/access-log-marker-{tag}")
    line = f" GET /access-log-marker-{tag} 404 "
    wait_until(lambda: line in log_file.read_text(), 5, message=f"the line {line.strip()!r}")
    return log_file.read_text()


def test_each_request_writes_one_access_log_line(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    log_file = redirect_cluster.config.parent / "data" / "logs" / "shard-0-leader.log"

    def written(tag: str) -> str:
        return _access_log_after(node, log_file, tag)

    lines = (
        " GET /nonexistent-path 404 ",
        " PUT /set 200 ",
        " GET /get 200 ",
        " GET /healthz 200 ",
    )
    before = written("before")
    call(node, "GET", "/nonexistent-path")
    # The fast paths log too: a leader's write and read of a key it owns ("USA" is shard 0's).
    assert call(node, "PUT", "/set?key=USA", body=b"v").status == 200
    assert call(node, "GET", "/get?key=USA").status == 200
    assert call(node, "GET", "/healthz").status == 200
    after = written("after")
    assert [after.count(line) - before.count(line) for line in lines] == [1, 1, 1, 1]


def test_proxy_mode_forwards_and_returns_the_owners_status(proxy_cluster):
    nodes = [proxy_cluster.address(f"shard-{i}") for i in range(3)]
    for i in range(30):
        key = b"proxied-%d\x00" % i
        value = b"value-%d\xff" % i
        entry = nodes[i % 3]
        assert call(entry, "PUT", f"/set?key={q(key)}", body=value).status == 200
        for node in nodes:
            response = call(node, "GET", f"/get?key={q(key)}")
            assert (response.status, response.body) == (200, value)
            assert response.headers["content-type"] == "application/octet-stream"
    for node in nodes:
        response = call(node, "GET", "/get?key=never-written")
        assert response.status == 404
        assert json.loads(response.body)["error"] == "not found"


def test_a_forwarded_request_for_a_foreign_key_gets_421(proxy_cluster):
    nodes = [proxy_cluster.address(f"shard-{i}") for i in range(3)]
    key = b"misrouted"
    owner = owner_of(proxy_cluster, key)
    other = nodes[(owner + 1) % 3]
    response = call(other, "GET", f"/get?key={q(key)}", headers={"X-Distribkv-Hop": "test"})
    assert response.status == 421
    assert json.loads(response.body)["owner"] == f"shard-{owner}"


def test_an_address_in_use_is_refused_with_its_name(redirect_cluster, server_name, tmp_path):
    # Another data directory, so that only the address is shared with the running node.
    taken = redirect_cluster.address("shard-1")
    other = tmp_path / "sharding.toml"
    other.write_text(
        redirect_cluster.config.read_text().replace('data_dir = "data"', f'data_dir = "{tmp_path}"')
    )
    result = subprocess.run(
        [sys.executable, "-m", "distribkv", "serve", "--config", str(other), "--shard", "shard-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot serve on {taken} with {server_name}: Address already in use" in result.stderr
    assert call(taken, "GET", "/healthz").status == 200


def test_sigterm_drains_in_flight_writes_and_nothing_acknowledged_is_lost(
    tmp_path, hosts, backend_name, backend_spec, server_name
):
    if not backend_spec.capabilities.persistent:
        pytest.skip(f"backend {backend_name!r} keeps nothing across a restart")
    path = write_config(tmp_path, hosts=hosts, shards=1, backend=backend_name, server=server_name)
    address = node_addresses(path)["shard-0/leader"]
    node = NodeProcess(path, "shard-0").start(address)
    acknowledged: list[bytes] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        for i in range(5000):  # bounded; ends early when the node stops answering
            if stop.is_set():
                return
            key = f"drain-{worker}-{i}".encode()
            try:
                status = call(address, "PUT", f"/set?key={q(key)}", body=key, timeout=5).status
            except OSError:
                return
            if status == 200:
                acknowledged.append(key)
            elif status != 503:
                raise AssertionError(f"unexpected status {status}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 200, 30, message="200 writes acknowledged")
    assert node.stop() == 0
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    log = node.log_path.read_text()
    assert "stopped serving" in log, log[-2000:]

    node.start(address)
    try:
        missing = [
            key for key in acknowledged if call(address, "GET", f"/get?key={q(key)}").status != 200
        ]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    finally:
        assert node.stop() == 0
