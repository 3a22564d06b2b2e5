"""The node's lifecycle and configuration over real processes: `distribkv launch` clusters on
loopback hosts of each test's own, with the backend under test. Its HTTP behaviour is the server
suite's (distribkv.testing.server_suite), run on each server by
core/tests/test_conformance_waitress.py and plugins/granian/tests/test_conformance_granian.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distribkv.hashing.modulo import fnv1_64
from distribkv.testing.cluster import Cluster, alive, call, q, write_config


def owner_index(key: bytes, shards: int) -> int:
    return fnv1_64(key) % shards


# --- lifecycle and configuration -------------------------------------------------------


def test_ctrl_c_on_launch_stops_every_node(tmp_path, hosts, backend_name):
    cluster = Cluster(
        write_config(tmp_path, hosts=hosts, shards=2, replicas={1: 1}, backend=backend_name)
    ).start()
    pids = cluster.pids
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    assert cluster.stop() == 0
    assert [pid for pid in pids if alive(pid)] == []
    assert "all nodes stopped" in "".join(cluster.output)


def _pid(address: str) -> int | None:
    """The PID that ``address`` reports in /status, or None while nothing answers there."""
    try:
        response = call(address, "GET", "/status", timeout=1.0)
    except OSError:
        return None
    return json.loads(response.body)["pid"] if response.status == 200 else None


def _kill_and_wait_for_restart(cluster: Cluster, victim: str, witness: str, key: bytes) -> float:
    """kill -9 the node at ``victim``; until a new process answers there, GET ``key`` from
    ``witness`` (another shard) and require every answer. Returns the seconds until then."""
    old = _pid(victim)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    reads = 0
    while time.monotonic() - killed < RESTART_DEADLINE:
        response = call(witness, "GET", f"/get?key={q(key)}", timeout=2.0)
        assert response.status == 200 and response.body == key, response
        reads += 1
        pid = _pid(victim)
        if pid is not None and pid != old:
            return time.monotonic() - killed
        time.sleep(0.05)
    raise AssertionError(
        f"{victim} did not answer again within {RESTART_DEADLINE}s ({reads} reads of the"
        f" other shard answered meanwhile):\n{cluster.text}"
    )


RESTART_DEADLINE = 10.0


def test_launch_restarts_a_killed_node_while_the_other_shards_serve(tmp_path, hosts, backend_name):
    config = write_config(tmp_path, hosts=hosts, shards=2, replicas={0: 1}, backend=backend_name)
    keys = {
        idx: next(b"k-%d" % i for i in range(100) if owner_index(b"k-%d" % i, 2) == idx)
        for idx in range(2)
    }
    with Cluster(config) as cluster:
        for idx, key in keys.items():
            address = cluster.address(f"shard-{idx}")
            assert call(address, "PUT", f"/set?key={q(key)}", body=key).status == 200
        # A leader, then a replica; each time the other shard's leader is the witness.
        for victim, witness, witness_key in [
            (cluster.address("shard-1"), cluster.address("shard-0"), keys[0]),
            (cluster.address("shard-0", "replica-0"), cluster.address("shard-1"), keys[1]),
        ]:
            if victim == cluster.address("shard-0", "replica-0") and backend_name == "memory":
                # The restarted leader of shard-1 kept nothing: write the witness key again.
                assert (
                    call(witness, "PUT", f"/set?key={q(witness_key)}", body=witness_key).status
                    == 200
                )
            seconds = _kill_and_wait_for_restart(cluster, victim, witness, witness_key)
            assert seconds < RESTART_DEADLINE
            response = call(victim, "GET", "/healthz")
            assert response.status == 200, response
        # The restarted replica catches up with its leader again.
        replica = cluster.address("shard-0", "replica-0")
        deadline = time.monotonic() + 10
        while call(replica, "GET", f"/get?key={q(keys[0])}").status != 200:
            assert time.monotonic() < deadline, "the restarted replica did not catch up"
            time.sleep(0.05)
        restarted = [_pid(cluster.address("shard-1")), _pid(replica)]
        assert cluster.stop() == 0, cluster.text
    assert cluster.text.count("restarting it in") == 2, cluster.text
    assert [pid for pid in restarted if pid is not None and alive(pid)] == []


def test_launch_leaves_a_crash_looping_node_down_and_serves_on(tmp_path, hosts, backend_name):
    config = write_config(tmp_path, hosts=hosts, shards=2, backend=backend_name)
    key = next(b"k-%d" % i for i in range(100) if owner_index(b"k-%d" % i, 2) == 0)
    with Cluster(config, "--max-restarts", "1", "--restart-window", "120") as cluster:
        witness, victim = cluster.address("shard-0"), cluster.address("shard-1")
        assert call(witness, "PUT", f"/set?key={q(key)}", body=key).status == 200
        _kill_and_wait_for_restart(cluster, victim, witness, key)
        pid = _pid(victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        line = cluster.wait_for_output("so it stays down", timeout=10)
        assert "shard-1/leader" in line and "2 times within 120s" in line
        assert call(witness, "GET", f"/get?key={q(key)}").body == key
        assert cluster.process is not None and cluster.process.poll() is None
        assert cluster.stop() == 0, cluster.text


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


def test_compact_reports_the_disk_and_the_node_serves_on_with_its_data(
    tmp_path, hosts, backend_name
):
    path = write_config(tmp_path, hosts=hosts, shards=1, backend=backend_name)
    with Cluster(path) as cluster:
        node = cluster.address("shard-0")
        value = os.urandom(8192)  # incompressible: the disk holds what was written
        keys = [b"compact-%04d" % i for i in range(1500)]
        for key in keys:
            assert call(node, "PUT", f"/set?key={q(key)}", body=value).status == 200
        kept = keys[::10]
        for key in keys:
            if key not in kept:
                assert call(node, "DELETE", f"/delete?key={q(key)}").status in (200, 204)
        response = call(node, "POST", "/compact", timeout=120)
        status = json.loads(call(node, "GET", "/status").body)
        if backend_name in ("lmdb", "memory"):
            assert response.status == 501, response
            assert "no compaction" in json.loads(response.body)["detail"]
        else:
            assert response.status == 200, response
            report = json.loads(response.body)
            assert report["compacted"] is True and report["seconds"] >= 0
            # Which files a compaction rewrites is the engine's choice (LevelDB moves a file
            # that overlaps nothing to the next level as it is, deleted values and all): the
            # store must not grow from it, and the node reports what it found.
            assert report["disk_bytes_after"] <= report["disk_bytes_before"] + 1_000_000, report
            assert status["disk_bytes"] <= report["disk_bytes_after"] + 1_000_000
        for key in kept:
            assert call(node, "GET", f"/get?key={q(key)}").body == value
        assert call(node, "GET", f"/get?key={q(keys[1])}").status == 404
        assert call(node, "PUT", "/set?key=after", body=b"compaction").status == 200


def test_purge_after_a_map_change_removes_exactly_the_foreign_keys(tmp_path, hosts, backend_name):
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    keys = [b"purge-%d" % i for i in range(300)]
    two = write_config(tmp_path, hosts=hosts, shards=2, backend=backend_name, file_name="two.toml")
    with Cluster(two) as cluster:
        node = cluster.address("shard-0")
        for key in keys:
            assert call(node, "PUT", f"/set?key={q(key)}", body=key, follow=1).status == 200
    three = write_config(
        tmp_path, hosts=hosts, shards=3, backend=backend_name, file_name="three.toml"
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
