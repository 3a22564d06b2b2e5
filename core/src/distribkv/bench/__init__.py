"""``distribkv bench``: which backend, which server, which settings, side by side.

For every selected backend and server it starts a one-node cluster with identical settings,
loads keys with the client's ``set_many`` (the batch-load figure), then drives HTTP load with
wrk: a no-op endpoint on the same server (the ceiling), and GET, SET, 90/10 and 50/50 mixes
with uniform and zipfian keys (YCSB C, B-like, A-like). The same operations run on the backend
in-process, so every figure carries two ratios. The seeds' load test closes the run: 1,000
random keys sent to the nodes of a 3-node cluster and read back from others.

Each step is a line on standard error; on a terminal a progress bar below them counts the
steps (each backend and server, then the load test) with the time elapsed and left.

Needs the extra: ``pip install 'distribkv[bench]'`` (HdrHistogram, matplotlib), and wrk.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Counter", "Steps", "add_parser", "run"]


class Steps:
    """The run's progress. Every message is a line (``[  12.3s] text``) on standard error; on
    a terminal a ``rich`` bar below them counts the measured steps (each backend and server,
    then the load test) with the time elapsed and an estimate of the time left, which is
    fair because every step runs the same workloads."""

    def __init__(self, total: int, out=None):
        self.out = out or sys.stderr
        self.started = time.monotonic()
        self.bar: Any = None
        if self.out.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self.out),
            )
            self.task = self.bar.add_task("bench", total=max(total, 1), unit="steps")
            self.bar.start()
            # A run that fails still gives the terminal back as it was (cursor shown).
            import atexit

            atexit.register(self.close)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.out, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def counter(self, label: str, total: int) -> Counter:
        """The progress of one long load (keys): a second bar on a terminal, else a line
        every 5 seconds with the count, the rate and the time left."""
        return Counter(self, label, total)


class Counter:
    """See :meth:`Steps.counter`."""

    def __init__(self, steps: Steps, label: str, total: int):
        self.steps, self.label, self.total = steps, label, max(total, 1)
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.task = None
        if steps.bar is not None:
            self.task = steps.bar.add_task(label, total=self.total, unit="keys")

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def advance(self, count: int) -> None:
        self.done += count
        if self.task is not None:
            self.steps.bar.advance(self.task, count)
            return
        now = time.monotonic()
        if now - self.last_line >= 5.0:
            self.last_line = now
            rate = self.rate()
            left = (self.total - self.done) / rate if rate else 0.0
            self.steps.say(
                f"{self.label}: {self.done:,}/{self.total:,} keys ({rate:,.0f}/s,"
                f" about {left:,.0f} s left)"
            )

    def close(self) -> None:
        if self.task is not None and self.steps.bar is not None:
            self.steps.bar.remove_task(self.task)
            self.task = None


DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_parser(sub) -> argparse.ArgumentParser:
    from distribkv.bench.runner import FORWARDED, WORKLOADS
    from distribkv.config import address_argument

    bench = sub.add_parser(
        "bench",
        help="compare backends and servers under HTTP load (needs distribkv[bench] and wrk)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="the quick profile: 10,000 keys, 2 s per figure (about 2.5 minutes for 3 backends"
        " x 2 servers on 2 cores); default is the full profile: 100,000 keys, 10 s per figure",
    )
    bench.add_argument(
        "--backends",
        help="comma-separated storage backends (default: every installed one but memory)",
    )
    bench.add_argument(
        "--servers", help="comma-separated server plugins (default: every installed one)"
    )
    bench.add_argument("--seconds", type=float, help="seconds per figure (overrides the profile)")
    bench.add_argument(
        "--keys", type=int, help="keys loaded and drawn from (overrides the profile)"
    )
    bench.add_argument(
        "--workloads",
        help="comma-separated workloads (default: every one-node workload): "
        + ", ".join([*(w.name for w in WORKLOADS), *FORWARDED])
        + "; get-forwarded and set-forwarded (only when named) run on a cluster of two shards"
        ' with a replica each and routing = "proxy": wrk sends every request to the node that'
        " does not own its key, and the owner's direct GET or SET is measured beside it in the"
        " same run",
    )
    bench.add_argument(
        "--connections", type=int, default=16, help="wrk connections (default: %(default)s)"
    )
    bench.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (default: %(default)s)"
    )
    bench.add_argument(
        "--threads", type=int, default=8, help="server threads per node (default: %(default)s)"
    )
    bench.add_argument(
        "--value-size", type=int, default=100, help="bytes per value (default: %(default)s)"
    )
    bench.add_argument(
        "--durability",
        default="async",
        choices=["sync", "async"],
        help="[storage] durability of the nodes and of the in-process runs (default: async)",
    )
    bench.add_argument(
        "--host", default="127.0.0.1", help="loopback address the nodes bind (default: %(default)s)"
    )
    bench.add_argument(
        "--load-test-keys",
        type=int,
        help="keys of the seeds' load test (default: 1,000; 0 skips it)",
    )
    bench.add_argument(
        "--out",
        default="bench-results",
        help="directory for bench.json, bench.md and bench.png (default: %(default)s)",
    )
    bench.add_argument(
        "--node",
        metavar="HOST:PORT",
        type=address_argument,
        help="measure this running leader instead of starting nodes: its backend and server"
        " come from its /status; it receives bench-N keys of its own shard, and the load test's"
        " random keys go to every leader of its cluster",
    )
    bench.add_argument(
        "--node-pid",
        type=int,
        help="with --node: the node's PID, to report its CPU use (else shown as -)",
    )
    bench.add_argument(
        "--work-dir", help="where nodes keep data and logs (default: a temporary directory)"
    )
    bench.add_argument(
        "--compare-metrics",
        type=int,
        metavar="ROUNDS",
        help="instead of the workloads: GET throughput of a node with /metrics against the"
        " same node with [server] metrics = false, per backend and server, both running, wrk"
        " alternating between them ROUNDS times (medians; e.g. 5); run twice, with either node"
        " started first, and the start order's own effect reported beside the ratio",
    )
    bench.add_argument(
        "--pin",
        action="store_true",
        help="run every node on CPU 0 and wrk on CPU 1 (taskset): on a machine with other work,"
        " figures that vary less from run to run, at the cost of the node's use of more cores",
    )
    bench.add_argument(
        "--no-compact",
        action="store_true",
        help="do not compact the nodes after their bulk load (POST /compact): LevelDB and RocksDB"
        " then serve the workloads beside the compactions the load set off",
    )
    scale = bench.add_argument_group(
        "scale profile",
        "--scale: one node per backend, loaded step by step to each size (10^5, 10^6, 10^7"
        " keys of 100 random bytes); at each size GET (uniform, zipfian) and SET throughput"
        " and p99, disk bytes per key, start-up time, the resync of a new replica and (up to"
        " --scale-reshard-max keys) the time to reshard 2 -> 3 shards per million keys. Writes"
        " scale.json, scale.md and scale.png to --out. --seconds sets the wrk time per figure"
        " (default 5); --servers takes the first server named (default waitress).",
    )
    scale.add_argument("--scale", action="store_true", help="run the scale profile")
    scale.add_argument(
        "--scale-sizes",
        metavar="N,N,...",
        help="increasing key counts, e.g. 1e5,1e6,1e7 (the default)",
    )
    scale.add_argument(
        "--scale-max",
        action="store_true",
        help="go on to 10^8 keys (about 25 GB of disk per backend, hours)",
    )
    scale.add_argument(
        "--scale-reshard-max",
        metavar="N",
        default="1e6",
        help="measure the reshard at sizes up to N keys (default %(default)s; 0: never): each"
        " needs a cluster loaded from scratch",
    )
    scale.add_argument(
        "--scale-resync-max",
        metavar="N",
        help="measure the resync of a new replica at sizes up to N keys (default: every"
        " size; 0: never)",
    )
    bench.set_defaults(func=run)
    return bench


def _names(text: str | None, available: list[str], kind: str) -> list[str]:
    if not text:
        return available
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(
            f"distribkv bench: unknown {kind}: {', '.join(unknown)}"
            f" (available: {', '.join(available) or 'none'})"
        )
    return names


def _check_tools() -> None:
    missing = []
    for module, name in (("hdrh", "hdrhistogram"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"distribkv bench needs {', '.join(missing)}: pip install 'distribkv[bench]'"
        )
    from distribkv.bench.wrk import WrkError, wrk_path

    try:
        wrk_path()
    except WrkError as exc:
        raise SystemExit(f"distribkv bench: {exc}") from None


def _pin() -> None:
    """Nodes on CPU 0, wrk on CPU 1, each started under taskset."""
    import os
    import shutil

    from distribkv.bench import runner, wrk

    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("distribkv bench: --pin needs taskset (Debian: util-linux)")
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        raise SystemExit(f"distribkv bench: --pin needs CPUs 0 and 1; this process may use {cpus}")
    runner.NODE_PREFIX = [taskset, "-c", "0"]
    wrk.WRK_PREFIX = [taskset, "-c", "1"]


def run(args: argparse.Namespace) -> int:
    from distribkv.bench import report, runner
    from distribkv.client import BATCH_OPS
    from distribkv.plugins import load_plugins

    _check_tools()
    if args.pin:
        _pin()
    runner.COMPACT_AFTER_LOAD = not args.no_compact
    if args.scale:
        return _scale(args)
    registry = load_plugins()
    installed = registry.names("storage")
    backends = (
        _names(args.backends, installed, "backends")
        if args.backends
        else [b for b in installed if b != "memory"]
    )
    servers = _names(args.servers, registry.names("server"), "servers")
    base = runner.QUICK if args.quick else runner.FULL
    profile = runner.Profile(
        base.name,
        keys=args.keys or base.keys,
        seconds=args.seconds or base.seconds,
        raw_seconds=min(base.raw_seconds, args.seconds or base.raw_seconds),
        load_test_keys=base.load_test_keys if args.load_test_keys is None else args.load_test_keys,
    )
    one_node = [w.name for w in runner.WORKLOADS]
    workloads = (
        _names(args.workloads, [*one_node, *runner.FORWARDED], "workloads")
        if args.workloads
        else one_node
    )
    selected = [w for w in runner.WORKLOADS if w.name in workloads]
    forwarded = [name for name in runner.FORWARDED if name in workloads]
    if profile.keys < 2:
        raise SystemExit("distribkv bench: --keys must be at least 2")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(backends) * len(servers)
    started = time.monotonic()
    step = [0]
    load_test = bool(profile.load_test_keys and (args.node or (backends and servers)))
    steps = Steps((1 if args.node else total) + load_test)
    progress = steps.say

    results: dict[str, Any] = {
        "meta": {
            "command": "distribkv bench " + shlex.join(sys.argv[2:] if len(sys.argv) > 1 else []),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "profile": profile.name,
            "keys": profile.keys,
            "seconds": profile.seconds,
            "raw_seconds": profile.raw_seconds,
            "connections": args.connections,
            "wrk_threads": args.wrk_threads,
            "threads": args.threads,
            "value_size": args.value_size,
            "durability": args.durability,
            "compacted_after_load": not args.no_compact,
            "backends": backends,
            "servers": servers,
            "machine": runner.machine(),
        },
        "rows": [],
        "raw": {},
    }
    if args.work_dir is not None:
        try:
            Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"distribkv bench: --work-dir {args.work_dir}: {exc.strerror}"
            raise SystemExit(message) from None
    if args.compare_metrics is not None:
        if args.node:
            raise SystemExit("distribkv bench: --compare-metrics starts its own nodes; no --node")
        if args.compare_metrics < 1:
            raise SystemExit("distribkv bench: --compare-metrics needs 1 round or more")
    with tempfile.TemporaryDirectory(prefix="distribkv-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.compare_metrics is not None:
            results["metrics"] = [
                runner.compare_metrics(
                    backend,
                    server,
                    work / f"{backend}-{server}",
                    profile=profile,
                    durability=args.durability,
                    host=args.host,
                    threads=args.threads,
                    connections=args.connections,
                    wrk_threads=args.wrk_threads,
                    value_size=args.value_size,
                    rounds=args.compare_metrics,
                    progress=progress,
                )
                for backend in backends
                for server in servers
            ]
            backends = []  # the comparison only
        for backend in [] if args.node or not selected else backends:
            raw = runner.raw_backend(
                backend,
                work / f"raw-{backend}",
                profile=profile,
                durability=args.durability,
                value_size=args.value_size,
                batch=BATCH_OPS,
                workloads=selected,
                progress=progress,
            )
            results["raw"][backend] = raw
            for server in servers:
                step[0] += 1
                progress(f"[{step[0]}/{total}] {backend} + {server}: starting a node")
                rows = runner.run_node(
                    backend,
                    server,
                    work / f"{backend}-{server}",
                    profile=profile,
                    durability=args.durability,
                    host=args.host,
                    connections=args.connections,
                    wrk_threads=args.wrk_threads,
                    value_size=args.value_size,
                    threads=args.threads,
                    workloads=selected,
                    progress=progress,
                )
                results["rows"].extend(_with_raw(rows, raw, progress))
                steps.step()
        for backend in [] if args.node or not forwarded else backends:
            for server in servers:
                progress(f"{backend} + {server}: a two-shard proxy cluster, forwarded requests")
                rows = runner.run_forwarded(
                    backend,
                    server,
                    work / f"{backend}-{server}-proxy",
                    durability=args.durability,
                    host=args.host,
                    threads=args.threads,
                    names=forwarded,
                    profile=profile,
                    connections=args.connections,
                    wrk_threads=args.wrk_threads,
                    value_size=args.value_size,
                    progress=progress,
                )
                results["rows"].extend(_with_raw(rows, {}, progress))
                if not selected:
                    steps.step()
        if args.node:
            _against_node(args, results, runner, work, profile, selected, progress, steps)
        elif profile.load_test_keys and backends and servers and not results.get("metrics"):
            results["load_test"] = runner.cluster_load_test(
                work / "load-test",
                backend=backends[0],
                server=servers[0],
                durability=args.durability,
                host=args.host,
                shards=3,
                keys=profile.load_test_keys,
                progress=progress,
            )
            steps.step()
    steps.close()
    results["meta"]["duration_s"] = time.monotonic() - started
    runner.dump_json(out_dir / "bench.json", results)
    (out_dir / "bench.md").write_text(report.markdown(results))
    report.png(results, out_dir / "bench.png")
    print(report.table(results))
    print(
        f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}, {out_dir / 'bench.png'}"
        f" in {results['meta']['duration_s']:.0f} s"
    )
    failed = sum(row.get("errors") or 0 for row in results["rows"] + results.get("metrics", []))
    load = results.get("load_test") or {}
    if failed or load.get("errors") or load.get("mismatches"):
        print("distribkv bench: some requests failed (see the errors column)", file=sys.stderr)
        return 1
    return 0


def _count(text: str, option: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"distribkv bench: {option}: {text!r} is not a number of keys") from None
    if value < 0 or value != int(value):
        raise SystemExit(f"distribkv bench: {option}: {text!r} is not a whole number >= 0")
    return int(value)


def _scale(args: argparse.Namespace) -> int:
    """``--scale``: see :mod:`distribkv.bench.scale`."""
    from distribkv.bench import runner, scale, scalereport
    from distribkv.plugins import load_plugins

    if args.node or args.compare_metrics is not None:
        raise SystemExit(
            "distribkv bench: --scale starts its own nodes (no --node, no --compare-metrics)"
        )
    registry = load_plugins()
    installed = registry.names("storage")
    # Every figure after a restart needs the data to survive it: persistent engines only.
    persistent = [b for b in installed if registry.storage_backend(b).capabilities.persistent]
    backends = _names(args.backends, persistent, "persistent backends")
    servers = _names(args.servers, registry.names("server"), "servers")
    server = servers[0] if args.servers else "waitress"
    try:
        sizes = (
            scale.parse_sizes(args.scale_sizes) if args.scale_sizes else list(scale.DEFAULT_SIZES)
        )
    except ValueError as exc:
        raise SystemExit(f"distribkv bench: {exc}") from None
    if args.scale_max and scale.MAX_SIZE not in sizes:
        if sizes[-1] > scale.MAX_SIZE:
            raise SystemExit(
                "distribkv bench: --scale-max adds 10^8 keys; --scale-sizes goes past it"
            )
        sizes.append(scale.MAX_SIZE)
    reshard_max = _count(args.scale_reshard_max, "--scale-reshard-max")
    resync_max = (
        None
        if args.scale_resync_max is None
        else _count(args.scale_resync_max, "--scale-resync-max")
    )
    settings = {
        "seconds": args.seconds or 5.0,
        "connections": args.connections,
        "wrk_threads": args.wrk_threads,
        "threads": args.threads,
        "value_size": args.value_size,
        "durability": args.durability,
        "host": args.host,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.work_dir is not None:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    # The leader and a replica each hold the largest size, at up to about 2.5 times the raw
    # bytes (measured: 250 to 360 bytes a key of 100-byte values on LMDB): fail now, not at
    # the last and longest step.
    need = 2 * sizes[-1] * (args.value_size + 20) * 2.5
    free = shutil.disk_usage(args.work_dir or tempfile.gettempdir()).free
    if need > free:
        raise SystemExit(
            f"distribkv bench: --scale up to {sizes[-1]:,} keys needs about {need / 1e9:,.0f} GB"
            f" of disk, and {args.work_dir or tempfile.gettempdir()} has {free / 1e9:,.0f} GB"
            " free: choose another --work-dir or smaller --scale-sizes"
        )
    results: dict[str, Any] = {
        "meta": {
            "command": "distribkv bench " + shlex.join(sys.argv[2:] if len(sys.argv) > 1 else []),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "profile": "scale",
            "sizes": sizes,
            "server": server,
            "backends": backends,
            "pin": args.pin,
            "reshard_max": reshard_max,
            "resync_max": resync_max,
            "measures": list(scale.MEASURES),
            "machine": runner.machine(),
            **settings,
        },
        "runs": {},
    }
    started = time.monotonic()
    steps = Steps(len(backends) * len(sizes))
    try:
        with tempfile.TemporaryDirectory(prefix="distribkv-scale-", dir=args.work_dir) as tmp:
            for backend in backends:
                results["runs"][backend] = scale.run_backend(
                    backend,
                    server,
                    Path(tmp) / backend,
                    sizes=sizes,
                    settings=settings,
                    resync_max=resync_max,
                    reshard_max=reshard_max,
                    steps=steps,
                )
                # A backend's data goes before the next one's (10^8 keys take tens of GB).
                shutil.rmtree(Path(tmp) / backend, ignore_errors=True)
                # Each backend's figures are kept as soon as they exist.
                results["meta"]["duration_s"] = time.monotonic() - started
                runner.dump_json(out_dir / "scale.json", results)
    finally:
        steps.close()
    results["meta"]["duration_s"] = time.monotonic() - started
    runner.dump_json(out_dir / "scale.json", results)
    (out_dir / "scale.md").write_text(scalereport.markdown(results))
    scalereport.png(results, out_dir / "scale.png")
    print(scalereport.table(results))
    print(
        f"\nwrote {out_dir / 'scale.json'}, {out_dir / 'scale.md'}, {out_dir / 'scale.png'}"
        f" in {results['meta']['duration_s']:.0f} s"
    )
    errors = sum(
        row["errors"]
        for run in results["runs"].values()
        for step in run["steps"]
        for row in step["workloads"].values()
    )
    if errors:
        print("distribkv bench: some requests failed (see scale.json)", file=sys.stderr)
        return 1
    return 0


def _with_raw(rows: list[dict], raw: dict[str, float], progress) -> list[dict]:
    for row in rows:
        if row["workload"] in raw:
            row["raw_rps"] = raw[row["workload"]]
            row["ratio_raw"] = row["rps"] / raw[row["workload"]]
        progress(_row_line(row))
    return rows


def _against_node(
    args, results, runner, work: Path, profile, selected, progress, steps: Steps
) -> None:
    """The workloads against a running leader (``--node``), its backend measured in-process
    and a no-op on its server plugin beside it; then the load test over every leader."""
    import http.client
    import json

    from distribkv.client import BATCH_OPS, Client

    host, _, port = args.node.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        status = json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"distribkv bench: cannot read {args.node}/status: {exc}") from None
    finally:
        conn.close()
    if not status or status.get("role") != "leader":
        raise SystemExit(f"distribkv bench: {args.node} is not a leader (writes need one)")
    backend, server = status["backend"], status.get("server", "waitress")
    meta = results["meta"]
    meta.update(node=args.node, backends=[backend], servers=[server])
    meta["durability"] = status.get("durability", args.durability)
    keys = runner.owned_keys(args.node, profile.keys)
    raw = runner.raw_backend(
        backend,
        work / f"raw-{backend}",
        profile=profile,
        durability=meta["durability"],
        value_size=args.value_size,
        batch=BATCH_OPS,
        workloads=selected,
        progress=progress,
    )
    results["raw"][backend] = raw
    rows = runner.measure_node(
        args.node,
        args.node_pid,
        backend=backend,
        server=server,
        directory=work / "node",
        host=args.host,
        threads=args.threads,
        profile=profile,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        value_size=args.value_size,
        workloads=selected,
        progress=progress,
        keys=keys,
    )
    results["rows"].extend(_with_raw(rows, raw, progress))
    steps.step()
    if profile.load_test_keys:
        client = Client([args.node])
        leaders = [shard.leader for shard in client.map.shards]
        client.close()
        progress(f"load test: {profile.load_test_keys:,} random keys over {len(leaders)} nodes")
        load = runner.load_test(leaders, keys=profile.load_test_keys)
        load.update(backend=backend, server=server)
        results["load_test"] = load
        steps.step()


def _row_line(row: dict[str, Any]) -> str:
    text = (
        f"  {row['backend']} + {row['server']} {row['workload']}: {row['rps']:,.0f} {row['unit']}"
    )
    if row.get("ratio_noop") is not None:
        text += f", {row['ratio_noop']:.2f}x no-op"
    if row.get("ratio_healthz") is not None:
        text += f", {row['ratio_healthz']:.2f}x /healthz"
    if row.get("ratio_raw") is not None:
        text += f", {row['ratio_raw']:.3f}x in-process"
    if row.get("ratio_owner") is not None:
        text += f", {row['ratio_owner']:.2f}x the owner"
    if row.get("latency_ms"):
        text += f", p99 {row['latency_ms']['p99']:.2f} ms"
    if row.get("errors"):
        text += f", {row['errors']} errors"
    return text
