"""Real clusters for tests: cluster files, `distribkv launch` and `distribkv serve` processes,
HTTP calls and polling with deadlines.

Every node listens on an address of its own in 127.0.0.0/8 (all of it is loopback on Linux).
Tests never pick addresses by hand: :func:`allocate_hosts` hands out a range of hosts that no
other test uses while the range is held, whether that test runs in this process, in another
pytest-xdist worker or in another pytest run on the same machine::

    from distribkv.testing.cluster import Cluster, call, write_config

    def test_something(tmp_path, hosts):          # ``hosts``: a fixture of distribkv.testing
        path = write_config(tmp_path, hosts=hosts, shards=2, replicas={0: 1})
        with Cluster(path) as cluster:
            assert call(cluster.address("shard-0"), "GET", "/healthz").status == 200

A module's cluster holds a range of its own for as long as it runs
(:func:`distribkv.testing.cluster_fixture` is a module-scoped fixture whose tests pytest-xdist's
``--dist loadgroup`` keeps on one worker)::

    @cluster_fixture
    def cluster(tmp_path_factory):
        with allocate_hosts() as hosts:
            path = write_config(tmp_path_factory.mktemp("c"), hosts=hosts)
            with Cluster(path) as running:
                yield running
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote_from_bytes, urlsplit

if TYPE_CHECKING:
    import pytest

    from distribkv.node import Node
    from distribkv.plugins import PluginRegistry

__all__ = [
    "Cluster",
    "Connection",
    "HostRange",
    "NodeProcess",
    "Response",
    "alive",
    "allocate_hosts",
    "call",
    "free_port",
    "free_port_on",
    "node_addresses",
    "q",
    "serving",
    "stop_all",
    "wait_until",
    "worker_index",
    "write_config",
]

START_TIMEOUT = 60.0

#: 127.0.0.0/8 is cut into /24 ranges, range ``n`` being 127.<n // 256>.<n % 256>.0/24. The
#: first ``RESERVED_RANGES`` (127.0.0.0 to 127.3.255.255) are left to addresses written by hand
#: (127.0.0.1, and cluster files that are parsed but never served).
RESERVED_RANGES = 1024
#: Each pytest-xdist worker takes its ranges from a share of its own.
RANGES_PER_WORKER = 1024
WORKERS = (65536 - RESERVED_RANGES) // RANGES_PER_WORKER
HOSTS_PER_RANGE = 254  # .1 to .254
_CLAIM_PREFIX = "\0distribkv-test-hosts-"
_ranges_taken = itertools.count()


def worker_index(environ: os._Environ | dict[str, str] | None = None) -> int:
    """This pytest-xdist worker's number (``PYTEST_XDIST_WORKER=gw3`` -> 3); 0 without xdist."""
    name = (os.environ if environ is None else environ).get("PYTEST_XDIST_WORKER", "")
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_on(hosts: list[str]) -> int:
    """A TCP port nothing listens on at any of ``hosts`` now (one port that several nodes
    each bind on their own host, as ``[server] metrics_port``)."""
    for _ in range(20):
        port = free_port(hosts[0])
        for host in hosts[1:]:
            with socket.socket() as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    break
        else:
            return port
    raise RuntimeError(f"no port is free on all of {', '.join(hosts)}")


class HostRange:
    """Loopback hosts 127.a.b.1 to 127.a.b.254 that no other test uses while this is held.

    The range is claimed with a Linux abstract socket named after it, which the kernel releases
    when :meth:`release` closes it or the process ends: a range is never held by two tests,
    even of two pytest runs at once.
    """

    def __init__(self, number: int, claim: socket.socket | None):
        self.number = number
        self.prefix = f"127.{number >> 8}.{number & 0xFF}."
        self._claim = claim
        self._next = 1

    def host(self) -> str:
        """The next unused host of the range."""
        if self._next > HOSTS_PER_RANGE:
            raise RuntimeError(f"all {HOSTS_PER_RANGE} hosts of {self.prefix}0/24 are used")
        host = f"{self.prefix}{self._next}"
        self._next += 1
        return host

    def address(self) -> str:
        """``host:port`` on the next unused host, with a port that is free there."""
        host = self.host()
        return f"{host}:{free_port(host)}"

    def release(self) -> None:
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    def __enter__(self) -> HostRange:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<HostRange {self.prefix}0/24>"


def _claim(number: int) -> socket.socket | None:
    """The claim on range ``number``, or None if another test holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"{_CLAIM_PREFIX}{number}")
    except OSError:
        sock.close()
        return None
    return sock


def allocate_hosts() -> HostRange:
    """A range of loopback hosts for one test (or one module's cluster): this worker's next
    range that no one else holds. Release it (or use it as a context manager) when done."""
    first = RESERVED_RANGES + (worker_index() % WORKERS) * RANGES_PER_WORKER
    if sys.platform != "linux":  # no abstract sockets: ranges are unique within the run only
        return HostRange(first + next(_ranges_taken) % RANGES_PER_WORKER, None)
    for _ in range(RANGES_PER_WORKER):
        number = first + next(_ranges_taken) % RANGES_PER_WORKER
        claim = _claim(number)
        if claim is not None:
            return HostRange(number, claim)
    raise RuntimeError(f"all {RANGES_PER_WORKER} host ranges of this worker are held")


def write_config(
    directory: Path,
    *,
    hosts: HostRange,
    shards: int = 2,
    replicas: dict[int, int] | None = None,
    backend: str = "memory",
    routing: str = "redirect",
    hashing: str = "modulo",
    replication: str | None = None,
    server: str | None = None,
    durability: str = "async",
    names: list[str] | None = None,
    cluster_extra: str = "",
    extra: str = "",
    data_dir: str = "data",
    file_name: str = "sharding.toml",
) -> Path:
    """A cluster file whose nodes listen on hosts of ``hosts``: each shard's leader, then its
    replicas, in order. ``cluster_extra`` adds lines to ``[cluster]``, ``extra`` to
    ``[storage]``; ``replication`` and ``server`` name plugins (the defaults when None)."""
    lines = ["[cluster]", f'hashing = "{hashing}"', f'routing = "{routing}"']
    if replication is not None:
        lines.append(f'replication = "{replication}"')
    if server is not None:
        lines.append(f'server = "{server}"')
    lines += [
        cluster_extra,
        "[storage]",
        f'backend = "{backend}"',
        f'data_dir = "{data_dir}"',
        f'durability = "{durability}"',
        extra,
    ]
    for idx in range(shards):
        name = names[idx] if names else f"shard-{idx}"
        lines += ["[[shards]]", f'name = "{name}"', f"idx = {idx}"]
        lines.append(f'address = "{hosts.address()}"')
        count = (replicas or {}).get(idx, 0)
        if count:
            addresses = ", ".join(f'"{hosts.address()}"' for _ in range(count))
            lines.append(f"replicas = [{addresses}]")
    path = directory / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


def node_addresses(config: Path) -> dict[str, str]:
    """Every node's address in a cluster file, by ``"<shard>/leader"`` and
    ``"<shard>/replica-<n>"`` (the keys of :attr:`Cluster.nodes`)."""
    data = tomllib.loads(config.read_text())
    out = {}
    for shard in data["shards"]:
        out[f"{shard['name']}/leader"] = shard["address"]
        for i, address in enumerate(shard.get("replicas", [])):
            out[f"{shard['name']}/replica-{i}"] = address
    return out


class Cluster:
    """`distribkv launch` of a cluster file; stopped with SIGINT like a terminal's Ctrl-C."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None):
        self.config = config
        self.args = args  # more options for ``distribkv launch``
        self.env = env  # the launcher's environment (this process's by default)
        self.process: subprocess.Popen | None = None
        self.nodes: dict[str, dict[str, str]] = {}
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> Cluster:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distribkv", "launch", "--config", str(self.config), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.config.parent,
            env=self.env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        header = None
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("launch ended early:\n" + "".join(self.output))
            self.output.append(line)
            if line.startswith("SHARD"):
                header = line.split()
            elif line.startswith("all nodes are up"):
                # From here on a thread collects the launcher's output, so that its pipe never
                # fills and a test can wait for a message (wait_for_output).
                self._reader = threading.Thread(target=self._read_rest, daemon=True)
                self._reader.start()
                return self
            elif header:
                row = dict(zip(header, line.split(), strict=False))
                self.nodes[f"{row['SHARD']}/{row['ROLE']}"] = row
        raise RuntimeError("launch did not report readiness:\n" + "".join(self.output))

    def address(self, shard: str, role: str = "leader") -> str:
        return self.nodes[f"{shard}/{role}"]["ADDRESS"]

    @property
    def pids(self) -> list[int]:
        return [int(row["PID"]) for row in self.nodes.values()]

    def _read_rest(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def wait_for_output(self, text: str, timeout: float = 30.0) -> str:
        """Wait until the launcher has printed a line containing ``text``; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.output):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"launch printed no {text!r} within {timeout}s:\n{self.text}")

    @property
    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> int:
        """Ctrl-C the launcher; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
        if self._reader is not None:
            self._reader.join(timeout=10)
        elif self.process.stdout is not None:
            self.output.append(self.process.stdout.read())
        return self.process.returncode

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _connection(
    address: str, timeout: float, context: ssl.SSLContext | None
) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection(*_split(address), timeout=timeout)
    return http.client.HTTPSConnection(*_split(address), timeout=timeout, context=context)


def call(
    address: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    follow: int = 0,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP request on a new connection (following at most ``follow`` 307 redirects);
    HTTPS with ``context``."""
    for _ in range(follow + 1):
        conn = _connection(address, timeout, context)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            raw = conn.getresponse()
            response = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        finally:
            conn.close()
        if response.status != 307 or follow == 0:
            return response
        location = urlsplit(response.headers["location"])
        address = location.netloc
        target = location.path + (f"?{location.query}" if location.query else "")
    return response


class Connection:
    """Requests to one node over one keep-alive connection (reopened if the node closes it),
    for tests that send thousands: a new connection per request costs more than the request."""

    def __init__(
        self, address: str, *, timeout: float = 10.0, context: ssl.SSLContext | None = None
    ):
        self.address = address
        self.timeout = timeout
        self.context = context
        self._conn: http.client.HTTPConnection | None = None

    def call(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = _connection(self.address, self.timeout, self.context)
            try:
                self._conn.request(method, target, body=body, headers=headers or {})
                raw = self._conn.getresponse()
                response = Response(
                    raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read()
                )
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The node closed a kept-alive connection between two requests: once more on
                # a new one. A request is only sent again if it never got an answer.
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.headers.get("connection", "").lower() == "close":
                self.close()
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def q(data: bytes) -> str:
    """Percent-encode every byte that is not unreserved (``+`` becomes ``%2B``)."""
    return quote_from_bytes(data, safe="")


class NodeProcess:
    """One `distribkv serve` process, started and stopped (or killed) by PID."""

    def __init__(
        self,
        config: Path,
        shard: str,
        replica: int | None = None,
        *,
        under: list[str] | None = None,
        env: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ):
        """``under``: a command the node runs under (strace, say); ``env``: its environment
        (this process's by default); ``context``: HTTPS for its health check."""
        self.config, self.shard, self.replica = config, shard, replica
        self.under = under or []
        self.env = env
        self.context = context
        self.process: subprocess.Popen | None = None
        name = "leader" if replica is None else f"replica-{replica}"
        self.log_path = config.parent / f"{shard}-{name}.log"

    def start(self, address: str) -> NodeProcess:
        cmd = [
            *self.under,
            sys.executable,
            "-m",
            "distribkv",
            "serve",
            "--config",
            str(self.config),
            "--shard",
            self.shard,
        ]
        if self.replica is not None:
            cmd += ["--replica", str(self.replica)]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_path.read_text()[-3000:]}")
            try:
                if call(address, "GET", "/healthz", timeout=1, context=self.context).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node did not answer /healthz: {self.log_path.read_text()[-3000:]}")

    def log_tail(self, size: int = 3000) -> str:
        """The last ``size`` characters of the node's log, for a failing test's message."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return "(no log)"

    def kill9(self) -> None:
        assert self.process is not None, "the node was never started"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM, without waiting: the node drains and stops (see :meth:`wait`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        """The node's exit status once it has stopped; SIGKILL after ``timeout`` seconds."""
        if self.process is None:
            return 0
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def stop(self) -> int:
        """SIGTERM, and wait for the node to drain and stop."""
        self.terminate()
        return self.wait()


def stop_all(nodes: Iterable[NodeProcess]) -> list[int]:
    """Stop every node at once (each drains meanwhile) and wait for them all; their exit
    statuses."""
    nodes = list(nodes)
    for node in nodes:
        node.terminate()
    return [node.wait() for node in nodes]


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.05, message: str = ""
) -> float:
    """Poll ``predicate`` until it is true; returns the seconds it took, fails after timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s: {message}")
        time.sleep(interval)


@contextlib.contextmanager
def serving(
    node: Node, registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """``distribkv serve`` of ``node`` in a thread until the block ends; it is stopped the way
    a SIGTERM stops it, by the handler serve() installs (captured here, not installed)."""
    from distribkv import launcher

    handlers: dict[int, Callable] = {}

    def capture(signum, handler):
        previous = handlers.get(signum, signal.SIG_DFL)
        handlers[signum] = handler
        return previous

    monkeypatch.setattr(
        launcher,
        "signal",
        types.SimpleNamespace(
            signal=capture, SIGTERM=signal.SIGTERM, SIGINT=signal.SIGINT, Signals=signal.Signals
        ),
    )
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["returned"] = launcher.serve(node, registry, announce=lambda text: None)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["raised"] = exc

    thread = threading.Thread(target=run, name=f"serve-{node.name}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not launcher.healthy(str(node.address), timeout=1.0, ssl_context=node.client_tls):
            assert thread.is_alive(), f"serve() ended before answering: {outcome}"
            assert time.monotonic() < deadline, f"{node.name} did not answer /healthz"
            time.sleep(0.02)
        yield
    finally:
        if thread.is_alive() and signal.SIGTERM in handlers:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        thread.join(timeout=30)
    assert not thread.is_alive(), "serve() did not return after SIGTERM"
    assert outcome == {"returned": 0}
