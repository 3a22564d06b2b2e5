"""What ``distribkv bench`` runs: a one-node cluster per backend and server, the workloads
against it with wrk, the same operations on the backend in-process, a no-op endpoint on the same
server, and the seeds' load test on a cluster of several nodes."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import attrs

from distribkv.bench.wrk import corrected_percentiles, lua_script, raw_percentiles, run_wrk

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class BenchError(RuntimeError):
    pass


@attrs.frozen
class Profile:
    name: str
    keys: int  # keys loaded before the workloads, and the keyspace they draw from
    seconds: float  # one wrk run
    raw_seconds: float  # one in-process measurement
    load_test_keys: int = 1000


QUICK = Profile("quick", keys=10_000, seconds=2, raw_seconds=0.5)
FULL = Profile("full", keys=100_000, seconds=10, raw_seconds=3)


@attrs.frozen
class Workload:
    name: str
    label: str  # what it is like
    read_ratio: float
    zipf: bool


WORKLOADS = [
    Workload(f"{mix}-{dist}", label, ratio, dist == "zipfian")
    for mix, label, ratio in (
        ("get", "YCSB C: reads of existing keys", 1.0),
        ("read90", "YCSB B-like: 90% reads, 10% writes", 0.9),
        ("read50", "YCSB A-like: 50% reads, 50% writes", 0.5),
        ("set", "writes of existing keys", 0.0),
    )
    for dist in ("uniform", "zipfian")
]


#: Workloads of a two-shard cluster with ``routing = "proxy"``: wrk sends every request to the
#: node that does not own its key, which forwards it to the owner (see :func:`run_forwarded`).
FORWARDED = {
    "get-forwarded": "reads forwarded to the key's owner (proxy)",
    "set-forwarded": "writes forwarded to the key's owner (proxy)",
}


def key_name(i: int) -> bytes:
    return b"bench-%d" % i


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports: all bound at once, so the kernel cannot hand out one of
    them twice (as :func:`free_port` called in a row may)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class Child:
    """A process this benchmark started, stopped by its PID."""

    def __init__(self, cmd: list[str], log_path: Path, health: str, what: str):
        self.cmd, self.log_path, self.health, self.what = cmd, log_path, health, what
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Child:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.what} exited with status {self.process.returncode}; its log"
                    f" {self.log_path} ends with:\n{_tail(self.log_path)}"
                )
            if _answers(self.health):
                return self
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.what} did not answer {self.health} within {START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def write_cluster(
    directory: Path,
    *,
    backend: str,
    server: str,
    durability: str,
    host: str,
    shards: int = 1,
    threads: int = 8,
    metrics: bool = True,
    replicas: int = 0,
    routing: str = "redirect",
    hashing: str | None = None,
    file_name: str = "sharding.toml",
) -> Path:
    """A cluster file on free ports of ``host``: ``shards`` leaders named s0, s1, ..., each
    with ``replicas`` replicas (which :func:`start_nodes` starts only when asked)."""
    lines = [
        "[cluster]",
        f'server = "{server}"',
        f'routing = "{routing}"',
        "[storage]",
        f'backend = "{backend}"',
        f'data_dir = "{directory / "data"}"',
        f'durability = "{durability}"',
        "[server]",
        f"threads = {threads}",
    ]
    if hashing is not None:
        lines.insert(1, f'hashing = "{hashing}"')
    if not metrics:
        lines.append("metrics = false")
    ports = iter(free_ports(host, shards * (1 + replicas)))
    for idx in range(shards):
        lines += [
            "[[shards]]",
            f'name = "s{idx}"',
            f"idx = {idx}",
            f'address = "{host}:{next(ports)}"',
        ]
        if replicas:
            addresses = ", ".join(f'"{host}:{next(ports)}"' for _ in range(replicas))
            lines.append(f"replicas = [{addresses}]")
    path = directory / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


#: A command every node runs under (``--pin``: taskset to CPU 0); empty: none.
NODE_PREFIX: list[str] = []


def node_child(config_path: Path, shard: str, replica: int | None = None) -> Child:
    """A ``distribkv serve`` process of one node of ``config_path``, not started yet."""
    from distribkv.config import load_config

    config = load_config(config_path)
    node = config.node(shard, replica)
    name = "leader" if replica is None else f"replica-{replica}"
    cmd = [
        *NODE_PREFIX,
        sys.executable,
        "-m",
        "distribkv",
        "serve",
        "--config",
        str(config_path),
        "--shard",
        shard,
    ]
    if replica is not None:
        cmd += ["--replica", str(replica)]
    return Child(
        cmd,
        config_path.parent / (f"{shard}.log" if replica is None else f"{shard}-{name}.log"),
        f"http://{node.address}/healthz",
        f"node {shard} {name} ({config.storage.backend}, {config.cluster.server})",
    )


def start_nodes(config_path: Path, *, replicas: bool = False) -> list[tuple[str, Child]]:
    """Every leader of ``config_path`` as a ``distribkv serve`` process (and, with
    ``replicas``, every replica after them); (address, child), the leaders first."""
    from distribkv.config import load_config

    config = load_config(config_path)
    nodes: list[tuple[Any, int | None, Any]] = [
        (shard, None, shard.address) for shard in config.shards
    ]
    if replicas:
        nodes += [
            (shard, n, address)
            for shard in config.shards
            for n, address in enumerate(shard.replicas)
        ]
    started: list[tuple[str, Child]] = []
    try:
        for shard, replica, where in nodes:
            child = node_child(config_path, shard.name, replica)
            started.append((str(where), child.start()))
    except BaseException:
        for _, child in started:
            child.stop()
        raise
    return started


def start_noop(directory: Path, *, server: str, host: str, threads: int) -> tuple[str, Child]:
    port = free_port(host)
    child = Child(
        [
            sys.executable,
            "-m",
            "distribkv.bench.noop",
            "--server",
            server,
            "--host",
            host,
            "--port",
            str(port),
            "--threads",
            str(threads),
        ],
        directory / f"noop-{server}.log",
        f"http://{host}:{port}/noop",
        f"no-op endpoint ({server})",
    )
    return f"{host}:{port}", child.start()


# --- in-process backend ------------------------------------------------------------------


class ZipfPicker:
    """YCSB's zipfian generator (theta 0.99) over 0..n-1, the same formula as the wrk script."""

    def __init__(self, n: int, rng: random.Random, theta: float = 0.99):
        self.n, self.rng = n, rng
        zetan = sum(1 / (i**theta) for i in range(1, n + 1))
        zeta2 = 1 + 1 / (2**theta)
        self.zetan = zetan
        self.alpha = 1 / (1 - theta)
        self.eta = (1 - (2 / n) ** (1 - theta)) / (1 - zeta2 / zetan)
        self.second = 1 + 0.5**theta

    def __call__(self) -> int:
        u = self.rng.random()
        uz = u * self.zetan
        if uz < 1:
            return 0
        if uz < self.second:
            return 1
        return min(self.n - 1, int(self.n * (self.eta * u - self.eta + 1) ** self.alpha))


def raw_backend(
    backend: str,
    directory: Path,
    *,
    profile: Profile,
    durability: str,
    value_size: int,
    batch: int,
    workloads: list[Workload],
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Operations per second of the backend called in this process (one thread, through the
    node's Store, so with the same checksummed envelope): the ceiling of each workload."""
    from distribkv.plugins import load_plugins
    from distribkv.storage.api import Namespace, Put
    from distribkv.storage.store import open_store

    spec = load_plugins().storage_backend(backend)
    store = open_store(spec, directory, durability=durability)
    sync = durability == "sync"
    value = b"v" * value_size
    out: dict[str, float] = {}
    try:
        progress(f"{backend} in-process: batch load of {profile.keys:,} keys")
        started = time.perf_counter()
        for first in range(0, profile.keys, batch):
            ops = [
                Put(Namespace.DATA, key_name(i), value)
                for i in range(first, min(profile.keys, first + batch))
            ]
            store.apply(ops, sync=sync)
        out["batch-load"] = profile.keys / (time.perf_counter() - started)
        for workload in workloads:
            progress(f"{backend} in-process: {workload.name} ({profile.raw_seconds:g} s)")
            rng = random.Random(7)
            pick = ZipfPicker(profile.keys, rng) if workload.zipf else None
            keys = profile.keys
            done = 0
            started = time.perf_counter()
            deadline = started + profile.raw_seconds
            while done < 5_000_000:  # bounded in count as well as in time
                for _ in range(500):
                    key = key_name(pick() if pick else rng.randrange(keys))
                    if workload.read_ratio >= 1 or rng.random() < workload.read_ratio:
                        store.get(key)
                    else:
                        store.put(key, value, sync=sync)
                done += 500
                if time.perf_counter() >= deadline:
                    break
            out[workload.name] = done / (time.perf_counter() - started)
    finally:
        store.close()
    return out


# --- one node under wrk --------------------------------------------------------------------


def batch_load(address: str, keys: list[bytes], value_size: int, *, timeout: float = 30.0) -> float:
    """Load ``keys`` through the Python client's ``set_many``; keys per second."""
    from distribkv.client import Client

    client = Client([address], timeout=timeout)
    value = b"v" * value_size
    try:
        started = time.perf_counter()
        chunk = 10_000
        for first in range(0, len(keys), chunk):
            client.set_many([(key, value) for key in keys[first : first + chunk]])
        return len(keys) / (time.perf_counter() - started)
    finally:
        client.close()


#: Whether the nodes the bench started are compacted after their bulk load (``--no-compact``
#: turns it off, to measure them as the load leaves them).
COMPACT_AFTER_LOAD = True


def compact(address: str, *, timeout: float = 900.0) -> float | None:
    """``POST /compact`` on the node after its bulk load, so that LevelDB and RocksDB serve the
    measured requests from compacted files, not beside the compactions that a large load sets
    off on the node's core. The node's seconds, or None for
    a backend with nothing to compact (LMDB: 501), or with ``--no-compact``."""
    if not COMPACT_AFTER_LOAD:
        return None
    status, body = _request(address, "POST", "/compact", None, timeout)
    if status == 501:
        return None
    if status != 200:
        raise RuntimeError(f"POST /compact on {address}: {status} {body[:300]!r}")
    return float(json.loads(body)["seconds"])


def run_node(
    backend: str,
    server: str,
    directory: Path,
    *,
    durability: str,
    host: str,
    threads: int,
    **measure: Any,
) -> list[dict[str, Any]]:
    """Every workload against a one-node cluster of ``backend`` served by ``server``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_cluster(
        directory,
        backend=backend,
        server=server,
        durability=durability,
        host=host,
        threads=threads,
    )
    nodes = start_nodes(config)
    address, node = nodes[0]
    try:
        return measure_node(
            address,
            node.pid,
            compact_after_load=True,
            backend=backend,
            server=server,
            directory=directory,
            host=host,
            threads=threads,
            **measure,
        )
    finally:
        for _, child in nodes:
            child.stop()


def run_forwarded(
    backend: str,
    server: str,
    directory: Path,
    *,
    durability: str,
    host: str,
    threads: int,
    names: list[str],
    profile: Profile,
    connections: int,
    wrk_threads: int,
    value_size: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """``names`` (of :data:`FORWARDED`) on a cluster of two shards with a replica each and
    ``routing = "proxy"``: the keys all belong to the second shard; each workload is measured
    at their owner (``get-owner``, ``set-owner``: answered directly) and then at the first
    shard's leader, which forwards every request to the owner (``get-forwarded``,
    ``set-forwarded``), in the same run. A forwarded row's ``ratio_owner`` divides it by the
    owner's."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_cluster(
        directory,
        backend=backend,
        server=server,
        durability=durability,
        host=host,
        shards=2,
        threads=threads,
        replicas=1,
        routing="proxy",
    )
    nodes = start_nodes(config, replicas=True)
    (front, front_node), (owner, owner_node) = nodes[0], nodes[1]
    rows: list[dict[str, Any]] = []
    try:
        keys = owned_keys(owner, profile.keys)
        keys_path = directory / "keys.txt"
        keys_path.write_bytes(b"\n".join(keys) + b"\n")
        progress(f"{backend} + {server}: proxy cluster: batch load of {len(keys):,} keys")
        batch_load(owner, keys, value_size)
        compact(owner)
        for name in names:
            read_ratio = 1.0 if name.startswith("get-") else 0.0
            kind = name.split("-", 1)[0]
            measured = {}
            for label, address, child in (
                ("owner", owner, owner_node),
                ("forwarded", front, front_node),
            ):
                workload = f"{kind}-{label}"
                progress(f"{backend} + {server}: {workload} ({profile.seconds:g} s, wrk)")
                result = run_wrk(
                    f"http://{address}",
                    lua_script(
                        workload,
                        keys=len(keys),
                        value_size=value_size,
                        read_ratio=read_ratio,
                        keys_file=str(keys_path),
                    ),
                    seconds=profile.seconds,
                    connections=connections,
                    threads=wrk_threads,
                    server_pid=child.pid,
                    workdir=directory,
                    name=workload,
                )
                row = _wrk_row(workload, result, connections)
                measured[label] = row
                rows.append(row)
            owner_rps = measured["owner"]["rps"]
            measured["forwarded"]["ratio_owner"] = (
                measured["forwarded"]["rps"] / owner_rps if owner_rps else None
            )
    finally:
        for _, child in nodes:
            child.stop()
    for row in rows:
        row.update(backend=backend, server=server)
    return rows


def _wrk_row(name: str, result: dict[str, Any], connections: int) -> dict[str, Any]:
    errors = result["errors"]
    return {
        "workload": name,
        "unit": "req/s",
        "requests": result["requests"],
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "latency_ms": corrected_percentiles(result, connections),
        "latency_uncorrected_ms": raw_percentiles(result),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "server_cpu": result["server_cpu"],
        "wrk_cpu": result["wrk_cpu"],
    }


def owned_keys(address: str, count: int, *, timeout: float = 10.0) -> list[bytes]:
    """``count`` keys of the form bench-N that the shard of the leader at ``address`` owns."""
    from distribkv.client import Client

    client = Client([address], timeout=timeout)
    try:
        shard = next((s for s in client.map.shards if s.leader == address), None)
        if shard is None:
            raise BenchError(f"{address} is not a leader in its cluster's map")
        keys: list[bytes] = []
        limit = count * len(client.map.shards) * 20  # bounded: hashing spreads keys evenly
        for i in range(limit):
            key = key_name(i)
            if client.map.owner_of(key).name == shard.name:
                keys.append(key)
                if len(keys) == count:
                    return keys
    finally:
        client.close()
    raise BenchError(f"found only {len(keys)} of {count} keys for {address} in {limit} tries")


def measure_node(
    address: str,
    pid: int | None,
    *,
    backend: str,
    server: str,
    directory: Path,
    host: str,
    threads: int,
    profile: Profile,
    connections: int,
    wrk_threads: int,
    value_size: int,
    workloads: list[Workload],
    progress: Callable[[str], None],
    keys: list[bytes] | None = None,
    compact_after_load: bool = False,
) -> list[dict[str, Any]]:
    """Batch load, no-op, /healthz and every workload against the node at ``address``, with a
    no-op endpoint on the same server plugin started beside it. ``keys``: the node's own keys
    (a running cluster of several shards); by default bench-0 .. bench-N-1.
    ``compact_after_load``: compact the node's files after the load (a node the bench started;
    never a user's running node)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = keys or [key_name(i) for i in range(profile.keys)]
    keys_file = ""
    if keys is not None:
        keys_path = directory / "keys.txt"
        keys_path.write_bytes(b"\n".join(keys) + b"\n")
        keys_file = str(keys_path)
    rows: list[dict[str, Any]] = []
    noop_address, noop = start_noop(directory, server=server, host=host, threads=threads)
    try:
        progress(f"{backend} + {server}: batch load of {len(names):,} keys (set_many)")
        rate = batch_load(address, names, value_size)
        rows.append({"workload": "batch-load", "rps": rate, "unit": "keys/s"})
        seconds = compact(address) if compact_after_load else None
        if seconds is not None:
            progress(f"{backend} + {server}: compacted after the load in {seconds:.2f} s")

        def measure(name: str, url: str, pid: int | None, **script: Any) -> dict[str, Any]:
            progress(f"{backend} + {server}: {name} ({profile.seconds:g} s, wrk)")
            result = run_wrk(
                url,
                lua_script(
                    name, keys=len(names), value_size=value_size, keys_file=keys_file, **script
                ),
                seconds=profile.seconds,
                connections=connections,
                threads=wrk_threads,
                server_pid=pid,
                workdir=directory,
                name=name,
            )
            return _wrk_row(name, result, connections)

        noop_row = measure("noop", f"http://{noop_address}", noop.pid, path="/noop")
        rows.append(noop_row)
        # The node's own cheapest route: the same application, middleware and server as GET.
        health_row = measure("healthz", f"http://{address}", pid, path="/healthz")
        health_row["ratio_noop"] = health_row["rps"] / noop_row["rps"] if noop_row["rps"] else None
        rows.append(health_row)
        for workload in workloads:
            row = measure(
                workload.name,
                f"http://{address}",
                pid,
                read_ratio=workload.read_ratio,
                zipf=workload.zipf,
            )
            row["ratio_noop"] = row["rps"] / noop_row["rps"] if noop_row["rps"] else None
            row["ratio_healthz"] = row["rps"] / health_row["rps"] if health_row["rps"] else None
            rows.append(row)
    finally:
        noop.stop()
    for row in rows:
        row.update(backend=backend, server=server)
    return rows


# --- metrics on and off -------------------------------------------------------------------


def compare_metrics(
    backend: str,
    server: str,
    directory: Path,
    *,
    profile: Profile,
    durability: str,
    host: str,
    threads: int,
    connections: int,
    wrk_threads: int,
    value_size: int,
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """GET throughput (uniform keys) of a node with ``/metrics`` (the default) and of the
    same node with ``[server] metrics = false``: both run side by side, loaded alike, and wrk
    alternates between them ``rounds`` times (on-off, then off-on, ...), so that both see the
    same machine.

    Two identical nodes started one after the other do not serve alike: the first one started
    was measured a few percent faster (on granian, with metrics on in both). So this runs two
    sessions of ``rounds`` rounds, one with the metrics-on node started first and one with it
    started second; ``ratio`` is the geometric mean of the two sessions' ratios of medians
    (which cancels the start-order effect), and ``start_bias`` is that effect itself (> 1: the
    node started first was faster), the control the figure comes with. Both for GETs per second
    and for GETs per second of the node's CPU."""
    import math
    import statistics

    def median(runs: list[dict[str, float]], field: str) -> float:
        return statistics.median(run[field] for run in runs)

    def ratio_of(on: float, off: float) -> float | None:
        return on / off if off else None

    sessions: list[dict[str, Any]] = []
    for first in ("on", "off"):
        started = (first, "off" if first == "on" else "on")
        nodes: dict[str, tuple[str, Child]] = {}
        runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        try:
            for label in started:
                where = directory / f"{first}-first" / f"metrics-{label}"
                where.mkdir(parents=True, exist_ok=True)
                config = write_cluster(
                    where,
                    backend=backend,
                    server=server,
                    durability=durability,
                    host=host,
                    threads=threads,
                    metrics=label == "on",
                )
                nodes[label] = start_nodes(config)[0]
            names = [key_name(i) for i in range(profile.keys)]
            for label in started:
                progress(
                    f"{backend} + {server}: metrics {label} ({first} started first): batch load"
                    f" of {len(names):,} keys"
                )
                batch_load(nodes[label][0], names, value_size)
                compact(nodes[label][0])
            for round_ in range(rounds):
                order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
                for label in order:
                    address, child = nodes[label]
                    progress(
                        f"{backend} + {server}: GET with metrics {label} ({first} started"
                        f" first), round {round_ + 1}/{rounds} ({profile.seconds:g} s, wrk)"
                    )
                    result = run_wrk(
                        f"http://{address}",
                        lua_script(
                            "get-uniform", keys=len(names), value_size=value_size, read_ratio=1.0
                        ),
                        seconds=profile.seconds,
                        connections=connections,
                        threads=wrk_threads,
                        server_pid=child.pid,
                        workdir=directory,
                        name=f"metrics-{label}",
                    )
                    rps = result["requests"] / (result["duration_us"] / 1e6)
                    cpu = result["server_cpu"]
                    runs[label].append(
                        {
                            "rps": rps,
                            "rps_per_cpu": rps / cpu if cpu else 0.0,
                            "errors": sum(result["errors"].values()),
                        }
                    )
        finally:
            for _, child in nodes.values():
                child.stop()
        sessions.append(
            {
                "first": first,
                "runs": runs,
                "ratio": ratio_of(median(runs["on"], "rps"), median(runs["off"], "rps")),
                "ratio_per_cpu": ratio_of(
                    median(runs["on"], "rps_per_cpu"), median(runs["off"], "rps_per_cpu")
                ),
            }
        )

    def combined(field: str) -> tuple[float | None, float | None]:
        on_first, off_first = (session[field] for session in sessions)
        if not on_first or not off_first:
            return None, None
        return math.sqrt(on_first * off_first), math.sqrt(on_first / off_first)

    ratio, bias = combined("ratio")
    ratio_cpu, bias_cpu = combined("ratio_per_cpu")
    every = {label: [run for s in sessions for run in s["runs"][label]] for label in ("on", "off")}
    return {
        "backend": backend,
        "server": server,
        "rounds": rounds,
        "sessions": sessions,
        "on_rps": median(every["on"], "rps"),
        "off_rps": median(every["off"], "rps"),
        "ratio": ratio,
        "start_bias": bias,
        "on_rps_per_cpu": median(every["on"], "rps_per_cpu"),
        "off_rps_per_cpu": median(every["off"], "rps_per_cpu"),
        "ratio_per_cpu": ratio_cpu,
        "start_bias_per_cpu": bias_cpu,
        "errors": sum(run["errors"] for label in every for run in every[label]),
    }


# --- the seeds' load test ------------------------------------------------------------------


def _request(address: str, method: str, target: str, body: bytes | None, timeout: float):
    """One request, following at most 3 redirects to another node: (status, body)."""
    for _ in range(4):
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request(method, target, body=body)
            response = conn.getresponse()
            data = response.read()
            location = response.getheader("Location")
        finally:
            conn.close()
        if response.status != 307 or not location:
            return response.status, data
        parts = urlsplit(location)
        address = parts.netloc
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    return response.status, data


def load_test(
    addresses: list[str],
    *,
    keys: int = 1000,
    concurrency: int = 8,
    seed: int = 1,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The seeds' load test, made exact: ``keys`` random binary keys, each written to a random
    node and read back from another random one; every value must come back byte for byte."""
    rng = random.Random(seed)
    pairs: dict[bytes, bytes] = {}
    while len(pairs) < keys:
        pairs[rng.randbytes(rng.randint(1, 24))] = rng.randbytes(rng.randint(0, 64))
    items = list(pairs.items())
    writers = [rng.choice(addresses) for _ in items]
    readers = [rng.choice(addresses) for _ in items]
    errors: list[str] = []
    lock = threading.Lock()

    mismatches: list[str] = []

    def call(i: int, op: str) -> None:
        key, value = items[i]
        address = writers[i] if op == "set" else readers[i]
        target = f"/{op}?key={quote_from_bytes(key, safe='')}"
        try:
            if op == "set":
                status, body = _request(address, "PUT", target, value, timeout)
            else:
                status, body = _request(address, "GET", target, None, timeout)
        except OSError as exc:
            status, body = None, str(exc).encode()
        if status != 200:
            with lock:
                errors.append(f"{op} {key!r} on {address}: {status} {body[:100]!r}")
        elif op == "get" and body != value:
            with lock:
                mismatches.append(f"get {key!r} on {address}: another value")

    def write(i: int) -> None:
        call(i, "set")

    def read(i: int) -> None:
        call(i, "get")

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(write, range(len(items))))
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        list(pool.map(read, range(len(items))))
        read_s = time.perf_counter() - started
    return {
        "nodes": addresses,
        "keys": keys,
        "concurrency": concurrency,
        "sets_per_s": keys / write_s,
        "gets_per_s": keys / read_s,
        "errors": len(errors),
        "mismatches": len(mismatches),
        "examples": (errors + mismatches)[:5],
    }


def cluster_load_test(
    directory: Path,
    *,
    backend: str,
    server: str,
    durability: str,
    host: str,
    shards: int,
    keys: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_cluster(
        directory,
        backend=backend,
        server=server,
        durability=durability,
        host=host,
        shards=shards,
    )
    nodes = start_nodes(config)
    try:
        progress(f"load test: {keys:,} random keys over {shards} nodes ({backend}, {server})")
        result = load_test([address for address, _ in nodes], keys=keys)
    finally:
        for _, child in nodes:
            child.stop()
    result.update(backend=backend, server=server)
    return result


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
        info["wrk"] = (version.stdout or version.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return info


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
