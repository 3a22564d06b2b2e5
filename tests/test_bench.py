"""`distribkv bench` end to end, on the backend under test and every installed server: short
figures, but real nodes, real wrk load and real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("hdrh")
pytest.importorskip("matplotlib")

from distribkv.bench.runner import WORKLOADS, ZipfPicker, load_test
from distribkv.testing.cluster import Cluster, call, write_config

# CI installs wrk (.ci/run), so there the test always runs.
needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None and not os.environ.get("CI"), reason="wrk is not installed"
)


def run_bench(*args: str, timeout: float, expect: int = 0) -> subprocess.CompletedProcess:
    """``distribkv bench`` with ``args``; the test fails with its output unless it exits
    with ``expect``."""
    result = subprocess.run(
        [sys.executable, "-m", "distribkv", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@needs_wrk
def test_bench_measures_every_workload_with_its_ratios_and_writes_its_files(
    tmp_path, hosts, backend_name
):
    if backend_name == "memory":
        pytest.skip("the benchmark compares persistent backends")
    out = tmp_path / "out"
    result = run_bench(
        "--quick",
        "--backends",
        backend_name,
        "--seconds",
        "1",
        "--keys",
        "500",
        "--load-test-keys",
        "300",
        "--host",
        hosts.host(),
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        timeout=600,
    )
    data = json.loads((out / "bench.json").read_text())
    servers = data["meta"]["servers"]
    assert "waitress" in servers
    expected = {"batch-load", "noop", "healthz", *(w.name for w in WORKLOADS)}
    for server in servers:
        rows = {r["workload"]: r for r in data["rows"] if r["server"] == server}
        assert set(rows) == expected
        for name, row in rows.items():
            assert row["rps"] > 0 and row["backend"] == backend_name
            if name == "batch-load":
                assert 0 < row["ratio_raw"]
                continue
            assert row["errors"] == 0, row
            assert row["requests"] > 0
            latency = row["latency_ms"]
            assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["p99.9"]
            assert latency["p99.9"] < 10_000  # wrk's timeout: no request waited longer
            assert 0 < row["latency_uncorrected_ms"]["p50"]
            assert row["server_cpu"] > 0 and row["wrk_cpu"] > 0
            if name not in ("noop", "healthz"):
                assert row["ratio_noop"] > 0 and row["ratio_raw"] > 0 and row["ratio_healthz"] > 0
    load = data["load_test"]
    assert (load["keys"], load["errors"], load["mismatches"]) == (300, 0, 0)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "bench.md").read_text()
    assert "| backend |" in markdown and "get-zipfian" in markdown
    assert "GET" in result.stdout and "load test: 300 random keys" in result.stdout


@needs_wrk
def test_bench_measures_forwarded_requests_beside_the_owners(tmp_path, hosts, backend_name):
    if backend_name == "memory":
        pytest.skip("the benchmark compares persistent backends")
    out = tmp_path / "out"
    result = run_bench(
        "--quick",
        "--backends",
        backend_name,
        "--servers",
        "waitress",
        "--workloads",
        "get-forwarded,set-forwarded",
        "--seconds",
        "1",
        "--keys",
        "200",
        "--load-test-keys",
        "0",
        "--host",
        hosts.host(),
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        timeout=600,
    )
    rows = {r["workload"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"get-owner", "get-forwarded", "set-owner", "set-forwarded"}
    for name, row in rows.items():
        assert row["requests"] > 0 and row["errors"] == 0, (name, row)
    for kind in ("get", "set"):
        forwarded = rows[f"{kind}-forwarded"]
        assert forwarded["ratio_owner"] == pytest.approx(
            forwarded["rps"] / rows[f"{kind}-owner"]["rps"]
        )
    assert "forwarded / owner" in result.stdout
    assert "## Forwarded requests" in (out / "bench.md").read_text()


def test_the_zipfian_picker_favours_low_ranks_and_stays_in_range():
    import random

    pick = ZipfPicker(1000, random.Random(3))
    draws = [pick() for _ in range(20_000)]
    assert min(draws) >= 0 and max(draws) <= 999
    # With theta 0.99 the first 1% of the keys take far more than 1% of the draws.
    hot = sum(1 for d in draws if d < 10) / len(draws)
    assert hot > 0.3


def test_the_load_test_reports_a_node_that_loses_writes(tmp_path, hosts):
    """The load test can fail: against a server that acknowledges and forgets, it counts."""
    import http.server
    import threading

    class Forgetful(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    host = hosts.host()
    server = http.server.ThreadingHTTPServer((host, 0), Forgetful)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"{host}:{server.server_address[1]}"
        result = load_test([address], keys=50, concurrency=4, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert result["errors"] == 50 and result["mismatches"] == 0


@needs_wrk
def test_bench_compares_metrics_on_and_off_in_both_start_orders(tmp_path, hosts, backend_name):
    if backend_name != "lmdb":
        pytest.skip("a comparison of the node's own routes: one backend is enough")
    out = tmp_path / "out"
    run_bench(
        "--backends",
        backend_name,
        "--servers",
        "waitress",
        "--compare-metrics",
        "1",
        "--seconds",
        "1",
        "--keys",
        "200",
        "--host",
        hosts.host(),
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        timeout=300,
    )
    data = json.loads((out / "bench.json").read_text())
    [row] = data["metrics"]
    assert (row["backend"], row["server"], row["rounds"]) == (backend_name, "waitress", 1)
    assert [s["first"] for s in row["sessions"]] == ["on", "off"]
    for session in row["sessions"]:
        for label in ("on", "off"):
            [run] = session["runs"][label]
            assert run["rps"] > 0 and run["rps_per_cpu"] > 0 and run["errors"] == 0
    first, second = (s["ratio"] for s in row["sessions"])
    assert row["ratio"] == pytest.approx((first * second) ** 0.5)
    assert row["start_bias"] == pytest.approx((first / second) ** 0.5)
    assert row["errors"] == 0
    assert "## GET with metrics on and off" in (out / "bench.md").read_text()


@needs_wrk
def test_bench_measures_a_running_leader_with_keys_of_its_own_shard(tmp_path, hosts, backend_name):
    path = write_config(tmp_path, hosts=hosts, shards=2, backend=backend_name, hashing="ring")
    with Cluster(path) as cluster:
        leader = cluster.address("shard-1")
        pid = int(cluster.nodes["shard-1/leader"]["PID"])
        out = tmp_path / "out"
        run_bench(
            "--node",
            leader,
            "--node-pid",
            str(pid),
            "--workloads",
            "get-uniform,set-zipfian",
            "--seconds",
            "1",
            "--keys",
            "300",
            "--load-test-keys",
            "100",
            "--host",
            hosts.host(),
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path),
            timeout=300,
        )
        data = json.loads((out / "bench.json").read_text())
        assert data["meta"]["node"] == leader and data["meta"]["backends"] == [backend_name]
        rows = {r["workload"]: r for r in data["rows"]}
        assert set(rows) == {"batch-load", "noop", "healthz", "get-uniform", "set-zipfian"}
        # Every request was the leader's own: no redirect, no error, and its CPU was seen.
        assert all(rows[w]["errors"] == 0 for w in ("get-uniform", "set-zipfian"))
        assert rows["get-uniform"]["server_cpu"] > 0
        # /digest counts exactly (/status may estimate).
        mine = json.loads(call(leader, "GET", "/digest").body)
        assert mine["keys"] >= 300
        other = json.loads(call(cluster.address("shard-0"), "GET", "/digest").body)
        assert set(data["load_test"]["nodes"]) == {leader, cluster.address("shard-0")}
        assert (data["load_test"]["errors"], data["load_test"]["mismatches"]) == (0, 0)
        # The bench keys went to shard-1 only; shard-0 holds just load-test keys.
        assert other["keys"] <= 100


@needs_wrk
def test_bench_scale_grows_one_node_and_measures_every_figure_at_each_size(
    tmp_path, hosts, backend_name
):
    if backend_name != "lmdb":
        # The profile's plumbing is the same for every backend: CI pays for it once.
        pytest.skip("bench --scale is tested on lmdb")
    from distribkv.bench.scale import MEASURES

    out = tmp_path / "out"
    result = run_bench(
        "--scale",
        "--backends",
        backend_name,
        "--scale-sizes",
        "2e3,5000",
        "--scale-reshard-max",
        "2000",
        "--seconds",
        "1",
        "--host",
        hosts.host(),
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        timeout=300,
    )
    data = json.loads((out / "scale.json").read_text())
    assert data["meta"]["sizes"] == [2000, 5000]
    steps = data["runs"][backend_name]["steps"]
    assert [s["keys"] for s in steps] == [2000, 5000]
    for step in steps:
        assert step["load_keys_per_s"] > 0 and step["startup_s"] > 0
        # 100 random bytes a value cannot take less room than that on disk, nor 50 times it.
        assert 100 < step["disk_bytes_per_key"] < 5000
        for name in ("get-uniform", "get-zipfian", "set-uniform"):
            row = step["workloads"][name]
            assert row["rps"] > 0 and row["errors"] == 0 and row["latency_ms"]["p99"] > 0
        # The new replica holds every key of the leader, in a data directory of its own.
        assert step["resync"]["keys_copied"] == step["keys"]
        assert step["resync_s"] > 0 and step["resync"]["replica_disk_bytes"] > 0
    reshard = steps[0]["reshard"]
    assert 0 < reshard["moved"] < 2000 and reshard["s_per_million"] > 0
    assert any("purge" in line for line in reshard["output"])  # its lines, timed
    assert "reshard" not in steps[1]  # above --scale-reshard-max
    markdown = (out / "scale.md").read_text()
    assert "| backend | keys |" in markdown and f"| {backend_name} | 5k |" in markdown
    for column in ("GET zipfian /s", "disk B/key", "start-up s", "resync s", "reshard s/M keys"):
        assert column in markdown
    assert set(MEASURES) <= {k for s in steps[:1] for k in (*s, *s["workloads"])}
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "load: 3,000 keys at" in result.stderr


def test_scale_sizes_must_be_whole_and_increasing():
    from distribkv.bench.scale import parse_sizes

    assert parse_sizes("1e5, 1_000_000,1e7") == [100_000, 1_000_000, 10_000_000]
    for bad in ("1e5,1e4", "1e5,1e5", "1.5", "lots", "1"):
        with pytest.raises(ValueError, match="--scale-sizes"):
            parse_sizes(bad)


@needs_wrk
def test_bench_scale_refuses_sizes_the_disk_cannot_hold_before_it_starts(tmp_path):
    result = run_bench(
        "--scale",
        "--scale-sizes",
        "1e5,1e13",
        "--out",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path),
        timeout=60,
        expect=1,
    )
    assert "needs about" in result.stderr and "--work-dir" in result.stderr
    assert not (tmp_path / "out" / "scale.json").exists()
