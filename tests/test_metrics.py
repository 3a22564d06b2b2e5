"""``GET /metrics`` of running clusters: the series a leader and a replica show, moving with
the traffic the test sends, on both servers; ``promtool check metrics`` on them; and a real
Prometheus that scrapes the cluster and answers PromQL queries about it.

Each server gets one cluster (launched, on loopback hosts of its own) of two shards, shard-0
with a replica, ``[server] metrics_port`` set, the backend under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import types
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distribkv.hashing.modulo import fnv1_64
from distribkv.testing import cluster_fixture
from distribkv.testing.cluster import (
    Cluster,
    Connection,
    allocate_hosts,
    call,
    free_port_on,
    node_addresses,
    q,
    wait_until,
    write_config,
)

REQUESTS = "distribkv_http_requests_total"
DURATION = "distribkv_http_request_duration_seconds"


def key_of(shard: int, prefix: str, n: int = 0) -> bytes:
    """The ``n``-th key with ``prefix`` that shard ``shard`` of two owns (modulo hashing)."""
    found = 0
    for i in range(100_000):
        key = f"{prefix}-{i}".encode()
        if fnv1_64(key) % 2 == shard:
            if found == n:
                return key
            found += 1
    raise AssertionError("no key found")


def metrics_cluster(directory: Path, backend: str, server: str):
    with allocate_hosts() as hosts:
        path = write_config(
            directory, hosts=hosts, shards=2, replicas={0: 1}, backend=backend, server=server
        )
        addresses = node_addresses(path)
        port = free_port_on([a.rpartition(":")[0] for a in addresses.values()])
        with open(path, "a") as out:
            out.write(f"[server]\nmetrics_port = {port}\n")
        with Cluster(path) as running:
            yield types.SimpleNamespace(
                server=server,
                cluster=running,
                hosts=hosts,
                directory=directory,
                metrics_port=port,
                leader0=addresses["shard-0/leader"],
                replica0=addresses["shard-0/replica-0"],
                leader1=addresses["shard-1/leader"],
            )


@cluster_fixture
def waitress_cluster(tmp_path_factory, backend_name):
    yield from metrics_cluster(tmp_path_factory.mktemp("waitress"), backend_name, "waitress")


@cluster_fixture
def granian_cluster(tmp_path_factory, backend_name):
    pytest.importorskip("distribkv_granian")
    yield from metrics_cluster(tmp_path_factory.mktemp("granian"), backend_name, "granian")


@pytest.fixture(params=["waitress", "granian"])
def running(request):
    return request.getfixturevalue(f"{request.param}_cluster")


def scrape_text(address: str) -> str:
    response = call(address, "GET", "/metrics")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/plain")
    return response.body.decode()


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the node's /metrics, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(scrape_text(address)):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_requests_are_counted_by_route_and_code(running):
    leader, replica = running.leader0, running.replica0
    before, before_replica = scrape(leader), scrape(replica)
    mine = [key_of(0, f"count-{running.server}", n) for n in range(20)]
    with Connection(leader) as conn:
        for key in mine:
            assert conn.call("PUT", f"/set?key={q(key)}", b"v").status == 200
        for n in range(30):
            assert conn.call("GET", f"/get?key={q(mine[n % 20])}").status == 200
        for n in range(5):
            assert conn.call("GET", f"/get?key=absent-{n}-{'x' * n}").status in (404, 307)
        for n in range(3):
            assert conn.call("GET", f"/no/such/path-{n}?key=1").status == 404
        other = key_of(1, "elsewhere")
        for _ in range(2):
            assert conn.call("GET", f"/get?key={q(other)}").status == 307
    assert call(replica, "PUT", f"/set?key={q(mine[0])}", b"v").status == 307
    after, after_replica = scrape(leader), scrape(replica)
    absent_here = sum(fnv1_64(f"absent-{n}-{'x' * n}".encode()) % 2 == 0 for n in range(5))
    assert delta(before, after, REQUESTS, route="/set", code="200") == 20
    assert delta(before, after, REQUESTS, route="/get", code="200") == 30
    assert delta(before, after, REQUESTS, route="/get", code="404") == absent_here
    assert delta(before, after, REQUESTS, route="/get", code="307") == 2 + 5 - absent_here
    assert delta(before, after, REQUESTS, route="other", code="404") == 3
    redirected = 7 - absent_here
    assert delta(before, after, "distribkv_redirects_total", reason="wrong_shard") == redirected
    assert delta(before_replica, after_replica, REQUESTS, route="/set", code="307") == 1
    assert (
        delta(before_replica, after_replica, "distribkv_redirects_total", reason="not_leader") == 1
    )
    # The latency histogram counts the same requests; its buckets are cumulative.
    assert delta(before, after, DURATION + "_count", route="/get") == 37
    assert delta(before, after, DURATION + "_bucket", route="/get", le="+Inf") == 37
    assert delta(before, after, DURATION + "_sum", route="/get") > 0
    # Group commit: the 20 sets, and nothing else, were written on this leader meanwhile.
    assert delta(before, after, "distribkv_commit_group_size_sum") == 20
    assert 1 <= delta(before, after, "distribkv_commit_group_size_count") <= 20
    assert delta(before, after, "distribkv_commit_apply_seconds_count") >= 1
    # A path is never a label.
    assert not [labels for _, labels in after if any("no/such" in v for _, v in labels)]


def test_replication_storage_and_the_node_are_shown(running):
    leader, replica = running.leader0, running.replica0
    key = key_of(0, f"replicated-{running.server}")
    assert call(leader, "PUT", f"/set?key={q(key)}", b"v").status == 200

    def caught_up() -> bool:
        on_leader, on_replica = scrape(leader), scrape(replica)
        last = on_leader["distribkv_replication_last_seq", ()]
        labels = (("address", replica), ("replica", "replica-0"))
        return (
            on_leader.get(("distribkv_replica_applied_seq", labels)) == last
            and on_leader.get(("distribkv_replica_lag_entries", labels)) == 0
            and on_replica.get(("distribkv_replication_applied_seq", ())) == last
            and on_replica.get(("distribkv_replication_lag_entries", ())) == 0
            # A replica that has just resynced says so until its next pull returns.
            and on_replica.get(("distribkv_replication_state", (("state", "following"),))) == 1
        )

    wait_until(caught_up, 15, message="the replica did not catch up and follow its leader")
    on_leader, on_replica = scrape(leader), scrape(replica)
    assert on_replica["distribkv_replication_state", (("state", "following"),)] == 1
    assert on_replica["distribkv_replication_state", (("state", "resyncing"),)] == 0
    assert on_leader["distribkv_replication_log_entries", ()] >= 0
    assert "distribkv_replication_log_trimmed_seq" in {name for name, _ in on_leader}
    for seen, role in ((on_leader, "leader"), (on_replica, "replica")):
        info = [dict(labels) for name, labels in seen if name == "distribkv_node_info"]
        assert len(info) == 1
        assert info[0]["role"] == role and info[0]["shard"] == "shard-0"
        assert info[0]["server"] == running.server
        assert seen["distribkv_node_leader", ()] == (role == "leader")
        assert seen["distribkv_storage_disk_bytes", ()] > 0
        keys = seen.get(("distribkv_storage_keys", ()))
        assert keys is None or keys >= 1  # LevelDB cannot count its keys cheaply
        assert seen["distribkv_reshard_phase", (("phase", "none"),)] == 1
        assert seen["process_cpu_seconds_total", ()] > 0
        assert seen["process_resident_memory_bytes", ()] > 0


def test_the_metrics_port_serves_the_same_series(running):
    host = running.leader0.rpartition(":")[0]
    address = f"{host}:{running.metrics_port}"
    response = call(address, "GET", "/metrics")
    assert response.status == 200
    assert b"distribkv_node_info{backend=" in response.body
    assert call(address, "GET", "/get?key=a").status == 404  # only /metrics there


def test_promtool_accepts_the_metrics_of_a_leader_and_a_replica(running):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for address in (running.leader0, running.replica0):
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=scrape_text(address),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, f"{address}: {checked.stdout}{checked.stderr}"


# --- a real Prometheus -----------------------------------------------------------------


class Prometheus:
    """The ``prometheus`` binary scraping ``targets`` every second, its data in a directory of
    the test's, on a loopback address of the test's; stopped by its PID."""

    def __init__(self, binary: str, directory: Path, listen: str, targets: list[str]):
        self.listen = listen
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: distribkv\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
        )
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address={listen}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def query(self, promql: str) -> list[dict]:
        url = f"http://{self.listen}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            document = json.loads(answer.read())
        assert document["status"] == "success", document
        return document["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or None while it has none."""
        try:
            result = self.query(promql)
        except OSError:
            return None  # not up yet
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def targets(self) -> list[tuple[str, str, str]]:
        """Each scrape target's address, health and last error, for a failing test's message."""
        url = f"http://{self.listen}/api/v1/targets"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                active = json.loads(answer.read())["data"]["activeTargets"]
        except OSError as exc:
            return [("?", "?", str(exc))]
        return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in active]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except OSError as exc:
        return f"unknown ({exc})"


def test_prometheus_scrapes_the_cluster_and_answers_promql(waitress_cluster, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    running = waitress_cluster
    leader, replica = running.leader0, running.replica0
    prometheus = Prometheus(
        binary,
        tmp_path / "prometheus",
        running.hosts.address(),
        [leader, replica, running.leader1],
    )
    # The replica's own word for its process (a table made at start would miss a restart).
    replica_pid = json.loads(call(replica, "GET", "/status").body)["pid"]
    stopped = False
    try:
        wait_until(
            lambda: prometheus.value('sum(up{job="distribkv"})') == 3,
            30,
            interval=0.2,
            message=f"Prometheus did not scrape all three nodes: {prometheus.log_path}",
        )
        # A load of about 200 GETs a second, for as long as the query takes to see it.
        rate = 200.0
        sent = [0]
        stop_load = threading.Event()
        key = key_of(0, "scraped")
        assert call(leader, "PUT", f"/set?key={q(key)}", b"v").status == 200

        def load() -> None:
            started = time.monotonic()
            with Connection(leader) as conn:
                while not stop_load.is_set() and sent[0] < 10_000:
                    assert conn.call("GET", f"/get?key={q(key)}").status == 200
                    sent[0] += 1
                    ahead = started + sent[0] / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            promql = (
                'sum(rate(distribkv_http_requests_total{route="/get",code="200",'
                f'instance="{leader}"}}[4s]))'
            )
            wait_until(
                lambda: 0.7 * rate <= (prometheus.value(promql) or 0) <= 1.3 * rate,
                30,
                interval=0.5,
                message=f"the GET rate Prometheus sees: {prometheus.value(promql)}",
            )
        finally:
            stop_load.set()
            loader.join(timeout=10)
        # The replica's lag, as its leader reports it: writes while it is stopped.
        lag = (
            'distribkv_replica_lag_entries{replica="replica-0",'
            f'address="{replica}",instance="{leader}"}}'
        )
        wait_until(lambda: prometheus.value(lag) == 0, 20, message="the replica is behind")
        os.kill(replica_pid, signal.SIGSTOP)
        stopped = True
        wait_until(lambda: _state(replica_pid) == "T", 5, message="the replica did not stop")
        for n in range(25):
            written = call(leader, "PUT", f"/set?key={q(key_of(0, 'lagging', n))}", b"v")
            assert written.status == 200
        # What the leader itself says first, then what Prometheus scraped of it.
        own_lag = (
            "distribkv_replica_lag_entries",
            (("address", replica), ("replica", "replica-0")),
        )
        try:
            wait_until(lambda: scrape(leader).get(own_lag, 0) >= 25, 10, interval=0.2)
        except AssertionError:
            replicas = {
                name: value
                for (name, labels), value in scrape(leader).items()
                if name.startswith("distribkv_replica") or name == "distribkv_replication_last_seq"
            }
            raise AssertionError(
                f"the leader's /metrics does not show the stopped replica's lag: {replicas};"
                f" the replica's process is in state {_state(replica_pid)!r}"
            ) from None
        try:
            wait_until(lambda: (prometheus.value(lag) or 0) >= 25, 20, interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"the lag Prometheus sees: {prometheus.value(lag)}, the leader's own:"
                f" {scrape(leader).get(own_lag)}; targets: {prometheus.targets()}"
            ) from None
        os.kill(replica_pid, signal.SIGCONT)
        stopped = False
        wait_until(lambda: prometheus.value(lag) == 0, 20, message="the replica did not catch up")
        own = f'distribkv_replication_lag_entries{{instance="{replica}"}}'
        assert prometheus.value(own) == 0
    finally:
        if stopped:
            os.kill(replica_pid, signal.SIGCONT)
        prometheus.stop()
