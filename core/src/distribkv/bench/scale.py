"""``distribkv bench --scale``: how a node's figures change with the number of keys it holds.

One node per backend is loaded step by step (10⁵ keys, measure, up to 10⁶, measure, ...) with
incompressible 100-byte values, so every step measures the same data set, grown. At each size:

- GET (uniform and zipfian keys) and SET throughput and p99 with wrk;
- disk bytes per key (the node's data directory, after a restart, divided by the keys);
- start-up: from the process start to ``/healthz`` answering, with the data in place;
- resync: a new, empty replica is started and loads a full snapshot from the leader; the time
  from its process start until its ``/status`` says the resync is done (and readable);
- reshard: a separate two-shard cluster (ring hashing) holding the same number of keys gets a
  third shard with ``distribkv reshard``; its time per million keys held. It needs a cluster
  loaded from scratch at each size, so it runs up to ``--scale-reshard-max`` keys only.

The load goes through the client's ``set_many`` (the node's ``/batch``, 1,000 ops a request,
requests in parallel): the client takes about a fifth of the CPU the node does, so the node's
write path is what the rate measures.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distribkv.bench import runner
from distribkv.bench.wrk import corrected_percentiles, lua_script, run_wrk

__all__ = ["DEFAULT_SIZES", "MAX_SIZE", "parse_sizes", "run_backend"]

DEFAULT_SIZES = (100_000, 1_000_000, 10_000_000)
MAX_SIZE = 100_000_000
#: The reshard measure needs a cluster loaded from scratch: by default up to this many keys.
DEFAULT_RESHARD_MAX = 1_000_000
#: Keys per ``set_many`` call (the client sends them as /batch requests of 1,000, in parallel).
LOAD_CHUNK = 50_000
#: The random bytes that values are cut from: incompressible, so that disk bytes per key are
#: not flattered by a compressing engine (LevelDB, RocksDB) as "vvvv..." values would be.
POOL_BYTES = 1 << 20
SCALE_WORKLOADS = (
    ("get-uniform", 1.0, False),
    ("get-zipfian", 1.0, True),
    ("set-uniform", 0.0, False),
)
#: The figures of every step, for the report and the test (each is a key of a step's dict,
#: or of its ``workloads``).
MEASURES = (
    "load_keys_per_s",
    "disk_bytes_per_key",
    "startup_s",
    "resync_s",
    "reshard_s_per_million",
    *(name for name, _, _ in SCALE_WORKLOADS),
)


def parse_sizes(text: str) -> list[int]:
    """``"1e5,1e6,1e7"`` or ``"100000,1000000"``: increasing key counts, each at least 2."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--scale-sizes: {part!r} is not a number of keys") from None
        if value != int(value) or value < 2:
            raise ValueError(f"--scale-sizes: {part!r} is not a whole number of keys >= 2")
        sizes.append(int(value))
    if sizes != sorted(set(sizes)):
        raise ValueError("--scale-sizes: the sizes must increase (the data set grows)")
    return sizes


class Values:
    """Value ``i``: 100 (``size``) bytes cut from a random pool at an offset that depends on
    ``i``; the same run to run (seeded), different from key to key, incompressible."""

    def __init__(self, size: int, seed: int = 11):
        self.size = size
        self.pool = random.Random(seed).randbytes(POOL_BYTES + size)

    def __call__(self, i: int) -> bytes:
        offset = (i * 7919) % POOL_BYTES
        return self.pool[offset : offset + self.size]


def load(
    address: str,
    first: int,
    upto: int,
    values: Values,
    counter,
    *,
    key_name: Callable[[int], bytes] = runner.key_name,
) -> float:
    """Keys ``first..upto-1`` through the client's ``set_many``; keys per second."""
    from distribkv.client import Client

    client = Client([address], timeout=60)
    try:
        started = time.perf_counter()
        for start in range(first, upto, LOAD_CHUNK):
            end = min(upto, start + LOAD_CHUNK)
            client.set_many([(key_name(i), values(i)) for i in range(start, end)])
            counter.advance(end - start)
        return (upto - first) / max(time.perf_counter() - started, 1e-9)
    finally:
        client.close()
        counter.close()


def _status(address: str) -> dict[str, Any] | None:
    import http.client

    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def _wrk(address: str, pid: int, name: str, keys: int, *, read_ratio, zipf, directory, settings):
    result = run_wrk(
        f"http://{address}",
        lua_script(
            name, keys=keys, value_size=settings["value_size"], read_ratio=read_ratio, zipf=zipf
        ),
        seconds=settings["seconds"],
        connections=settings["connections"],
        threads=settings["wrk_threads"],
        server_pid=pid,
        workdir=directory,
        name=name,
    )
    return {
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "requests": result["requests"],
        "latency_ms": corrected_percentiles(result, settings["connections"]),
        "errors": sum(result["errors"].values()),
        "server_cpu": result["server_cpu"],
    }


def _restart(child: runner.Child) -> tuple[float, float]:
    """Stop the node and start it again: (seconds to stop, seconds from the process start to
    /healthz answering)."""
    started = time.perf_counter()
    child.stop()
    stopped = time.perf_counter()
    child.start()
    return stopped - started, time.perf_counter() - stopped


def _resync(config: Path, keys: int, progress) -> dict[str, Any]:
    """Start the shard's replica on an empty data directory and wait until it has loaded the
    leader's snapshot (its /status: resync done, readable)."""
    from distribkv.config import load_config

    node = load_config(config).node("s0", 0)
    shutil.rmtree(node.data_dir, ignore_errors=True)
    address = str(node.address)
    child = runner.node_child(config, "s0", 0)
    limit = max(300.0, keys / 2_000)  # bounded: far slower than any resync seen here
    progress(f"  resync: a new replica loads {keys:,} keys from the leader")
    started = time.perf_counter()
    try:
        child.start()
        deadline = time.monotonic() + limit
        while True:
            status = _status(address) or {}
            replication = status.get("replication") or {}
            resync = replication.get("resync") or {}
            if resync.get("outcome") == "done" and replication.get("readable"):
                seconds = time.perf_counter() - started
                break
            if time.monotonic() > deadline:
                raise runner.BenchError(f"the replica did not resync {keys:,} keys in {limit:.0f}s")
            time.sleep(0.1)
        from distribkv.storage.api import disk_usage

        return {
            "seconds": seconds,
            "resync_seconds": resync.get("seconds"),
            "keys_copied": resync.get("keys_copied"),
            "keys_per_s": keys / seconds,
            "replica_disk_bytes": disk_usage(node.data_dir),
        }
    finally:
        child.stop()
        shutil.rmtree(node.data_dir, ignore_errors=True)


def _timed_lines(cmd: list[str], timeout: float) -> tuple[list[str], int, str]:
    """Run ``cmd``; its standard error as lines, each prefixed with the seconds since the
    start at which it came, its exit status and its standard output."""
    import threading

    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    chunks: list[str] = []

    def read_out() -> None:
        assert process.stdout is not None
        chunks.append(process.stdout.read())

    reader = threading.Thread(target=read_out, daemon=True)
    reader.start()
    # Bounded: a process that outlives the timeout is killed, which ends its output.
    killer = threading.Timer(timeout, process.kill)
    killer.start()
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(f"{time.perf_counter() - started:8.2f}  {line.rstrip()}")
        code = process.wait(timeout=30)
    finally:
        killer.cancel()
    if time.perf_counter() - started >= timeout:
        raise runner.BenchError(f"{' '.join(cmd[3:5])} did not finish in {timeout:.0f}s")
    reader.join(timeout=10)
    return lines, code, "".join(chunks)


def _reshard(
    directory: Path,
    *,
    backend: str,
    server: str,
    durability: str,
    host: str,
    threads: int,
    keys: int,
    values: Values,
    steps,
) -> dict[str, Any]:
    """A two-shard cluster (ring hashing) loaded with ``keys`` keys gets a third shard:
    ``distribkv reshard --from old --to new``; its own time and the time per million keys."""
    directory.mkdir(parents=True, exist_ok=True)
    new = runner.write_cluster(
        directory,
        backend=backend,
        server=server,
        durability=durability,
        host=host,
        shards=3,
        threads=threads,
        hashing="ring",
        file_name="new.toml",
    )
    text = new.read_text()
    old = directory / "old.toml"
    old.write_text(text[: text.index('[[shards]]\nname = "s2"')])
    children = []
    try:
        for config, shard in ((old, "s0"), (old, "s1"), (new, "s2")):
            children.append(runner.node_child(config, shard).start())
        seed = text.split('address = "', 1)[1].split('"', 1)[0]
        rate = load(seed, 0, keys, values, steps.counter(f"  reshard: load of {keys:,} keys", keys))
        steps.say(f"  reshard: {keys:,} keys loaded ({rate:,.0f} keys/s); 2 -> 3 shards")
        cmd = [sys.executable, "-m", "distribkv", "reshard", "--from", str(old), "--to", str(new)]
        output, code, stdout = _timed_lines([*cmd, "--json"], max(600.0, keys / 1_000))
        if code != 0:
            raise runner.BenchError("distribkv reshard failed:\n" + "\n".join(output[-30:]))
        result = json.loads(stdout)
    finally:
        for child in children:
            child.stop()
        shutil.rmtree(directory, ignore_errors=True)
    seconds = result["seconds"]
    moved = result["plan"]["moved"]
    return {
        "keys": keys,
        "hashing": "ring",
        "moved": moved,
        "seconds": seconds,
        # Its lines, each after the seconds at which it came: where the time went.
        "output": output,
        "s_per_million": seconds / (keys / 1e6),
        "moved_per_s": moved / seconds if seconds else None,
    }


def run_backend(
    backend: str,
    server: str,
    directory: Path,
    *,
    sizes: list[int],
    settings: dict[str, Any],
    resync_max: int | None,
    reshard_max: int,
    steps,
) -> dict[str, Any]:
    """Every size in turn on one node of ``backend``; one dict per size."""
    from distribkv.config import load_config
    from distribkv.storage.api import disk_usage

    say = steps.say
    directory.mkdir(parents=True, exist_ok=True)
    config = runner.write_cluster(
        directory,
        backend=backend,
        server=server,
        durability=settings["durability"],
        host=settings["host"],
        threads=settings["threads"],
        replicas=1,
    )
    leader = load_config(config).node("s0")
    address = str(leader.address)
    values = Values(settings["value_size"])
    out: list[dict[str, Any]] = []
    started = time.perf_counter()
    child = runner.node_child(config, "s0").start()
    try:
        loaded = 0
        for size in sizes:
            say(f"{backend}: {size:,} keys")
            counter = steps.counter(f"{backend}: load {loaded:,} -> {size:,}", size - loaded)
            rate = load(address, loaded, size, values, counter)
            say(f"  load: {size - loaded:,} keys at {rate:,.0f} keys/s (set_many)")
            loaded = size
            stop_s, startup_s = _restart(child)
            say(f"  start-up with {size:,} keys: {startup_s:.2f} s (stop {stop_s:.2f} s)")
            disk = disk_usage(leader.data_dir)
            step: dict[str, Any] = {
                "keys": size,
                "load_keys_per_s": rate,
                "stop_s": stop_s,
                "startup_s": startup_s,
                "disk_bytes": disk,
                "disk_bytes_per_key": disk / size,
                "workloads": {},
            }
            for name, read_ratio, zipf in SCALE_WORKLOADS:
                say(f"  {name} ({settings['seconds']:g} s, wrk)")
                row = _wrk(
                    address,
                    child.pid,
                    name,
                    size,
                    read_ratio=read_ratio,
                    zipf=zipf,
                    directory=directory,
                    settings=settings,
                )
                step["workloads"][name] = row
                say(
                    f"    {row['rps']:,.0f} req/s, p99 {row['latency_ms'].get('p99', 0):.2f} ms,"
                    f" {row['errors']} errors"
                )
            if resync_max is None or size <= resync_max:
                step["resync"] = _resync(config, size, say)
                step["resync_s"] = step["resync"]["seconds"]
                rate = step["resync"]["keys_per_s"]
                say(f"  resync: {step['resync_s']:.1f} s ({rate:,.0f} keys/s)")
            if size <= reshard_max:
                step["reshard"] = _reshard(
                    directory / "reshard",
                    backend=backend,
                    server=server,
                    durability=settings["durability"],
                    host=settings["host"],
                    threads=settings["threads"],
                    keys=size,
                    values=values,
                    steps=steps,
                )
                step["reshard_s_per_million"] = step["reshard"]["s_per_million"]
                say(
                    f"  reshard 2 -> 3: {step['reshard']['seconds']:.1f} s,"
                    f" {step['reshard_s_per_million']:.1f} s per million keys"
                )
            out.append(step)
            steps.step()
    finally:
        child.stop()
    return {
        "backend": backend,
        "server": server,
        "steps": out,
        "seconds": time.perf_counter() - started,
    }
