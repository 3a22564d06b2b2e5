"""In-process tests of the serving layer: orderly shutdown, tokens, bind safety."""

from __future__ import annotations

import http.client
import io
import os
import sys
import threading
import time
from pathlib import Path

import falcon
import falcon.testing
import pytest

from distribkv.config import ConfigError, load_cluster_token, parse_config
from distribkv.http.api import Listen
from distribkv.http.app import create_app, forwarding_pool
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.server import WaitressHandle

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


def test_a_non_loopback_address_needs_a_cluster_token(tmp_path):
    # 192.0.2.0/24 is reserved for documentation: nothing is bound or contacted here.
    with pytest.raises(ConfigError, match="not a loopback address, and no cluster token"):
        node_for(tmp_path, "192.0.2.10:8080")
    node = node_for(tmp_path, "192.0.2.10:8080", {"DISTRIBKV_CLUSTER_TOKEN": "s" * 32})
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
    client = falcon.testing.TestClient(create_app(node, forwarding_pool(node)))
    assert client.simulate_get("/purge").status_code == 401
    assert client.simulate_get("/purge", headers={"X-Distribkv-Token": "x" * 20}).status_code == 401
    ok = client.simulate_get("/purge", headers={"X-Distribkv-Token": "t" * 20})
    assert ok.status_code == 200 and ok.json["deleted"] == 0
    bearer = client.simulate_get("/purge", headers={"Authorization": "Bearer " + "t" * 20})
    assert bearer.status_code == 200
    node.close()


def test_unexpected_errors_are_500_without_details(tmp_path, monkeypatch):
    node = node_for(tmp_path, "127.0.0.2:8080").open()
    client = falcon.testing.TestClient(create_app(node, forwarding_pool(node)))

    def explode(key):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(node, "get", explode)
    response = client.simulate_get("/get", query_string="key=a")
    assert response.status_code == 500
    assert response.json == {"error": "internal error", "detail": "see the node's log"}
    assert "secret" not in response.text
    node.close()


def test_a_refusing_wrapper_answers_503_without_calling_the_application():
    from distribkv.server import ServingWrapper

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
    assert body == [b"node is stopping\n"] and wrapper.in_flight == 0


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
    values = {"routing": "redirect", "min_replicas": 0, "data": tmp_path / "data", **settings}
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
        # proxy mode: whatever is forwarded (another shard's key; any read on a replica) is not
        ({"routing": "proxy"}, None, True, {"get": True, "get-other": False, "set": True}),
        ({"routing": "proxy"}, None, True, {"set-other": False, "delete-other": False}),
        ({"routing": "proxy"}, 0, True, {"get": False, "set": True, "set-other": False}),
    ],
)
def test_only_requests_that_never_wait_are_inline(tmp_path, settings, replica, deferred, expected):
    from distribkv.http.app import inline_requests

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


def _wsgi_call(app, method: str, query: str, headers: dict[str, str] | None = None):
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": "/get",
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.2",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in (headers or {}).items()},
    }
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = status
        seen["headers"] = sorted((k.lower(), v) for k, v in response_headers)

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


@pytest.mark.parametrize("replica", [None, 0])
def test_the_read_fast_path_answers_exactly_as_the_application_does(tmp_path, replica):
    node = open_node(tmp_path, replica)
    app = create_app(node, forwarding_pool(node))
    falcon_calls = []
    inner = app.app

    def counting(environ, start_response):
        falcon_calls.append(environ["QUERY_STRING"])
        return inner(environ, start_response)

    app.app = counting
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
    # A leader answers a stored key of its own without the application; a replica never does.
    falcon_calls.clear()
    assert _wsgi_call(app, "GET", OWN)[2] == b"\x00\xff bytes&/%"
    assert falcon_calls == ([] if node.is_leader else [OWN])
    node.close()
