"""The Python client against real clusters: client-side routing, batches, map changes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import threading
import time
import tty
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distribkv.client import (
    Client,
    ClientError,
    NodeDown,
    OutcomeUnknown,
    Read,
    RequestError,
    ServerError,
    TimedOut,
    Unavailable,
)
from distribkv.hashing.shardmap import ShardInfo, ShardMap
from distribkv.plugins import load_plugins
from distribkv.testing import cluster_fixture
from distribkv.testing.cluster import Cluster, allocate_hosts, call, wait_until, write_config


@cluster_fixture
def ring_cluster(tmp_path_factory, backend_name):
    with allocate_hosts() as hosts:
        path = write_config(
            tmp_path_factory.mktemp("client"),
            hosts=hosts,
            shards=3,
            replicas={0: 1},
            backend=backend_name,
            hashing="ring",
            extra="max_value_size = 1000",
        )
        cluster = Cluster(path).start()
        yield cluster
        assert cluster.stop() == 0


def test_with_a_current_map_no_request_needs_a_redirect(ring_cluster):
    rng = random.Random(5)
    pairs = {b"key-%d\xff\x00" % i: rng.randbytes(rng.randint(0, 200)) for i in range(300)}
    with Client([ring_cluster.address("shard-2")]) as client:
        items = list(pairs.items())
        for key, value in items[:100]:
            client.set(key, value)
        client.set_many(dict(items[100:]))
        assert {k: client.get(k) for k in list(pairs)[:50]} == dict(items[:50])
        assert client.get_many(pairs) == pairs
        client.delete(items[0][0])
        client.delete_many([k for k, _ in items[1:10]])
        assert client.get_many([k for k, _ in items[:12]]) == {
            **{k: None for k, _ in items[:10]},
            **dict(items[10:12]),
        }
        assert client.get(b"never written") is None
        assert client.redirects == 0


def test_errors_are_typed(ring_cluster):
    with Client([ring_cluster.address("shard-0")]) as client:
        with pytest.raises(RequestError) as info:
            client.set(b"big", b"x" * 1001)
        assert info.value.status == 413
    with pytest.raises(Unavailable):
        Client(["127.0.0.1:1"], timeout=1)


def test_reads_from_replicas_are_served_by_replicas(ring_cluster):
    replica = ring_cluster.address("shard-0", "replica-0")

    def replica_readable() -> bool:
        return json.loads(call(replica, "GET", "/status").body)["replication"]["readable"]

    # A fresh replica reloads the leader's data first; until then it refers reads to the leader.
    wait_until(replica_readable, 30, message=f"replica {replica} never became readable")
    with Client([ring_cluster.address("shard-1")], read_from_replicas=True) as client:
        keys = [b"r-%d" % i for i in range(60)]
        client.set_many({k: k for k in keys})
        # Replicas may lag a moment: every read eventually sees the write.
        wait_until(lambda: client.get_many(keys) == {k: k for k in keys}, 5)
        assert client.get(keys[0]) == keys[0]
        assert client.leader_fallbacks == 0


class _StubNode(ThreadingHTTPServer):
    """A node that publishes ``description`` at /cluster and answers everything else with
    ``answer`` (status, JSON body)."""

    daemon_threads = True

    def __init__(self, host: str, answer: tuple[int, dict | bytes]):
        self.description: dict = {}
        self.answer = answer
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.paths.append(self.path)
                if self.path == "/cluster":
                    status, body = 200, json.dumps(outer.description).encode()
                else:
                    status, payload = outer.answer
                    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

        super().__init__((host, 0), Handler)
        self.address = f"{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_read_a_resyncing_replica_refuses_goes_to_the_leader(hosts):
    leader = _StubNode(hosts.host(), (200, b"from the leader"))
    replica = _StubNode(
        hosts.host(),
        (503, {"error": "replica resyncing", "detail": "reloading", "leader": "x"}),
    )
    try:
        registry = load_plugins()
        shard_map = ShardMap(
            [ShardInfo(0, "shard-0", leader.address, (replica.address,), 1.0)],
            registry.hashing_scheme("modulo"),
            {},
        )
        leader.description = replica.description = shard_map.describe()
        with Client([replica.address], read_from_replicas=True, registry=registry) as client:
            assert client.get(b"k") == b"from the leader"
            assert client.leader_fallbacks == 1
            assert [p for p in replica.paths if p != "/cluster"] == ["/get?key=k"]
        # Another 503 is the replica's answer to give, not a reason to ask the leader.
        replica.answer = (503, {"error": "overloaded", "detail": "busy"})
        with Client([replica.address], read_from_replicas=True, registry=registry) as client:
            with pytest.raises(ServerError):
                client.get(b"k")
            assert client.leader_fallbacks == 0
    finally:
        for stub in (leader, replica):
            stub.shutdown()
            stub.server_close()


def test_after_the_map_changes_the_client_recovers_unnoticed(tmp_path, hosts, backend_name):
    three = write_config(
        tmp_path, hosts=hosts, shards=3, backend=backend_name, file_name="three.toml"
    )
    text = three.read_text()
    two = tmp_path / "two.toml"
    two.write_text(text[: text.index('[[shards]]\nname = "shard-2"')])
    with Cluster(two) as cluster:
        client = Client([cluster.address("shard-0")])
        client.set_many({b"before-%d" % i: b"v" for i in range(50)})
        assert client.map.fingerprint
        old = client.map.fingerprint
    with Cluster(three):
        # The caller notices nothing: the first request meets the new map, the client fetches
        # it and retries.
        for i in range(50):
            client.set(b"after-%d" % i, b"w%d" % i)
        assert client.get_many([b"after-%d" % i for i in range(50)]) == {
            b"after-%d" % i: b"w%d" % i for i in range(50)
        }
        assert client.map.fingerprint != old
        assert len(client.map.shards) == 3
        client.close()


def test_the_command_line_uses_the_client(ring_cluster):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "distribkv", *args], capture_output=True, timeout=60
        )

    node_a, node_b = ring_cluster.address("shard-0"), ring_cluster.address("shard-2")
    assert run("set", "cli key", "cli value", "--node", node_a).returncode == 0
    result = run("get", "cli key", "--node", node_b)
    assert (result.returncode, result.stdout) == (0, b"cli value")
    assert run("delete", "cli key", "--node", node_b).returncode == 0
    missing = run("get", "cli key", "--node", node_a)
    assert missing.returncode == 1 and b"is not set" in missing.stderr
    assert run("set", "00ff", "0001", "--hex", "--node", node_a).returncode == 0
    assert run("get", "00ff", "--hex", "--node", node_b).stdout == b"0001\n"
    # Bad input is a one-line error naming what is wrong, not a traceback.
    for args, named in (
        (["set", "zz", "00", "--hex"], b"KEY 'zz' is not hexadecimal"),
        (["set", "00", "0g", "--hex"], b"VALUE '0g' is not hexadecimal"),
        (["get", "k", "--node", "127.0.0.2"], b"malformed address '127.0.0.2'"),
        (["get", "k", "--node", "foo:bar"], b"malformed address 'foo:bar'"),
    ):
        bad = run(*args, *([] if "--node" in args else ["--node", node_a]))
        assert bad.returncode == 2 and named in bad.stderr, bad.stderr
        assert b"Traceback" not in bad.stderr
    # Arguments that are not UTF-8 are taken as the exact bytes given.
    assert run("set", b"raw \xff key", b"raw \xfe value", "--node", node_a).returncode == 0
    assert run("get", b"raw \xff key", "--node", node_b).stdout == b"raw \xfe value"


def test_an_address_that_is_not_a_node_is_a_clear_client_error():
    from distribkv.client import NotANode

    other = _StubNode("127.0.0.118", (200, b"hello"))
    try:
        # Its /cluster answer is not a shard map.
        other.description = {"hello": "world"}
        with pytest.raises(NotANode, match=r"not with a distribkv shard map.*node\?"):
            Client([other.address])
        # A server that publishes a map but answers a batch with something no node sends.
        registry = load_plugins()
        shard_map = ShardMap(
            [ShardInfo(0, "shard-0", other.address, (), 1.0)], registry.hashing_scheme("modulo"), {}
        )
        other.description = shard_map.describe()
        other.answer = (200, b"\x93\x01\x02\x03 trailing bytes")
        with Client([other.address], registry=registry) as client:
            with pytest.raises(NotANode, match="not a node's"):
                client.get_many([b"a", b"b"])
    finally:
        other.shutdown()


def run_on_a_terminal(args: list[str], timeout: float = 60.0) -> tuple[int, bytes]:
    """Run ``python -m distribkv ARGS`` with its standard output on a pseudo-terminal; return
    its exit status and every byte that reached the terminal. The terminal is raw (no
    newline translation), so the bytes are exactly what the command wrote."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "distribkv", *args],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(slave)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            received += chunk
        else:
            process.kill()
            raise AssertionError(f"{args} did not finish within {timeout}s: {received!r}")
        process.wait(timeout=timeout)
    finally:
        os.close(master)
        process.stderr.close()
    return process.returncode, received


def test_get_adds_a_newline_on_a_terminal_only(ring_cluster):
    node = ring_cluster.address("shard-1")
    with Client([node]) as client:
        client.set(b"tty key", b"tty value")
        client.set(b"tty bytes", b"\x00\xff no newline")
    # On a terminal the prompt comes back on a line of its own, as with redis-cli.
    assert run_on_a_terminal(["get", "tty key", "--node", node]) == (0, b"tty value\n")
    assert run_on_a_terminal(["get", "tty bytes", "--node", node]) == (
        0,
        b"\x00\xff no newline\n",
    )
    assert run_on_a_terminal(["get", "--hex", "747479206b6579", "--node", node])[1] == (
        b"7474792076616c7565\n"
    )
    # A pipe gets the value exactly as stored, with nothing added (see `get --help`).
    piped = subprocess.run(
        [sys.executable, "-m", "distribkv", "get", "tty bytes", "--node", node],
        capture_output=True,
        timeout=60,
    )
    assert (piped.returncode, piped.stdout) == (0, b"\x00\xff no newline")
    help_text = subprocess.run(
        [sys.executable, "-m", "distribkv", "get", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "On a terminal the value is followed by a newline" in " ".join(help_text.split())


@pytest.mark.parametrize("preference", ["leader", "leader_preferred", "replica"])
def test_read_preferences_when_a_node_of_the_shard_is_down(tmp_path, hosts, preference):
    """A one-shard cluster of a leader and a replica, under launch that restarts no node: with
    the leader killed, "leader" reads fail, "leader_preferred" reads come from the replica,
    flagged stale; with the replica killed, "replica" reads come from the leader."""
    config = write_config(tmp_path, hosts=hosts, shards=1, replicas={0: 1}, backend="memory")
    with Cluster(config, "--max-restarts", "0") as cluster:
        leader = cluster.address("shard-0")
        replica = cluster.address("shard-0", "replica-0")
        with Client([leader], timeout=2.0, read_preference=preference) as client:
            client.set(b"k", b"v")
            wait_until(
                lambda: call(replica, "GET", "/get?key=k").status == 200,
                30,
                message="the replica did not get the key",
            )
            first = client.read(b"k")
            assert first.value == b"v"
            assert first.stale == (preference == "replica")
            down = replica if preference == "replica" else leader
            pid = json.loads(call(down, "GET", "/status").body)["pid"]
            os.kill(pid, 9)
            cluster.wait_for_output("stays down", timeout=10)
            if preference == "leader":
                with pytest.raises(Unavailable):
                    client.get(b"k")
            else:
                read = client.read(b"k")
                assert read.value == b"v"
                assert read.stale == (preference == "leader_preferred")
                if preference == "leader_preferred":
                    assert client.stale_reads >= 1 and read.lag_entries is not None
        assert cluster.stop() == 0


def test_an_unknown_read_preference_is_refused():
    with pytest.raises(ValueError, match="read_preference must be one of"):
        Client(["127.0.0.1:1"], read_preference="nearest")


# --- nodes that hang -----------------------------------------------------------------------


@cluster_fixture
def hang_cluster(tmp_path_factory):
    """Two shards, shard-0 with a replica (memory backend: what is tested is the client)."""
    with allocate_hosts() as hosts:
        path = write_config(tmp_path_factory.mktemp("hang"), hosts=hosts, shards=2, replicas={0: 1})
        cluster = Cluster(path, "--max-restarts", "0").start()
        yield cluster
        assert cluster.stop() == 0


@contextlib.contextmanager
def stopped(address: str):
    """The node at ``address`` stopped with SIGSTOP for the block: it still accepts connections
    (the kernel does) but answers nothing. It is resumed whatever happens."""
    pid = json.loads(call(address, "GET", "/status").body)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def timed(action) -> tuple[float, object]:
    """(seconds, result or the ClientError raised) of ``action()``."""
    started = time.monotonic()
    try:
        outcome = action()
    except ClientError as exc:
        outcome = exc
    return time.monotonic() - started, outcome


def key_of(client: Client, shard: str) -> bytes:
    return next(
        key
        for key in (b"hang-%d" % i for i in range(1000))
        if client.map.owner_of(key).name == shard
    )


def replicated(cluster: Cluster, client: Client, key: bytes, value: bytes) -> None:
    """Write ``key`` and wait until shard-0's replica has it."""
    client.set(key, value)
    replica = cluster.address("shard-0", "replica-0")
    wait_until(
        lambda: call(replica, "GET", f"/get?key={key.decode()}").body == value,
        30,
        message="the replica did not get the key",
    )


def test_a_hung_leader_costs_one_call_its_timeout_then_calls_fail_fast(hang_cluster):
    leader, other = hang_cluster.address("shard-0"), hang_cluster.address("shard-1")
    with Client([other], timeout=1.0, down_time=1.0) as client:
        key, elsewhere = key_of(client, "shard-0"), key_of(client, "shard-1")
        replicated(hang_cluster, client, key, b"v")
        fresh, hasty = Client([other], timeout=1.0), Client([other], timeout=1.0)
        stale_ok = Client([other], timeout=1.0, read_preference="leader_preferred")
        try:
            with stopped(leader):
                # The first call waits for the leader for its whole timeout, not more.
                took, outcome = timed(lambda: client.get(key))
                assert isinstance(outcome, TimedOut) and outcome.address == leader, outcome
                assert 0.9 < took < 1.5, took
                # The leader is marked down: the next calls to it fail at once, saying which
                # node is down and when it is tried again; other shards are served as ever.
                for action in (lambda: client.get(key), lambda: client.set(key, b"w")):
                    took, outcome = timed(action)
                    assert isinstance(outcome, NodeDown) and outcome.address == leader
                    assert took < 0.3 and 0 < outcome.retry_in <= 1.0, (took, outcome)
                    assert f"{leader} is marked down (timed out, once)" in str(outcome)
                    assert "tried again in" in str(outcome)
                assert timed(lambda: client.set(elsewhere, b"e"))[1] is None
                # A write that was sent and never answered may have applied.
                took, outcome = timed(lambda: fresh.set(key, b"w"))
                assert isinstance(outcome, OutcomeUnknown) and took < 1.5, (took, outcome)
                # One call may take less time than the client gives each.
                took, outcome = timed(lambda: hasty.get(key, timeout=0.3))
                assert isinstance(outcome, TimedOut) and 0.25 < took < 0.6, (took, outcome)
                # leader_preferred: the replica answers while the leader hangs.
                for _ in range(2):
                    took, read = timed(lambda: stale_ok.read(key))
                    assert read == Read(b"v", stale=True, lag_entries=read.lag_entries)
                    assert took < 1.5, took
                assert took < 0.3 and stale_ok.stale_reads == 2
                # Making a client: a seed that hangs does not hold up the next one.
                took, made = timed(lambda: Client([leader, other], timeout=2.0))
                assert isinstance(made, Client) and took < 1.0, (took, made)
                made.close()
        finally:
            for made in (fresh, hasty, stale_ok):
                made.close()
        # Once resumed, the leader is tried again after its down time, and is up again (with
        # the write whose outcome was unknown applied, or not).
        wait_until(lambda: timed(lambda: client.get(key))[1] in (b"v", b"w"), 10, message="no read")
        assert client.breaker.down(leader) is None


def test_reads_that_prefer_a_replica_go_to_the_leader_while_it_hangs(hang_cluster):
    replica = hang_cluster.address("shard-0", "replica-0")
    with Client([hang_cluster.address("shard-1")], timeout=1.0, read_preference="replica") as db:
        key = key_of(db, "shard-0")
        replicated(hang_cluster, db, key, b"r")
        assert db.read(key).stale
        with stopped(replica):
            times = []
            for _ in range(3):
                took, read = timed(lambda: db.read(key))
                assert read == Read(b"r", stale=False), read  # the leader's answer
                times.append(took)
        assert times[0] < 1.5 and max(times[1:]) < 0.3, times
        assert db.leader_fallbacks == 3
        assert db.breaker.down(replica) is not None


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Client(["127.0.0.1:1"], timeout=0)
    with pytest.raises(ValueError, match="down_time must be a positive number"):
        Client(["127.0.0.1:1"], down_time=-1)
