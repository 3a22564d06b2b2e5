"""What an operator sees, over real node processes: ``distribkv status`` (a node killed and
restarted, a file whose map the nodes do not serve), and a node's JSON log (parseable lines
with the node, the shard and the access fields, no value, no key; one line per state
change)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distribkv.testing.cluster import NodeProcess, call, node_addresses, q, stop_all, wait_until
from distribkv.testing.cluster import write_config as write_cluster

JSON_LOG = '\n[server]\nlog_format = "json"'


def status(config: Path, *more: str) -> subprocess.CompletedProcess:
    """``distribkv status`` as an operator runs it (its output to a pipe: plain text)."""
    return subprocess.run(
        [sys.executable, "-m", "distribkv", "status", "--config", str(config), *more],
        capture_output=True,
        text=True,
        timeout=60,
    )


def rows(output: str) -> dict[str, dict[str, str]]:
    """The plain table by ``shard/node``."""
    lines = output.splitlines()
    header = lines[0].split()
    table = {}
    for line in lines[1:]:
        if not line.startswith("shard-"):
            break
        cells = dict(zip(header, line.split(), strict=False))
        table[f"{cells['SHARD']}/{cells['NODE']}"] = cells
    return table


def test_status_shows_a_killed_node_down_and_up_again_after_its_restart(
    tmp_path, hosts, backend_name
):
    config = write_cluster(tmp_path, hosts=hosts, shards=1, replicas={0: 1}, backend=backend_name)
    addresses = node_addresses(config)
    leader = NodeProcess(config, "shard-0")
    replica = NodeProcess(config, "shard-0", 0)
    leader.start(addresses["shard-0/leader"])
    replica.start(addresses["shard-0/replica-0"])
    try:
        assert call(addresses["shard-0/leader"], "PUT", "/set?key=a", body=b"1").status == 200

        def replica_status() -> dict:
            return json.loads(call(addresses["shard-0/replica-0"], "GET", "/status").body)

        wait_until(
            lambda: replica_status()["replication"]["applied_seq"] == 1,
            10,
            message="the replica has the key",
        )
        # LevelDB cannot count its keys cheaply: its /status says None, and the table "-".
        keys = "1" if replica_status()["keys"] == 1 else "-"
        healthy = status(config)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        table = rows(healthy.stdout)
        assert [table[n]["STATE"] for n in ("shard-0/leader", "shard-0/replica-0")] == ["up"] * 2
        assert [table[n]["ROLE"] for n in ("shard-0/leader", "shard-0/replica-0")] == [
            "leader",
            "replica",
        ]
        assert table["shard-0/replica-0"]["MAP"] == "ok"
        assert table["shard-0/replica-0"]["KEYS"] == keys
        assert "all 2 nodes up, maps agree" in healthy.stdout

        replica.kill9()
        down = status(config, "--json")
        assert down.returncode == 1, down.stdout + down.stderr
        document = json.loads(down.stdout)
        states = {f"{n['shard']}/{n['node']}": n["state"] for n in document["nodes"]}
        assert states == {"shard-0/leader": "up", "shard-0/replica-0": "down"}
        assert document["ok"] is False
        assert [p for p in document["problems"] if "shard-0/replica-0" in p and "is down" in p]

        replica.start(addresses["shard-0/replica-0"])
        again = status(config)
        assert again.returncode == 0, again.stdout + again.stderr
        assert rows(again.stdout)["shard-0/replica-0"]["STATE"] == "up"

        # A file with another map than the nodes serve (ring hashing): every node disagrees.
        other = tmp_path / "ring.toml"
        other.write_text(config.read_text().replace('hashing = "modulo"', 'hashing = "ring"'))
        differs = status(other)
        assert differs.returncode == 1
        assert all(row["MAP"].startswith("differs:") for row in rows(differs.stdout).values())
        assert differs.stdout.count("not the map of") == 2
    finally:
        stop_all([replica, leader])


def log_lines(path: Path) -> list[dict]:
    """Every line of a node's log, each parsed as JSON (a line that is not fails the test)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name} line {number} is not JSON: {line!r}")
    return out


def test_json_logs_carry_the_node_and_the_request_never_a_value_and_state_changes_once(
    tmp_path, hosts, backend_name
):
    if backend_name == "memory":
        pytest.skip("the memory backend keeps nothing across a restart")
    config = write_cluster(
        tmp_path,
        hosts=hosts,
        shards=1,
        replicas={0: 1},
        backend=backend_name,
        extra=JSON_LOG,
    )
    addresses = node_addresses(config)
    leader_at, replica_at = addresses["shard-0/leader"], addresses["shard-0/replica-0"]
    leader = NodeProcess(config, "shard-0")
    replica = NodeProcess(config, "shard-0", 0)
    key, value = b"secret-key\xff", b"secret-value\x00\xfe"
    leader.start(leader_at)
    replica.start(replica_at)

    def replication() -> dict:
        return json.loads(call(replica_at, "GET", "/status").body)["replication"]

    try:
        assert call(leader_at, "PUT", f"/set?key={q(key)}", body=value).status == 200
        assert call(leader_at, "GET", f"/get?key={q(key)}").body == value
        assert call(leader_at, "GET", "/no-such-path").status == 404
        wait_until(lambda: replication()["applied_seq"] == 1, 10, message="replicated")
        # The leader loses its disk: the replica keeps its data and stops following, until
        # the operator asks for a resync.
        leader.stop()
        shutil.rmtree(tmp_path / "data" / "shard-0" / "leader")
        leader.start(leader_at)
        wait_until(lambda: replication()["state"] == "diverged", 10, message="diverged")
        assert call(replica_at, "POST", "/replication/resync").status == 202
        wait_until(
            lambda: (
                (replication()["resync"] or {}).get("reason", "").startswith("requested")
                and replication()["state"] == "following"
            ),
            10,
            message="resynced",
        )
        done = replication()["resync"]
        assert (done["outcome"], done["keys_copied"]) == ("done", 0)
        assert done["keys_total"] in (0, None)  # None: LevelDB cannot count cheaply
    finally:
        stop_all([replica, leader])

    leader_lines = log_lines(leader.log_path)
    replica_lines = log_lines(replica.log_path)
    for line, name in [(x, "shard-0/leader") for x in leader_lines] + [
        (x, "shard-0/replica-0") for x in replica_lines
    ]:
        assert (line["node"], line["shard"]) == (name, "shard-0"), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert line["time"].endswith("Z") and line["logger"], line
    access = [line for line in leader_lines if line["logger"] == "distribkv.access"]
    wanted = {("PUT", "/set", 200, 0), ("GET", "/get", 200, len(value)), ("GET", None, 404, None)}
    seen = {
        (x["method"], x["route"], x["status"], None if x["route"] is None else x["bytes"])
        for x in access
    }
    assert wanted <= seen, seen
    assert all(isinstance(x["duration_ms"], float) and x["duration_ms"] >= 0 for x in access)
    assert next(x["bytes"] for x in access if x["status"] == 404 and x["route"] is None) > 0
    text = leader.log_path.read_text() + replica.log_path.read_text()
    for secret in (b"secret-value", b"secret-key", q(key).encode()):
        assert secret not in text.encode(), f"{secret!r} is in a log line"
    messages = [line.get("message", "") for line in replica_lines]

    def once(words: str) -> None:
        assert sum(words in m for m in messages) == 1, (words, messages)

    once("resync started (a new replica)")
    once("stopped following")  # diverged
    once("resync started (requested (POST /replication/resync))")
    assert sum("resync done:" in m for m in messages) == 2, messages
