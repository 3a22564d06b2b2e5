"""sharding.toml validation: every mistake is refused with the file, the table and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from distribkv.cli import main
from distribkv.config import Address, ConfigError, load_config
from distribkv.plugins import load_plugins

GOOD = """
[cluster]
hashing = "ring"
routing = "proxy"
[cluster.ring]
vnodes = 64

[storage]
backend = "memory"
data_dir = "nodes"
durability = "async"

[[shards]]
name = "shard-0"
idx = 0
address = "127.0.0.2:8080"
replicas = ["127.0.0.22:8080", "127.0.0.23:8080"]

[[shards]]
name = "shard-1"
idx = 1
address = "127.0.0.3:8080"
replica = "127.0.0.33:8080"
weight = 2
"""

# The Go original's file: shards with a single replica and no [cluster]/[storage] tables.
SEED = """
[[shards]]
name = "Moscow"
idx = 0
address = "127.0.0.2:8080"
replica = "127.0.0.22:8080"

[[shards]]
name = "Minsk"
idx = 1
address = "127.0.0.3:8080"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sharding.toml"
    path.write_text(text)
    return path


def test_a_full_config_parses_into_frozen_objects(tmp_path):
    config = load_config(write(tmp_path, GOOD), load_plugins(disabled=()))
    assert config.cluster.hashing == "ring"
    assert config.cluster.hashing_settings == {"vnodes": 64}
    assert config.storage.data_dir == tmp_path / "nodes"
    assert config.shards[0].replicas == (Address("127.0.0.22", 8080), Address("127.0.0.23", 8080))
    assert config.shards[1].weight == 2.0
    nodes = config.nodes()
    assert [(n.shard.name, n.node_name) for n in nodes] == [
        ("shard-0", "leader"),
        ("shard-0", "replica-0"),
        ("shard-0", "replica-1"),
        ("shard-1", "leader"),
        ("shard-1", "replica-0"),
    ]
    assert nodes[2].data_dir == tmp_path / "nodes" / "shard-0" / "replica-1"
    with pytest.raises(AttributeError):
        config.cluster.hashing = "modulo"


def test_the_go_originals_file_is_accepted_with_defaults(tmp_path):
    config = load_config(write(tmp_path, SEED))
    assert config.cluster.hashing == "modulo"
    assert config.storage.durability == "sync"
    assert [s.name for s in config.shards] == ["Moscow", "Minsk"]
    assert config.shards[1].replicas == ()


def shard(name: str, idx: int, address: str, extra: str = "") -> str:
    return f'[[shards]]\nname = "{name}"\nidx = {idx}\naddress = "{address}"\n{extra}\n'


TWO = shard("a", 0, "127.0.0.2:1") + shard("b", 1, "127.0.0.3:1")

BAD = {
    "duplicate idx": (
        shard("a", 0, "127.0.0.2:1") + shard("b", 0, "127.0.0.3:1"),
        "[[shards]] entry 2 ('b') key 'idx': duplicate idx 0 (also used by entry 1 ('a'))",
    ),
    "gap in idx": (
        shard("a", 0, "127.0.0.2:1") + shard("b", 2, "127.0.0.3:1"),
        "[[shards]] key 'idx': indexes must be 0..1 with no gap"
        " (entry 2 ('b') has idx 2; missing idx [1])",
    ),
    "duplicate name": (
        shard("a", 0, "127.0.0.2:1") + shard("a", 1, "127.0.0.3:1"),
        "[[shards]] entry 2 ('a') key 'name': duplicate name 'a' (also the name of entry 1 ('a'))",
    ),
    "duplicate address": (
        shard("a", 0, "127.0.0.2:1") + shard("b", 1, "127.0.0.2:1"),
        "[[shards]] entry 2 ('b') key 'address': duplicate address 127.0.0.2:1"
        " (also the 'address' of entry 1 ('a'))",
    ),
    "replica reuses an address": (
        shard("a", 0, "127.0.0.2:1", 'replica = "127.0.0.2:1"'),
        "[[shards]] entry 1 ('a') key 'replica': duplicate address 127.0.0.2:1"
        " (also the 'address' of entry 1 ('a'))",
    ),
    "malformed address": (shard("a", 0, "127.0.0.2"), "key 'address': malformed address"),
    "malformed address in a later entry": (
        shard("a", 0, "127.0.0.2:1") + shard("b", 1, "127.0.0.3"),
        "[[shards]] entry 2 ('b') key 'address': malformed address '127.0.0.3'",
    ),
    "entry without a name": (
        '[[shards]]\nidx = 0\naddress = "127.0.0.2:1"\n',
        "[[shards]] entry 1 key 'name': needs a name",
    ),
    "entry that is not a table": (
        'shards = [1]\n[storage]\nbackend = "memory"\n',
        "[[shards]] entry 1: must be a table, got int",
    ),
    "port out of range": (shard("a", 0, "127.0.0.2:70000"), "malformed address"),
    "bad host": (shard("a", 0, "bad host!:80"), "malformed host"),
    "unknown shard key": (
        shard("a", 0, "127.0.0.2:1", "colour = 1"),
        "[[shards]] entry 1 ('a') key 'colour': unknown key",
    ),
    "unknown cluster key": (
        "[cluster]\nhashin = 'ring'\n" + TWO,
        "[cluster] key 'hashin': unknown key",
    ),
    "unknown top-level table": ("[clustr]\n" + TWO, "top level key 'clustr': unknown key"),
    "wrong type": (
        "[storage]\ndurability = 1\n" + TWO,
        "[storage] key 'durability': must be str, got 1",
    ),
    "bad durability": (
        '[storage]\ndurability = "maybe"\n' + TWO,
        "[storage] key 'durability': must be one of sync, async",
    ),
    "negative reserve": (
        "[storage]\nmin_free_bytes = -1\n" + TWO,
        "[storage] key 'min_free_bytes': must be >= 0 (0 turns the reserve off), got -1",
    ),
    "reserve as text": (
        '[storage]\nmin_free_bytes = "1G"\n' + TWO,
        "[storage] key 'min_free_bytes': must be int, got '1G'",
    ),
    "bad routing": (
        '[cluster]\nrouting = "gossip"\n' + TWO,
        "[cluster] key 'routing': must be one of redirect, proxy",
    ),
    "both replica forms": (
        shard("a", 0, "127.0.0.2:1", 'replica = "127.0.0.9:1"\nreplicas = ["127.0.0.8:1"]'),
        "give either 'replica' or 'replicas'",
    ),
    "no shards": ('[cluster]\nhashing = "modulo"\n', "no [[shards]] defined"),
    "not toml": ("[[shards]\n", "not valid TOML"),
    "min_replicas above replicas": (
        "[cluster]\nmin_replicas = 1\n" + TWO,
        "key 'min_replicas': 1 is more than the replicas",
    ),
    "backend not installed": (
        '[storage]\nbackend = "nosuchdb"\n' + TWO,
        "[storage] key 'backend': backend \"nosuchdb\" is not installed (installed: ",
    ),
    "hashing not installed": ('[cluster]\nhashing = "jump"\n' + TWO, "pip install distribkv-jump"),
    "bad ring setting": (
        '[cluster]\nhashing = "ring"\n[cluster.ring]\nvnodes = -3\n' + TWO,
        "[cluster.ring]: ring setting 'vnodes' must be an integer >= 1",
    ),
    "bad backend setting value": (
        '[storage]\nbackend = "lmdb"\n[storage.lmdb]\nmap_size = -1\n' + TWO,
        "[storage.lmdb]: setting 'map_size' of backend 'lmdb' must be >= 1048576, got -1",
    ),
    "port with non-ascii digits": (shard("a", 0, "127.0.0.2:\u00b2"), "malformed address"),
    "ipv6 without brackets": (shard("a", 0, "::1:8080"), "write an IPv6 address in brackets"),
    "two spellings of one ipv6 address": (
        shard("a", 0, "[::1]:8080") + shard("b", 1, "[0:0::1]:8080"),
        "duplicate address [::1]:8080",
    ),
    "server not installed": (
        '[cluster]\nserver = "nginx"\n' + TWO,
        'server "nginx" is not installed',
    ),
    "replication not installed": (
        '[cluster]\nreplication = "bogus"\n' + TWO,
        'replication transport "bogus" is not installed',
    ),
    "metrics port of two nodes on one host": (
        "[server]\nmetrics_port = 9100\n"
        + shard("a", 0, "127.0.0.2:1", 'replicas = ["127.0.0.2:2"]')
        + shard("b", 1, "127.0.0.3:1"),
        "[server] key 'metrics_port': nodes a/leader and a/replica-0 share the host 127.0.0.2",
    ),
    "metrics port is a node's port": (
        "[server]\nmetrics_port = 1\n" + TWO,
        "[server] key 'metrics_port': 1 is the port of node a/leader (127.0.0.2:1)",
    ),
    "metrics port out of range": (
        "[server]\nmetrics_port = 70000\n" + TWO,
        "[server] key 'metrics_port': must be 1-65535, got 70000",
    ),
    "metrics port without metrics": (
        "[server]\nmetrics = false\nmetrics_port = 9100\n" + TWO,
        "[server] key 'metrics_port': is set while 'metrics' is false",
    ),
    "metrics as text": (
        '[server]\nmetrics = "no"\n' + TWO,
        "[server] key 'metrics': must be bool, got 'no'",
    ),
    "unknown log format": (
        '[server]\nlog_format = "xml"\n' + TWO,
        "[server] key 'log_format': must be one of text, json, got 'xml'",
    ),
    "unknown backend setting": (
        '[storage]\nbackend = "memory"\n[storage.memory]\nsize = 1\n' + TWO,
        "[storage.memory]: unknown setting(s) for backend 'memory': size",
    ),
}


def with_memory_backend(text: str) -> str:
    """Cases that are not about the backend use one that every environment has."""
    return text if "[storage]" in text else '[storage]\nbackend = "memory"\n' + text


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_configs_are_refused_naming_file_table_and_key(tmp_path, case):
    text, message = BAD[case]
    registry = load_plugins(disabled=())
    if 'backend = "lmdb"' in text and "lmdb" not in registry.names("storage"):
        pytest.skip("needs the lmdb backend")
    path = write(tmp_path, with_memory_backend(text))
    with pytest.raises(ConfigError) as info:
        load_config(path, registry)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("case", ["duplicate idx", "backend not installed", "not toml"])
def test_check_command_exits_non_zero_with_the_message(tmp_path, capsys, case):
    text, message = BAD[case]
    path = write(tmp_path, with_memory_backend(text))
    assert main(["check", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_check_command_prints_every_node(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("127.0.0.2:8080", "127.0.0.23:8080", "replica-1", "ring", "memory"):
        assert text in out


def test_check_refuses_what_serve_refuses_a_node_beyond_loopback_without_token_auth_and_tls(
    tmp_path, capsys, monkeypatch
):
    # 192.0.2.0/24 is reserved for documentation: nothing is bound or contacted here.
    path = write(tmp_path, GOOD.replace("127.0.0.23:8080", "192.0.2.23:8080"))
    monkeypatch.delenv("DISTRIBKV_CLUSTER_TOKEN", raising=False)
    monkeypatch.delenv("DISTRIBKV_CLUSTER_TOKEN_FILE", raising=False)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "192.0.2.23:8080, which is not a loopback address, and no cluster token" in err
    assert "no [auth] table gives client tokens; no [tls] table gives certificates" in err
    monkeypatch.setenv("DISTRIBKV_CLUSTER_TOKEN", "t" * 32)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address, and no [auth] table" in err and "cluster token" not in err


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "absent.toml")
