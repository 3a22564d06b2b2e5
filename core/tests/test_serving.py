"""In-process tests of the serving layer: orderly shutdown, tokens, bind safety."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import falcon
import falcon.testing
import pytest

from distribkv.config import ConfigError, load_cluster_token, parse_config
from distribkv.http.api import Listen
from distribkv.http.app import create_app
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.servers.waitress import WaitressHandle

CONFIG = """
[storage]
backend = "memory"
[[shards]]
name = "s0"
idx = 0
address = "{address}"
"""


class Slow:
    def on_get(self, req, resp):
        time.sleep(float(req.get_param("s") or 0))
        resp.data = b"done"


def get(port: int, target: str, results: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        results.append((response.status, response.read()))
    except OSError as exc:
        results.append(exc)
    finally:
        conn.close()


def test_stop_finishes_in_flight_requests_then_returns():
    app = falcon.App()
    app.add_route("/slow", Slow())
    handle = WaitressHandle(app, Listen("127.0.0.1", 0, settings={"drain_timeout": 10}))
    runner = threading.Thread(target=handle.run)
    runner.start()
    results: list = []
    client = threading.Thread(target=get, args=(handle.port, "/slow?s=0.8", results))
    client.start()
    deadline = time.monotonic() + 5
    while handle.wrapper.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.wrapper.in_flight == 1
    handle.stop()
    runner.join(timeout=15)
    client.join(timeout=15)
    assert not runner.is_alive(), "run() did not return after stop()"
    assert results == [(200, b"done")]
    late: list = []
    get(handle.port, "/slow", late)
    assert isinstance(late[0], ConnectionRefusedError)


def node_for(tmp_path: Path, address: str, environ: dict[str, str] | None = None) -> Node:
    path = tmp_path / "sharding.toml"
    path.write_text(CONFIG.format(address=address))
    registry = load_plugins()
    return Node(
        parse_config(path.read_text(), path), "s0", registry=registry, environ=environ or {}
    )


def test_a_non_loopback_address_needs_a_cluster_token_auth_and_tls(tmp_path):
    # 192.0.2.0/24 is reserved for documentation: nothing is bound or contacted here.
    with pytest.raises(ConfigError, match="not a loopback address, and no cluster token"):
        node_for(tmp_path, "192.0.2.10:8080")
    with pytest.raises(ConfigError, match=r"and no \[auth\] table gives client tokens; no \[tls\]"):
        node_for(tmp_path, "192.0.2.10:8080", {"DISTRIBKV_CLUSTER_TOKEN": "s" * 32})
    node = node_for(tmp_path, "127.0.0.2:8080", {"DISTRIBKV_CLUSTER_TOKEN": "s" * 32})
    assert node.token == "s" * 32


def test_token_files_must_be_private(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_cluster_token({"DISTRIBKV_CLUSTER_TOKEN_FILE": str(token_file)})
    os.chmod(token_file, 0o600)
    assert load_cluster_token({"DISTRIBKV_CLUSTER_TOKEN_FILE": str(token_file)}) == (
        "0123456789abcdef0123"
    )
    with pytest.raises(ConfigError, match="at least 16"):
        load_cluster_token({"DISTRIBKV_CLUSTER_TOKEN": "short"})


def test_purge_requires_the_token_when_one_is_set(tmp_path):
    node = node_for(tmp_path, "127.0.0.2:8080", {"DISTRIBKV_CLUSTER_TOKEN": "t" * 20}).open()
    client = falcon.testing.TestClient(create_app(node))
    assert client.simulate_get("/purge").status_code == 401
    assert client.simulate_get("/purge", headers={"X-Distribkv-Token": "x" * 20}).status_code == 401
    ok = client.simulate_get("/purge", headers={"X-Distribkv-Token": "t" * 20})
    assert ok.status_code == 200 and ok.json["deleted"] == 0
    bearer = client.simulate_get("/purge", headers={"Authorization": "Bearer " + "t" * 20})
    assert bearer.status_code == 200
    node.close()


def test_unexpected_errors_are_500_without_details(tmp_path, monkeypatch):
    node = node_for(tmp_path, "127.0.0.2:8080").open()
    client = falcon.testing.TestClient(create_app(node))

    def explode(key):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(node, "get", explode)
    response = client.simulate_get("/get", query_string="key=a")
    assert response.status_code == 500
    assert response.json == {"error": "internal error", "detail": "see the node's log"}
    assert "secret" not in response.text
    node.close()


def test_a_refusing_wrapper_answers_503_without_calling_the_application():
    from distribkv.http.wrapper import ServingWrapper

    calls = []

    def app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    wrapper = ServingWrapper(app)
    statuses = []
    environ = {"PATH_INFO": "/get", "REQUEST_METHOD": "GET"}
    assert wrapper(environ, lambda status, headers, exc_info=None: statuses.append(status)) == [
        b"ok"
    ]
    wrapper.refuse()
    body = wrapper(environ, lambda status, headers, exc_info=None: statuses.append(status))
    wrapper.close()
    assert calls == ["/get"]
    assert statuses == ["200 OK", "503 Service Unavailable"]
    assert json.loads(b"".join(body))["error"] == "stopping" and wrapper.in_flight == 0


def test_the_wrapper_ignores_a_deferred_requests_own_answer_and_answers_a_failure_once():
    from distribkv.http.api import DEFER
    from distribkv.http.wrapper import INTERNAL_ERROR, ServingWrapper

    finished = []
    deferred = []

    class Completion:
        def finish(self, status, headers, body):
            finished.append((status, headers, body))

    def app(environ, start_response):
        deferred.append(environ[DEFER]())
        if environ["PATH_INFO"] == "/fail":
            raise RuntimeError("failed after deferring")
        start_response("500 Internal Server Error", [("Content-Length", "7")])
        return [b"ignored"]

    wrapper = ServingWrapper(app)
    started = []

    def start_response(status, headers, exc_info=None):
        started.append(status)

    def environ(path):
        return {"PATH_INFO": path, "REQUEST_METHOD": "PUT", DEFER: Completion}

    # Deferred: what the application answers itself goes nowhere; the completion answers.
    asked = environ("/later")
    assert wrapper(asked, start_response) == [] and started == []
    assert DEFER not in asked  # no reference cycle left from the environ to the request
    assert wrapper.in_flight == 1
    deferred[0].finish("200 OK", [("Content-Length", "0")], b"")
    deferred[0].finish("200 OK", [("Content-Length", "0")], b"")  # once only
    assert wrapper.in_flight == 0 and len(finished) == 1
    # Deferred, then failed: nothing else can answer it, so the wrapper does, once.
    with pytest.raises(RuntimeError, match="failed after deferring"):
        wrapper(environ("/fail"), start_response)
    assert finished[1] == INTERNAL_ERROR and wrapper.in_flight == 0
    deferred[1].finish("200 OK", [("Content-Length", "0")], b"")  # too late: ignored
    assert len(finished) == 2 and wrapper.in_flight == 0
    wrapper.close()


def test_waitress_hands_each_small_response_to_the_socket_in_one_piece(monkeypatch):
    """Header and body in one buffer append: the I/O thread can never send the header alone."""
    app = falcon.App()
    app.add_route("/slow", Slow())
    handle = WaitressHandle(app, Listen("127.0.0.1", 0, threads=4))
    pieces: list[bytes] = []
    original = handle.server.channel_class.write_soon

    def spy(channel, data):
        pieces.append(bytes(data))
        return original(channel, data)

    monkeypatch.setattr(handle.server.channel_class, "write_soon", spy)
    runner = threading.Thread(target=handle.run)
    runner.start()
    try:
        results: list = []
        clients = [
            threading.Thread(target=get, args=(handle.port, "/slow", results)) for _ in range(20)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=15)
    finally:
        handle.stop()
        runner.join(timeout=15)
    assert results == [(200, b"done")] * 20
    assert len(pieces) == 20
    assert all(p.startswith(b"HTTP/1.1 200 OK\r\n") and p.endswith(b"\r\n\r\ndone") for p in pieces)


TWO_SHARDS = """
[cluster]
routing = "{routing}"
min_replicas = {min_replicas}
[storage]
backend = "memory"
data_dir = "{data}"
max_value_size = {max_value_size}
[[shards]]
name = "s0"
idx = 0
address = "127.0.0.2:8080"
replicas = ["127.0.0.22:8080"]
[[shards]]
name = "s1"
idx = 1
address = "127.0.0.3:8080"
replicas = ["127.0.0.33:8080"]
"""


def open_node(tmp_path: Path, replica: int | None = None, **settings) -> Node:
    values = {
        "routing": "redirect",
        "min_replicas": 0,
        "max_value_size": 16 * 1024 * 1024,
        "data": tmp_path / "data",
        **settings,
    }
    path = tmp_path / "sharding.toml"
    path.write_text(TWO_SHARDS.format(**values))
    return Node(
        parse_config(path.read_text(), path), "s0", replica, registry=load_plugins(), environ={}
    ).open()


# With 2 shards, FNV-1 puts "USA" on shard 0 and "Soviet" on shard 1 (the seeds' check values).
OWN, OTHER = "key=USA", "key=Soviet"


@pytest.mark.parametrize(
    ("settings", "replica", "deferred", "expected"),
    [
        # redirect mode: every read is inline; writes where they are deferred (a leader
        # with min_replicas = 0 on a deferring server) or answered at once (a replica)
        ({}, None, True, {"get": True, "get-other": True, "set": True, "set-other": True}),
        ({}, None, False, {"get": True, "get-other": True, "set": False, "set-other": False}),
        ({"min_replicas": 1}, None, True, {"get": True, "set": False}),
        ({}, 0, True, {"get": True, "get-other": True, "set": True, "set-other": True}),
        # proxy mode on a deferring server: a forward goes to the forwarding engine and waits
        # for nothing here (another shard's key; any read on a replica)
        ({"routing": "proxy"}, None, True, {"get": True, "get-other": True, "set": True}),
        ({"routing": "proxy"}, None, True, {"set-other": True, "delete-other": True}),
        ({"routing": "proxy"}, 0, True, {"get": True, "set": True, "set-other": True}),
        ({"routing": "proxy", "min_replicas": 1}, None, True, {"set": False, "set-other": True}),
        # proxy mode on a server that cannot defer: whatever is forwarded waits for the owner
        ({"routing": "proxy"}, None, False, {"get": True, "get-other": False, "set": False}),
        ({"routing": "proxy"}, None, False, {"set-other": False, "delete-other": False}),
        ({"routing": "proxy"}, 0, False, {"get": False, "set": False, "set-other": False}),
    ],
)
def test_only_requests_that_never_wait_are_inline(tmp_path, settings, replica, deferred, expected):
    from distribkv.http.kv import inline_requests

    node = open_node(tmp_path, replica, **settings)
    inline = inline_requests(node, deferred_writes=deferred)
    requests = {
        "get": ("GET", "/get", OWN),
        "get-other": ("GET", "/get", OTHER),
        "set": ("PUT", "/set", OWN),
        "set-other": ("PUT", "/set", OTHER),
        "delete-other": ("DELETE", "/delete", OTHER),
    }
    assert {name: inline(*requests[name]) for name in expected} == expected
    # Never inline, whatever the mode: anything that may wait on other requests or the disk.
    for method, path in [
        ("GET", "/status"),
        ("GET", "/digest"),
        ("GET", "/purge"),
        ("POST", "/batch"),
        ("GET", "/replication/pull"),
        ("POST", "/get"),
        ("PATCH", "/set"),
    ]:
        assert not inline(method, path, OWN), (method, path)
    assert inline("GET", "/healthz", "") and inline("GET", "/cluster", "")
    node.close()


def _wsgi_call(
    app,
    method: str,
    query: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "/get",
    body: bytes | None = None,
    environ_extra: dict | None = None,
):
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.2",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body or b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in (headers or {}).items()},
        **(environ_extra or {}),
    }
    if body is not None:
        environ["CONTENT_LENGTH"] = str(len(body))
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = status
        seen["headers"] = sorted((k.lower(), v) for k, v in response_headers)

    answer = b"".join(app(environ, start_response))
    return seen.get("status"), seen.get("headers"), answer


def _count_app_calls(app, record):
    """Make the fast paths' Falcon app ``record(environ)`` of each request it gets; returns
    the Falcon app itself."""
    inner = app.app

    def counting(environ, start_response):
        record(environ)
        return inner(environ, start_response)

    app.app = counting
    return inner


@pytest.mark.parametrize("replica", [None, 0])
def test_the_read_fast_path_answers_exactly_as_the_application_does(tmp_path, replica):
    node = open_node(tmp_path, replica)
    app = create_app(node)
    falcon_calls = []
    inner = _count_app_calls(app, lambda environ: falcon_calls.append(environ["QUERY_STRING"]))
    node.store.put(b"USA", b"\x00\xff bytes&/%", sync=False)  # a key of shard s0
    cases = [
        ("GET", OWN, {}),  # stored, owned: the fast path
        ("GET", "key=USA&extra=1", {}),
        ("GET", "key=absent-key-0", {}),  # 404 from the application
        ("GET", OTHER, {}),  # another shard's key: 307
        ("GET", "key=", {}),  # 400
        ("GET", "key=USA&key=USA", {}),  # 400: repeated
        ("GET", OWN, {"X-Distribkv-Map": "not-this-map"}),  # 409
        ("HEAD", OWN, {}),
    ]
    for method, query, headers in cases:
        fast = _wsgi_call(app, method, query, headers)
        slow = _wsgi_call(inner, method, query, headers)
        assert fast == slow, (method, query, headers)
    for headers in ({}, {"X-Distribkv-Map": "not-this-map"}):  # 200; 409
        fast = _wsgi_call(app, "GET", "", headers, path="/healthz")
        assert fast == _wsgi_call(inner, "GET", "", headers, path="/healthz"), headers
    # Leader or replica, a read is answered without the Falcon application.
    falcon_calls.clear()
    assert _wsgi_call(app, "GET", OWN)[2] == b"\x00\xff bytes&/%"
    node.store.delete(b"USA", sync=False)
    assert _wsgi_call(app, "GET", OWN)[0] == "404 Not Found"  # a miss, read once
    assert falcon_calls == []
    node.close()


class Completions:
    """A deferring server's side of ``environ[DEFER]``: the answers, as they are finished."""

    def __init__(self):
        self.answers: list = []
        self.deferred = False
        self.finished = threading.Event()

    def defer(self):
        self.deferred = True
        return self

    def finish(self, status, headers, body):
        self.answers.append((status, sorted((k.lower(), v) for k, v in headers), body))
        self.finished.set()


def _set_answer(app, node, method, query, headers, body, deferred: bool, environ=None):
    """A /set's answer (deferred ones waited for, with a deadline) and what is stored after."""
    from distribkv.http.api import DEFER

    completions = Completions()
    extra = {**({DEFER: completions.defer} if deferred else {}), **(environ or {})}
    answer = _wsgi_call(app, method, query, headers, path="/set", body=body, environ_extra=extra)
    if completions.deferred:  # what the application returned is ignored: the answer follows
        assert completions.finished.wait(10), "a deferred write was never answered"
        answer = completions.answers[0]
    return answer, node.store.get(b"USA"), node.store.get(b"\xff\x00&/ k")


def _direct_set_answer(app, node, method, query, headers, body, can_defer=True):
    """A /set through ``Listen.direct``, as :func:`_set_answer` gives it, or None if it is
    left to the application."""
    from distribkv.http.api import DEFERRED, as_wsgi

    completions = Completions()
    header = {k.lower(): v for k, v in headers.items()}.get
    defer = completions.defer if can_defer else None
    result = app.direct(method, "/set", query, header, body or b"", defer)
    if result is None:
        return None
    if result is DEFERRED:
        assert completions.finished.wait(10), "a deferred direct write was never answered"
        answer = completions.answers[0]
    else:  # answered at once: as a server sends it
        status, direct_headers, direct_body = as_wsgi(result)
        answer = (status, sorted((k.lower(), v) for k, v in direct_headers), direct_body)
    return answer, node.store.get(b"USA"), node.store.get(b"\xff\x00&/ k")


@pytest.mark.parametrize(("replica", "deferred"), [(None, False), (None, True), (0, False)])
def test_the_write_fast_path_answers_and_stores_exactly_as_the_application_does(
    tmp_path, replica, deferred
):
    node = open_node(tmp_path, replica, max_value_size=8)
    app = create_app(node)
    falcon_calls = []
    inner = _count_app_calls(
        app,
        lambda environ: falcon_calls.append((environ["REQUEST_METHOD"], environ["QUERY_STRING"])),
    )
    cases = [
        ("PUT", OWN, {}, b"\x00\xff &/%"),  # the fast path
        ("POST", OWN, {}, b"v"),
        ("GET", OWN + "&value=%FF%00", {}, None),
        ("PUT", OWN + "&value=q", {}, b"body"),  # the parameter wins over the body
        ("PUT", OWN, {}, b""),  # an empty value
        ("PUT", "key=%FF%00%26%2F+k", {}, b"bytes"),  # a key with every awkward byte
        ("GET", OWN, {}, None),  # 400: no value
        ("PUT", OWN, {}, b"123456789"),  # 413: over max_value_size
        ("GET", OWN + "&value=123456789", {}, None),  # 413
        ("PUT", "key=", {}, b"v"),  # 400
        ("PUT", OWN + "&key=USA", {}, b"v"),  # 400: repeated
        ("PUT", OTHER, {}, b"v"),  # another shard's key: 307
        ("PUT", OWN, {"X-Distribkv-Map": "not-this-map"}, b"v"),  # 409
        ("DELETE", OWN, {}, None),  # 405
        ("PUT", OWN, {}, b"abc", {"CONTENT_LENGTH": "5"}),  # 400: the body is cut short
        ("PUT", OWN, {}, b"abc", {"CONTENT_LENGTH": "\u00b3"}),  # 400: not a length
    ]
    left = []
    for method, query, headers, body, *environ in cases:
        for key in (b"USA", b"\xff\x00&/ k"):
            node.store.delete(key, sync=False)
        fast = _set_answer(app, node, method, query, headers, body, deferred, *environ)
        for key in (b"USA", b"\xff\x00&/ k"):
            node.store.delete(key, sync=False)
        slow = _set_answer(inner, node, method, query, headers, body, deferred, *environ)
        assert fast == slow, (method, query, headers, body, environ)
        if not environ:  # a server hands Listen.direct the whole body
            for key in (b"USA", b"\xff\x00&/ k"):
                node.store.delete(key, sync=False)
            answer = _direct_set_answer(app, node, method, query, headers, body, deferred)
            if answer is None:
                left.append((method, query))
            else:
                assert answer == slow, (method, query, headers, body)
    # Listen.direct answers every /set, at once or deferred, but a leader's plain write where
    # the server cannot defer it (it would wait for the disk) and a method /set does not take.
    plain = [
        ("PUT", OWN),
        ("POST", OWN),
        ("GET", OWN + "&value=%FF%00"),
        ("PUT", OWN + "&value=q"),
        ("PUT", OWN),
        ("PUT", "key=%FF%00%26%2F+k"),
    ]
    assert left == (plain if node.is_leader and not deferred else []) + [("DELETE", OWN)]
    # A leader applies a write of its own key without the Falcon application; a replica
    # redirects it without it too.
    falcon_calls.clear()
    answer, stored, _ = _set_answer(app, node, "PUT", OWN, {}, b"direct", deferred)
    assert answer[0] == ("200 OK" if node.is_leader else "307 Temporary Redirect")
    assert stored == (b"direct" if node.is_leader else None)
    assert falcon_calls == []
    node.close()


@pytest.mark.parametrize("replica", [None, 0])
def test_direct_reads_answer_as_the_application_does_or_leave_the_request_to_it(tmp_path, replica):
    node = open_node(tmp_path, replica)
    app = create_app(node)
    node.store.put(b"USA", b"\x00\xff bytes&/%", sync=False)
    cases = [
        ("/get", OWN, {}),  # stored, owned: answered directly by a leader
        ("/get", "key=U%53A", {}),  # the same key, percent-encoded
        ("/get", "key=USA&extra=1", {}),
        ("/get", "key=absent-key-0", {}),  # 404 from the application
        ("/get", OTHER, {}),  # another shard's key: 307
        ("/get", "key=", {}),  # 400
        ("/get", "key=USA&key=USA", {}),  # 400: repeated
        ("/get", OWN, {"x-distribkv-map": "not-this-map"}),  # 409
        ("/healthz", "", {}),
        ("/set", OWN + "&value=v", {}),  # a write: direct only where it can be deferred
    ]
    answered = []
    for path, query, headers in cases:
        direct = app.direct("GET", path, query, headers.get, b"", None)
        if direct is None:
            continue
        answered.append((path, query))
        status, direct_headers, body = direct
        # Against the Falcon app itself, which the fast paths stand in for.
        wsgi_status, wsgi_headers, wsgi_body = _wsgi_call(
            app.app, "GET", query, {k.title(): v for k, v in headers.items()}, path=path
        )
        assert (str(status), body) == (wsgi_status[:3], wsgi_body), (path, query)
        # The server adds Content-Length; every other header is the same.
        assert sorted((k.lower(), v) for k, v in direct_headers) == [
            h for h in wsgi_headers if h[0] != "content-length"
        ]
    # Every read, found or not, here or elsewhere, and a replica's refusal of a write; not a
    # leader's write, which cannot be deferred here (no completion was offered).
    reads = [(path, query) for path, query, _ in cases if path != "/set"]
    assert answered == reads + ([] if node.is_leader else [("/set", OWN + "&value=v")])
    node.close()


@pytest.fixture
def bare_wrapper():
    """A serving wrapper around an application that is never called."""
    from distribkv.http.wrapper import ServingWrapper

    wrapper = ServingWrapper(lambda environ, start_response: [b""])
    yield wrapper
    wrapper.close()


#: A write through ``Listen.direct``, from a server that offers ``server.defer``.
def _direct_put(wrapper, answer, server):
    return wrapper.direct(answer, "PUT", "/set", "key=k", {}.get, b"v", "127.0.0.1", server.defer)


def test_a_direct_answer_is_counted_in_flight_and_never_given_once_refusing(bare_wrapper):
    wrapper = bare_wrapper
    seen = []

    def answer(method, path, query, header, body, defer):
        seen.append((method, path, query, header("x"), body, defer, wrapper.in_flight))
        return 200, [], b"value"

    request = ("/get", "key=k", {"x": "1"}.get, b"", "127.0.0.1")
    assert wrapper.direct(answer, "GET", *request) == (200, [], b"value")
    assert seen == [("GET", "/get", "key=k", "1", b"", None, 1)]  # a drain waits for it
    assert wrapper.in_flight == 0
    wrapper.refuse()
    # Refusing: no answer, so the server goes the application's way, which answers 503.
    assert wrapper.direct(answer, "GET", *request) is None
    assert len(seen) == 1


def test_a_deferred_direct_answer_is_in_flight_until_its_completion_is_finished(bare_wrapper):
    from distribkv.http.api import DEFERRED

    wrapper, server, started = bare_wrapper, Completions(), []

    def answer(method, path, query, header, body, defer):
        if defer is None:
            return None
        started.append((defer(), wrapper.in_flight))  # queued, to be finished elsewhere
        return DEFERRED

    assert _direct_put(wrapper, answer, server) is DEFERRED
    assert server.deferred  # the server's completion was taken
    assert [counted for _, counted in started] == [1]
    assert wrapper.in_flight == 1  # until it is answered
    started[0][0].finish("200 OK", [("Content-Length", "0")], b"")
    assert server.answers == [("200 OK", [("content-length", "0")], b"")]
    assert wrapper.in_flight == 0
    # A server that cannot defer offers no completion: the application's way answers.
    assert wrapper.direct(answer, "PUT", "/set", "key=k", {}.get, b"v", "-") is None
    assert wrapper.in_flight == 0 and len(started) == 1


def test_a_direct_answer_that_fails_is_answered_once_and_counted_out(bare_wrapper):
    from distribkv.http.api import DEFERRED
    from distribkv.http.wrapper import INTERNAL_ERROR

    wrapper, server, taken = bare_wrapper, Completions(), []

    def fails_after_deferring(method, path, query, header, body, defer):
        taken.append(defer())
        raise RuntimeError("failed after deferring")

    # Deferred, then failed: only its completion may answer it, once, with a 500.
    assert _direct_put(wrapper, fails_after_deferring, server) is DEFERRED
    assert server.answers == [
        (INTERNAL_ERROR[0], sorted((k.lower(), v) for k, v in INTERNAL_ERROR[1]), INTERNAL_ERROR[2])
    ]
    assert wrapper.in_flight == 0
    taken[0].finish("200 OK", [], b"")  # too late: ignored, and not counted out again
    assert len(server.answers) == 1 and wrapper.in_flight == 0

    def broken(*args):
        raise RuntimeError("direct failed")

    with pytest.raises(RuntimeError):  # not deferred: the server answers 500
        _direct_put(wrapper, broken, server)
    assert wrapper.in_flight == 0

    class Unsendable(Completions):
        def finish(self, status, headers, body):
            raise OSError("the client is gone")

    def at_once(method, path, query, header, body, defer):  # as a refused write is answered
        defer().finish("503 Service Unavailable", [], b"")
        return DEFERRED

    result = _direct_put(wrapper, at_once, Unsendable())
    assert result is DEFERRED  # a failed send does not reach the server as an error
    assert wrapper.in_flight == 0


@pytest.mark.parametrize("way", ["direct", "wsgi"])
def test_a_deferred_write_is_counted_in_flight_until_the_committer_answers_it(tmp_path, way):
    from distribkv.http.api import DEFER, DEFERRED
    from distribkv.http.wrapper import ServingWrapper

    node = open_node(tmp_path)
    node_app = create_app(node)
    wrapper = ServingWrapper(node_app)
    counted = []

    class Counted(Completions):
        def finish(self, status, headers, body):
            counted.append((wrapper.in_flight, threading.current_thread().name))
            super().finish(status, headers, body)

    completions = Counted()
    if way == "direct":
        request = ("PUT", "/set", OWN, {}.get, b"\x00v", "127.0.0.1", completions.defer)
        assert wrapper.direct(node_app.direct, *request) is DEFERRED
    else:
        extra = {DEFER: completions.defer}
        returned = _wsgi_call(wrapper, "PUT", OWN, path="/set", body=b"\x00v", environ_extra=extra)
        assert returned == (None, None, b"")  # deferred: nothing started, nothing returned
    assert completions.finished.wait(10), "the deferred write was never answered"
    assert completions.answers[0][0] == "200 OK"
    # Answered by the committer, and still counted while its answer is sent.
    assert counted == [(1, "distribkv-commit")]
    assert node.store.get(b"USA") == b"\x00v"
    deadline = time.monotonic() + 10
    while wrapper.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wrapper.in_flight == 0
    wrapper.close()
    node.close()


def test_a_write_of_a_key_a_reshard_fenced_is_refused_the_same_way_on_every_path(
    tmp_path, monkeypatch
):
    from distribkv.transition import Transition

    node = open_node(tmp_path)
    app = create_app(node)
    node.maps.transition = Transition("t1", node.maps.map, node.maps.map, "fence")
    monkeypatch.setattr(node.maps, "verdict", lambda key: "out")  # the key leaves this shard
    status, _, body = app.direct("PUT", "/set", OWN, {}.get, b"v", Completions().defer)
    wsgi_status, wsgi_headers, wsgi_body = _wsgi_call(app.app, "PUT", OWN, path="/set", body=b"v")
    assert (str(status), body) == (wsgi_status[:3], wsgi_body)
    assert status == 503 and json.loads(body)["error"] == "moving"
    assert ("retry-after", "1") in wsgi_headers
    assert node.store.get(b"USA") is None
    node.maps.transition = None
    node.close()


def test_a_direct_write_is_left_to_the_application_where_it_is_not_deferred(tmp_path):
    node = open_node(tmp_path, min_replicas=1)  # it waits for a replica: never deferred
    app = create_app(node)
    assert app.direct("PUT", "/set", OWN, {}.get, b"v", Completions().defer) is None
    node.close()


def _status_line(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return sock.makefile("rb").readline().strip()


def test_every_413_of_a_waitress_node_has_the_same_status_line(tmp_path):
    node = open_node(tmp_path, max_value_size=8)
    app = create_app(node)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = Listen(
        "127.0.0.1", port, max_request_body_size=64, body_check=app.kv.limits.body_check
    )
    handle = WaitressHandle(app, listen)
    runner = threading.Thread(target=handle.run)
    runner.start()
    try:
        lines = {
            # Refused by its Content-Length before the body is sent (100 Continue awaited).
            "early": _status_line(
                port,
                b"PUT /set?key=USA HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 9\r\n\r\n",
            ),
            # Refused by the application: the value is in the query.
            "application": _status_line(
                port, b"GET /set?key=USA&value=123456789 HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            # Refused by waitress itself: over max_request_body_size.
            "server": _status_line(
                port, b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n" + b"x" * 65
            ),
        }
    finally:
        handle.stop()
        runner.join(timeout=15)
        app.close()
        node.close()
    assert set(lines.values()) == {b"HTTP/1.1 413 Content Too Large"}, lines
