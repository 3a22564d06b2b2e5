"""Slow clients cannot lock a node out: connections that trickle their headers (slowloris) or
their body are closed after their deadlines, and when the connection limit is reached, the
connections that are idle or stuck the longest make room for new ones.

Each test starts a real node on each server and opens its connections from this process.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import subprocess
import sys
import time

import pytest

from distribkv.testing.cluster import Cluster, Connection, call, wait_until, write_config

SERVERS = ["waitress", "granian"]


def start_node(tmp_path, hosts, server: str, backend: str, server_extra: str = "") -> Cluster:
    path = write_config(
        tmp_path,
        hosts=hosts,
        shards=1,
        backend=backend,
        server=server,
        extra=f"[server]\n{server_extra}",
    )
    return Cluster(path)


class Trickle:
    """``count`` connections to ``address``, each sending its request's headers one byte at a
    time, a byte every ``interval`` seconds (on each call of :meth:`drip`), never finishing."""

    REQUEST = b"GET /get?key=slow HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 4096

    def __init__(self, address: str, count: int, deadline: float):
        host, _, port = address.rpartition(":")
        self.target = (host, int(port))
        self.sockets: dict[socket.socket, int] = {}  # socket -> bytes of REQUEST sent
        self.closed = 0
        self.answers: list[bytes] = []
        self.selector = selectors.DefaultSelector()
        for _ in range(count):
            if time.monotonic() > deadline:
                raise AssertionError(f"opened only {len(self.sockets)} of {count} in time")
            self._open()

    def _open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(self.target)
        self.sockets[sock] = 0
        self.selector.register(sock, selectors.EVENT_READ)

    def drip(self) -> None:
        """One more byte on every connection that is still open (and note those closed)."""
        for key, _ in self.selector.select(timeout=0):
            self._read(key.fileobj)
        for sock, sent in list(self.sockets.items()):
            try:
                sock.send(self.REQUEST[sent : sent + 1])
                self.sockets[sock] = sent + 1
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(sock)

    def _read(self, sock) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.answers.append(data)
        self._close(sock)

    def _close(self, sock) -> None:
        if sock in self.sockets:
            self.selector.unregister(sock)
            del self.sockets[sock]
            sock.close()
            self.closed += 1

    @property
    def open(self) -> int:
        return len(self.sockets)

    def close(self) -> None:
        for sock in list(self.sockets):
            self._close(sock)
        self.selector.close()


def timed_gets(address: str, count: int, deadline: float) -> tuple[list[float], list[str]]:
    """``count`` GETs, each on a connection of its own (the accept path is what slow clients
    starve): their latencies in seconds, and the failures."""
    latencies: list[float] = []
    failures: list[str] = []
    for _ in range(count):
        if time.monotonic() > deadline:
            failures.append("the test's deadline passed")
            break
        start = time.perf_counter()
        try:
            with Connection(address, timeout=5.0) as connection:
                answer = connection.call("GET", "/get?key=present")
            if answer.status != 200:
                failures.append(f"status {answer.status}")
        except OSError as exc:
            failures.append(repr(exc))
        latencies.append(time.perf_counter() - start)
    return latencies, failures


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@pytest.mark.serial
@pytest.mark.parametrize("server", SERVERS)
def test_a_thousand_trickling_connections_do_not_lock_other_clients_out(
    tmp_path, hosts, backend_name, server
):
    if backend_name != "lmdb":
        pytest.skip("connection handling does not depend on the backend: measured in the lmdb run")
    with start_node(tmp_path, hosts, server, backend_name) as cluster:
        address = cluster.address("shard-0")
        assert call(address, "PUT", "/set?key=present&value=here").status == 200
        deadline = time.monotonic() + 60
        trickle = Trickle(address, 1000, deadline)
        try:
            # Every slow connection has sent something (and is in its headers) before the
            # normal client starts.
            trickle.drip()
            latencies: list[float] = []
            failures: list[str] = []
            for _ in range(20):  # 20 rounds: a byte on each slow connection, then 10 GETs
                trickle.drip()
                more, failed = timed_gets(address, 10, deadline)
                latencies += more
                failures += failed
            still_open = trickle.open
        finally:
            trickle.close()
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(
            f"{server}: {len(latencies) - len(failures)}/{len(latencies)} GETs succeeded with"
            f" 1000 trickling connections ({still_open} still open at the end);"
            f" p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        )
        assert not failures, failures[:5]
        assert p99 < 0.5, f"p99 {p99 * 1000:.0f} ms"


@pytest.mark.parametrize("server", SERVERS)
def test_headers_that_trickle_past_the_header_timeout_are_cut_off(
    tmp_path, hosts, backend_name, server
):
    with start_node(tmp_path, hosts, server, backend_name, "header_timeout = 1") as cluster:
        address = cluster.address("shard-0")
        deadline = time.monotonic() + 30
        trickle = Trickle(address, 50, deadline)
        try:
            started = time.monotonic()

            def all_closed() -> bool:
                trickle.drip()
                return trickle.open == 0

            # Within the timeout, the next sweep (each second) and a margin for a busy machine.
            wait_until(all_closed, timeout=10, interval=0.2, message="trickling connections")
            took = time.monotonic() - started
        finally:
            trickle.close()
        print(f"{server}: 50 trickling connections closed after {took:.1f}s")
        assert took > 0.9, f"closed after {took:.2f}s, before the header timeout"
        if server == "waitress":
            # waitress tells them why; hyper (granian) closes without an answer.
            assert len(trickle.answers) == 50
            for answer in trickle.answers:
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408 "), head
                assert json.loads(body)["error"] == "request timeout"
        # The node still serves.
        assert call(address, "GET", "/healthz").status == 200
        if server == "waitress":  # every answer has its access-log line
            log = tmp_path / "data" / "logs" / "shard-0-leader.log"
            wait_until(lambda: log.read_text().count(" 408 ") >= 50, timeout=5, message="log")


@pytest.mark.parametrize("server", SERVERS)
def test_a_body_slower_than_the_minimum_rate_is_cut_off(tmp_path, hosts, backend_name, server):
    # 1s of grace, then 100,000 bytes at 50,000 bytes a second: late 3s after the headers.
    limits = "header_timeout = 1\nmin_body_rate = 50000"
    with start_node(tmp_path, hosts, server, backend_name, limits) as cluster:
        address = cluster.address("shard-0")
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"PUT /set?key=slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            )
            started = time.monotonic()
            sock.settimeout(0.2)
            answer = b""
            while time.monotonic() - started < 15:  # bounded; the node should end it at 3s
                try:
                    sock.send(b"v")
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # reset: the node closed the connection after answering
                    break
                if not data:
                    break
                answer += data
            took = time.monotonic() - started
        print(f"{server}: a body at 5 bytes a second was cut off after {took:.1f}s")
        assert 2.5 < took < 8, took
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(body)["error"] == "request timeout"
        assert call(address, "GET", "/get?key=slow-body").status == 404  # nothing was written


def test_at_the_connection_limit_stuck_connections_make_room(tmp_path, hosts, backend_name):
    """waitress: at its limit, the node closes the connection stuck the longest to take a new
    one (granian leaves new connections in the backlog until the header timeout frees one)."""
    with start_node(tmp_path, hosts, "waitress", backend_name, "connection_limit = 50") as cluster:
        address = cluster.address("shard-0")
        assert call(address, "PUT", "/set?key=present&value=here").status == 200
        deadline = time.monotonic() + 30
        trickle = Trickle(address, 200, deadline)
        try:

            def evicted() -> bool:
                trickle.drip()
                return trickle.closed >= 150

            # 150 of them make room for the rest; then, at the limit, the normal client's.
            wait_until(evicted, timeout=10, interval=0.1, message="stuck connections closed")
            latencies, failures = timed_gets(address, 50, deadline)
        finally:
            trickle.close()
        assert not failures, failures[:5]
        print(
            f"waitress, limit 50, 200 trickling: 50/50 GETs, p99"
            f" {percentile(latencies, 0.99) * 1000:.1f} ms"
        )


def test_a_node_raises_its_open_files_limit_to_fit_its_connections():
    script = (
        "import resource\n"
        "from distribkv.launcher import raise_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(raise_file_limit(2000), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    returned, now, hard = (int(value) for value in out)
    expected = 2000 + 1024 if hard < 0 or hard >= 3024 else hard  # -1: unlimited
    assert returned == now == expected, out
