"""The node's lifecycle and configuration over real processes: `distribkv launch` clusters on
loopback hosts of each test's own, with the backend under test. Its HTTP behaviour is the server
suite's (distribkv.testing.server_suite), run on each server by
core/tests/test_conformance_waitress.py and plugins/granian/tests/test_conformance_granian.py."""

from __future__ import annotations

import json
import subprocess
import sys

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
