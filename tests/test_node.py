"""The node over real HTTP: `distribkv launch` clusters on 127.0.0.x with the backend under test."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest
from cluster import Cluster, alive, call, q, wait_until, write_config

from distribkv.hashing.modulo import fnv1_64


@pytest.fixture(scope="module")
def redirect_cluster(tmp_path_factory, backend_name):
    """Two shards (modulo), shard-0 with one read-only replica; routing = redirect."""
    path = write_config(
        tmp_path_factory.mktemp("redirect"),
        shards=2,
        replicas={0: 1},
        backend=backend_name,
        extra="max_value_size = 100000",
    )
    cluster = Cluster(path).start()
    yield cluster
    assert cluster.stop() == 0, "".join(cluster.output)
    assert not [pid for pid in cluster.pids if alive(pid)]


@pytest.fixture(scope="module")
def proxy_cluster(tmp_path_factory, backend_name):
    path = write_config(
        tmp_path_factory.mktemp("proxy"),
        shards=3,
        replicas={1: 1},
        backend=backend_name,
        routing="proxy",
        hashing="ring",
        hosts_from=10,
    )
    cluster = Cluster(path).start()
    yield cluster
    assert cluster.stop() == 0, "".join(cluster.output)


def leaders(cluster) -> list[str]:
    return [cluster.address(f"shard-{i}") for i in range(len(leader_names(cluster)))]


def leader_names(cluster) -> list[str]:
    return sorted(k.split("/")[0] for k in cluster.nodes if k.endswith("/leader"))


def owner_index(key: bytes, shards: int) -> int:
    return fnv1_64(key) % shards


# --- any node answers for any key --------------------------------------------------------


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


# --- bytes end to end and limits ---------------------------------------------------------

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


# --- replicas, maps, batches, status ---------------------------------------------------


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


def owner_of(cluster, key: bytes) -> int:
    response = call(cluster.address("shard-0"), "GET", f"/get?key={q(key)}")
    return int(response.headers.get("x-distribkv-shard", "shard-0").split("-")[1])


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
    import base64

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


def test_each_request_writes_one_access_log_line(redirect_cluster):
    node = leaders(redirect_cluster)[0]
    log_file = redirect_cluster.config.parent / "data" / "logs" / "shard-0-leader.log"

    def written(tag: str) -> str:
        # Lines are written in order, in batches by a background thread: once a marker
        # request's line is there, every line before it is too.
        call(node, "GET", f"/access-log-marker-{tag}")
        line = f" GET /access-log-marker-{tag} 404 "
        wait_until(lambda: line in log_file.read_text(), 5, message=f"the line {line.strip()!r}")
        return log_file.read_text()

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


# --- proxy routing ------------------------------------------------------------------------


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


# --- lifecycle and configuration -------------------------------------------------------


def test_ctrl_c_on_launch_stops_every_node(tmp_path, backend_name):
    cluster = Cluster(
        write_config(tmp_path, shards=2, replicas={1: 1}, backend=backend_name, hosts_from=20)
    ).start()
    pids = cluster.pids
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    assert cluster.stop() == 0
    assert [pid for pid in pids if alive(pid)] == []
    assert "all nodes stopped" in "".join(cluster.output)


def test_launch_writes_its_table_to_a_file_while_it_runs(tmp_path, backend_name):
    """Output to a file is not held back until exit: the table of nodes and PIDs is in the
    file as soon as the nodes answer, and so is each later line."""
    config = write_config(tmp_path, shards=2, replicas={1: 1}, backend=backend_name, hosts_from=40)
    out_path, err_path = tmp_path / "launch.out", tmp_path / "launch.err"
    # Python's own default for a file: block-buffered (PYTHONUNBUFFERED would hide that).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "distribkv", "launch", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=tmp_path,
            env=env,
        )

    def lines() -> list[str]:
        assert launcher.poll() is None, err_path.read_text()
        return out_path.read_text().splitlines()

    try:
        # The header and a row per node, while the launcher runs.
        wait_until(lambda: len(lines()) >= 4, 60, message="the table in the output file")
        wait_until(lambda: "all nodes are up; Ctrl-C stops them" in lines(), 10)
        header = lines()[0].split()
        assert header == ["SHARD", "ROLE", "ADDRESS", "BACKEND", "PID", "LOG"]
        rows = [dict(zip(header, line.split(), strict=True)) for line in lines()[1:4]]
        assert [(r["SHARD"], r["ROLE"]) for r in rows] == [
            ("shard-0", "leader"),
            ("shard-1", "leader"),
            ("shard-1", "replica-0"),
        ]
        pids = [int(r["PID"]) for r in rows]
        assert all(alive(pid) for pid in pids)
        for row in rows:
            assert call(row["ADDRESS"], "GET", "/healthz").status == 200
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0, err_path.read_text()
    finally:
        if launcher.poll() is None:  # a failed check: the launcher stops its nodes itself
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait(timeout=30)
    assert out_path.read_text().splitlines()[-2:] == ["stopping all nodes ...", "all nodes stopped"]
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[shards]]\nname="a"\nidx=0\naddress="127.0.0.2:1"\n'
            '[[shards]]\nname="b"\nidx=0\naddress="127.0.0.3:1"\n',
            "duplicate idx 0",
        ),
        ('[[shards]]\nname="a"\nidx=1\naddress="127.0.0.2:1"\n', "no gap"),
        ('[[shards]]\nname="a"\nidx=0\naddress="nowhere"\n', "malformed address"),
        (
            '[storage]\nbackend="nosuchdb"\n[[shards]]\nname="a"\nidx=0\naddress="127.0.0.2:1"\n',
            'backend "nosuchdb" is not installed',
        ),
        (
            '[cluster]\nshards=2\n[[shards]]\nname="a"\nidx=0\naddress="127.0.0.2:1"\n',
            "[cluster] key 'shards': unknown key",
        ),
    ],
)
@pytest.mark.parametrize("command", ["launch", "serve"])
def test_an_invalid_cluster_file_stops_the_command_with_its_message(
    tmp_path, text, message, command
):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    args = [sys.executable, "-m", "distribkv", command, "--config", str(path)]
    if command == "serve":
        args += ["--shard", "a"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and str(path) in result.stderr


def test_purge_after_a_map_change_removes_exactly_the_foreign_keys(tmp_path, backend_name):
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    keys = [b"purge-%d" % i for i in range(300)]
    two = write_config(
        tmp_path, shards=2, backend=backend_name, hosts_from=30, file_name="two.toml"
    )
    with Cluster(two) as cluster:
        node = cluster.address("shard-0")
        for key in keys:
            assert call(node, "PUT", f"/set?key={q(key)}", body=key, follow=1).status == 200
    three = write_config(
        tmp_path, shards=3, backend=backend_name, hosts_from=30, file_name="three.toml"
    )
    with Cluster(three) as cluster:
        for idx in range(2):
            mine = [k for k in keys if owner_index(k, 2) == idx]
            stay = [k for k in mine if owner_index(k, 3) == idx]
            address = cluster.address(f"shard-{idx}")
            response = call(address, "POST", "/purge")
            assert response.status == 200, response
            report = json.loads(response.body)
            assert (report["deleted"], report["kept"]) == (len(mine) - len(stay), len(stay))
            status = json.loads(call(address, "GET", "/status").body)
            if status["keys"] is not None:
                assert status["keys"] == len(stay)
            for key in stay:
                assert call(address, "GET", f"/get?key={q(key)}").body == key
            again = json.loads(call(address, "POST", "/purge").body)
            assert (again["deleted"], again["kept"]) == (0, len(stay))
