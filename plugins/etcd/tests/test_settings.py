"""The [coordination] table of the etcd coordination: every bad setting is refused when the
cluster file is loaded, with the file, the table and the key in the message."""

from __future__ import annotations

import pytest

from distribkv.config import ConfigError, load_config
from distribkv.plugins import load_plugins

pytest.importorskip("distribkv_etcd")

SHARDS = '[storage]\nbackend = "memory"\n[[shards]]\nname = "s"\nidx = 0\naddress = "127.0.0.2:1"\n'


def load(tmp_path, cluster: str, coordination: str):
    path = tmp_path / "sharding.toml"
    path.write_text(
        f'[cluster]\ncoordination = "etcd"\n{cluster}\n[coordination]\n{coordination}\n{SHARDS}'
    )
    return load_config(path, load_plugins())


@pytest.mark.parametrize(
    ("cluster", "coordination", "message"),
    [
        ("", "", "needs [cluster] name"),
        ('name = "a b"', "", "[cluster] key 'name'"),
        ('name = "c"', "lease_ttl = 1", "key 'lease_ttl': at least 2 seconds"),
        ('name = "c"', 'lease_ttl = "2"', "key 'lease_ttl': must be int"),
        ('name = "c"', "endpoints = []", "key 'endpoints'"),
        ('name = "c"', 'endpoints = ["127.0.0.1:2379"]', "is not an http:// or https:// URL"),
        (
            'name = "c"',
            'endpoints = ["http://127.0.0.1:2379", "https://127.0.0.1:2380"]',
            "mixes http:// and https://",
        ),
        ('name = "c"', 'local_address = "10.0.0.1:2379"', "is not a loopback address"),
        ('name = "c"', "poll_interval = 1.0", "key 'poll_interval'"),
        ('name = "c"', "timeout = 5", "key 'timeout'"),
        ('name = "c"', "failover_max_lag = -1", "key 'failover_max_lag'"),
        ('name = "c"', 'prefix = "relative"', "key 'prefix'"),
        ('name = "c"', 'ca_file = "missing.pem"', "key 'ca_file': no file"),
        ('name = "c"', 'password_env = "DISTRIBKV_TEST_UNSET_VARIABLE"', "is not set"),
        ('name = "c"', "lease = 2", "key 'lease': unknown setting of coordination 'etcd'"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_key(tmp_path, cluster, coordination, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, cluster, coordination)
    assert message in str(info.value)
    assert str(tmp_path / "sharding.toml") in str(info.value)


def test_the_defaults(tmp_path):
    from distribkv_etcd import Settings

    config = load(tmp_path, 'name = "prod"', "")
    settings = Settings.from_table(config.coordination, config)
    assert settings.endpoints == ["http://127.0.0.1:2379"] and settings.local
    assert settings.prefix == "/distribkv/prod"
    assert (settings.lease_ttl, settings.timeout, settings.poll_interval) == (2, 0.5, 0.1)


def test_static_takes_no_settings(tmp_path):
    path = tmp_path / "sharding.toml"
    path.write_text(f"[coordination]\nlease_ttl = 2\n{SHARDS}")
    with pytest.raises(ConfigError, match="coordination 'static' takes no settings"):
        load_config(path, load_plugins())
