"""Forwarding (``routing = "proxy"``) through the forwarding engine, on both servers.

Each server gets one cluster of three shards, ``forward_timeout = 1.5``: shard-0's leader is
where the requests are sent (the "front"), shard-1's leader owns the keys they name, and
shard-2's leader is never started (its keys' owner is down). The front forwards shard-1's and
shard-2's keys without holding a thread while it waits: a hung owner leaves it serving its own
keys meanwhile.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from distribkv.hashing.modulo import fnv1_64
from distribkv.http.forwarding import MAX_BATCH_READS, READ_BATCHES_PER_OWNER
from distribkv.testing import cluster_fixture
from distribkv.testing.cluster import (
    Connection,
    NodeProcess,
    allocate_hosts,
    call,
    node_addresses,
    q,
    stop_all,
    wait_until,
    write_config,
)

FORWARD_TIMEOUT = 1.5
SHARDS = 3


def key_of(shard: int, prefix: bytes) -> bytes:
    """A key that shard ``shard`` of three owns (modulo hashing), starting with ``prefix``."""
    for n in range(1000):
        key = prefix + b"-%d" % n
        if fnv1_64(key) % SHARDS == shard:
            return key
    raise AssertionError("no key found")


def proxy_cluster(directory: Path, backend: str, server: str):
    with allocate_hosts() as hosts:
        path = write_config(
            directory,
            hosts=hosts,
            shards=SHARDS,
            backend=backend,
            server=server,
            routing="proxy",
        )
        with open(path, "a") as out:
            out.write(f"[server]\nforward_timeout = {FORWARD_TIMEOUT}\nthreads = 2\n")
        addresses = node_addresses(path)
        nodes = [NodeProcess(path, "shard-0"), NodeProcess(path, "shard-1")]
        try:
            nodes[0].start(addresses["shard-0/leader"])
            nodes[1].start(addresses["shard-1/leader"])
            yield types.SimpleNamespace(
                server=server,
                front=addresses["shard-0/leader"],
                owner=addresses["shard-1/leader"],
                down=addresses["shard-2/leader"],
                owner_node=nodes[1],
            )
        finally:
            stop_all(nodes)


@cluster_fixture
def waitress_proxy(tmp_path_factory, backend_name):
    yield from proxy_cluster(tmp_path_factory.mktemp("waitress"), backend_name, "waitress")


@cluster_fixture
def granian_proxy(tmp_path_factory, backend_name):
    yield from proxy_cluster(tmp_path_factory.mktemp("granian"), backend_name, "granian")


@pytest.fixture(params=["waitress", "granian"])
def proxied(request, waitress_proxy, granian_proxy):
    return waitress_proxy if request.param == "waitress" else granian_proxy


# Bytes that a query string must carry exactly: a byte that is not UTF-8, the separators,
# a space, a NUL, a plus sign and a percent sign.
HOSTILE = [b"\xff\xfe", b"a&b=c", b"sl/ash", b"sp ace", b"nul\x00byte", b"plus+%"]


def test_forwarded_get_set_delete_round_trip_bytes_exactly(proxied):
    front, owner = proxied.front, proxied.owner
    for n, prefix in enumerate(HOSTILE):
        key = key_of(1, prefix)
        value = prefix + bytes(range(256)) + b"%FF&/ \x00"
        # PUT with the value as the body, through the front.
        put = call(front, "PUT", f"/set?key={q(key)}", value)
        assert put.status == 200, put
        assert put.headers["x-distribkv-shard"] == "shard-1"
        for where in (front, owner):
            got = call(where, "GET", f"/get?key={q(key)}")
            assert (got.status, got.body) == (200, value), (where, key)
            assert got.headers["content-type"] == "application/octet-stream"
        # GET /set with the value in the query.
        other = b"\x00%FF&" + prefix
        assert call(front, "GET", f"/set?key={q(key)}&value={q(other)}").status == 200
        assert call(owner, "GET", f"/get?key={q(key)}").body == other
        # DELETE through the front, by each method it takes.
        method = ("DELETE", "POST", "GET")[n % 3]
        assert call(front, method, f"/delete?key={q(key)}").status == 200
        gone = call(front, "GET", f"/get?key={q(key)}")
        assert gone.status == 404 and gone.headers["x-distribkv-shard"] == "shard-1"
        assert call(owner, "GET", f"/get?key={q(key)}").status == 404


def test_owner_errors_come_back_as_the_owner_gave_them(proxied):
    key = key_of(1, b"big")
    # An empty key is refused by the front itself; a value over the owner's limit by the owner.
    assert call(proxied.front, "GET", "/get?key=").status == 400
    response = call(proxied.front, "GET", f"/set?key={q(key)}")
    assert response.status == 400 and b"missing value" in response.body


def test_a_forwarded_request_is_never_forwarded_again(proxied):
    key = key_of(1, b"hop")
    response = call(
        proxied.front, "GET", f"/get?key={q(key)}", headers={"X-Distribkv-Hop": "elsewhere"}
    )
    assert response.status == 421, response
    assert b"misdirected request" in response.body


def test_owner_down_answers_502_at_once(proxied):
    key = key_of(2, b"down")
    started = time.monotonic()
    for method, target, body in (
        ("GET", f"/get?key={q(key)}", None),
        ("PUT", f"/set?key={q(key)}", b"v"),
        ("DELETE", f"/delete?key={q(key)}", None),
    ):
        response = call(proxied.front, method, target, body)
        assert response.status == 502, response
        assert b"owner unreachable" in response.body
    assert time.monotonic() - started < 3 * FORWARD_TIMEOUT


def _forwards(address: str) -> float:
    text = call(address, "GET", "/metrics").body.decode()
    found = re.search(
        r'distribkv_forwarded_requests_total\{[^}]*shard="shard-1"[^}]*\} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def _forward_failures(address: str, reason: str) -> float:
    text = call(address, "GET", "/metrics").body.decode()
    pattern = (
        r'distribkv_forward_failures_total\{(?=[^}]*shard="shard-1")(?=[^}]*reason="'
        + reason
        + r'")[^}]*\} (\S+)'
    )
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_hung_owner_answers_504_and_the_front_serves_its_own_keys_meanwhile(proxied):
    front, pid = proxied.front, proxied.owner_node.process.pid
    own = key_of(0, b"own")
    assert call(front, "PUT", f"/set?key={q(own)}", b"mine").status == 200
    timeouts_before = _forward_failures(front, "timeout")
    forwards_before = _forwards(front)
    waiting = 12  # more than the front's threads (2) and wrk-like clients
    answers: list = []

    def forwarded(n: int):
        key = key_of(1, b"hung-%d" % n)
        started = time.monotonic()
        response = call(front, "GET", f"/get?key={q(key)}", timeout=4 * FORWARD_TIMEOUT)
        return response.status, time.monotonic() - started

    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=waiting) as pool:
            submitted = time.monotonic()
            futures = [pool.submit(forwarded, n) for n in range(waiting)]
            wait_until(
                lambda: _forwards(front) >= forwards_before + waiting,
                FORWARD_TIMEOUT,
                message="every request forwarded to the hung owner",
            )
            # None answered yet, unless a loaded machine made the wait outlast the timeout.
            if time.monotonic() - submitted < 0.9 * FORWARD_TIMEOUT:
                done = [f.result() for f in futures if f.done()]
                assert done == [], f"answered while the owner hung: {done}"
            # The front answers its own keys while every forwarded request waits.
            for _ in range(5):
                mine = call(front, "GET", f"/get?key={q(own)}", timeout=FORWARD_TIMEOUT / 2)
                assert (mine.status, mine.body) == (200, b"mine")
                written = call(front, "PUT", f"/set?key={q(own)}", b"mine", timeout=1.0)
                assert written.status == 200
            # Still waiting, unless a loaded machine made these calls outlast the timeout.
            if time.monotonic() - submitted < 0.9 * FORWARD_TIMEOUT:
                assert not any(future.done() for future in futures)
            answers = [f.result() for f in futures]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [status for status, _ in answers] == [504] * waiting
    for _, seconds in answers:
        assert FORWARD_TIMEOUT * 0.9 <= seconds < FORWARD_TIMEOUT + 2.0
    assert _forward_failures(front, "timeout") - timeouts_before == waiting
    # The owner answers again once it runs: new connections, and the pooled ones are fine.
    key = key_of(1, b"after")
    assert call(front, "PUT", f"/set?key={q(key)}", b"back").status == 200
    assert call(front, "GET", f"/get?key={q(key)}").body == b"back"


def _requests(address: str, route: str) -> float:
    """The requests ``address`` answered 200 on ``route`` (its /metrics)."""
    text = call(address, "GET", "/metrics").body.decode()
    pattern = (
        r'distribkv_http_requests_total\{(?=[^}]*code="200")(?=[^}]*route="'
        + re.escape(route)
        + r'")[^}]*\} (\S+)'
    )
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_reads_that_wait_for_the_owner_reach_it_together_and_get_their_own_answers(proxied):
    front, owner, pid = proxied.front, proxied.owner, proxied.owner_node.process.pid
    stored = {key_of(1, b"together-%d" % n): b"\x00v&/ %d\xff" % n for n in range(10)}
    missing = [key_of(1, b"never-%d" % n) for n in range(10)]
    for key, value in stored.items():
        assert call(owner, "PUT", f"/set?key={q(key)}", value).status == 200
    keys = [*stored, *missing]
    forwards_before = _forwards(front)
    together_before = _requests(owner, "/forwarding/get")
    alone_before = _requests(owner, "/get")

    def read(key: bytes):
        return call(front, "GET", f"/get?key={q(key)}", timeout=4 * FORWARD_TIMEOUT)

    os.kill(pid, signal.SIGSTOP)  # the first read waits in flight; the others wait behind it
    try:
        with ThreadPoolExecutor(max_workers=len(keys)) as pool:
            futures = [pool.submit(read, key) for key in keys]
            wait_until(
                lambda: _forwards(front) >= forwards_before + len(keys),
                FORWARD_TIMEOUT,
                message="every read forwarded to the stopped owner",
            )
            os.kill(pid, signal.SIGCONT)
            answers = [future.result() for future in futures]
    finally:
        os.kill(pid, signal.SIGCONT)
    for key, answer in zip(keys, answers, strict=True):
        assert answer.headers["x-distribkv-shard"] == "shard-1", (key, answer)
        if key in stored:
            assert (answer.status, answer.body) == (200, stored[key]), key
            assert answer.headers["content-type"] == "application/octet-stream"
        else:
            assert answer.status == 404 and b'"not found"' in answer.body, (key, answer)
            assert answer.headers["content-type"].startswith("application/json")
    # The owner got the 20 reads in a few requests: the first (alone, or with those waitress
    # read in the same pass), those that waited behind it together (another request each time
    # the newest had waited READS_PATIENCE, up to READ_BATCHES_PER_OWNER in flight), the rest
    # once it ran again.
    together = _requests(owner, "/forwarding/get") - together_before
    assert 1 <= together <= READ_BATCHES_PER_OWNER + 1, together
    assert _requests(owner, "/get") == alone_before


def test_the_owner_answers_many_reads_at_once_or_refuses_them_whole(proxied):
    owner = proxied.owner
    stored = {key_of(1, prefix): prefix + b"\x00value\xff" for prefix in HOSTILE}
    for key, value in stored.items():
        assert call(owner, "PUT", f"/set?key={q(key)}", value).status == 200
    absent = key_of(1, b"absent")
    keys = [*stored, absent]

    def reads(keys: list[bytes]):
        return call(owner, "GET", "/forwarding/get?" + "&".join(f"key={q(k)}" for k in keys))

    answer = reads(keys)
    assert answer.status == 200 and answer.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(answer.body) == [*stored.values(), None]
    # A key this node does not lead: the whole request is refused, to be asked read by read.
    assert reads([*keys, key_of(0, b"elsewhere")]).status == 421
    assert reads([absent] * (MAX_BATCH_READS + 1)).status == 400
    big = key_of(1, b"big")
    assert call(owner, "PUT", f"/set?key={q(big)}", b"x" * (5 << 20)).status == 200
    too_large = reads([big])
    assert too_large.status == 413 and b"answer too large" in too_large.body
    # Through the front such a read is asked for again alone, as a plain /get.
    alone_before = _requests(owner, "/get")
    got = call(proxied.front, "GET", f"/get?key={q(big)}")
    assert (got.status, got.body) == (200, b"x" * (5 << 20))
    assert _requests(owner, "/get") == alone_before + 1


def test_many_forwarded_requests_in_flight(proxied):
    front = proxied.front
    keys = [key_of(1, b"many-%d" % n) for n in range(240)]
    errors: list[str] = []
    lock = threading.Lock()

    def work(chunk: list[bytes]) -> None:
        with Connection(front) as conn:
            for key in chunk:
                value = key[::-1] * 3
                put = conn.call("PUT", f"/set?key={q(key)}", value)
                got = conn.call("GET", f"/get?key={q(key)}")
                if put.status != 200 or (got.status, got.body) != (200, value):
                    with lock:
                        errors.append(f"{key!r}: {put.status} {got.status} {got.body[:40]!r}")

    chunks = [keys[n::24] for n in range(24)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(work, chunks))
    assert errors == []
    assert _forwards(front) >= 2 * len(keys)
