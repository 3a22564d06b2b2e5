"""``[tls]``, ``[auth]`` and addresses: every mistake is an error that names the file and the
key, and what a node makes of them (redirects over https, the tokens it knows)."""

from __future__ import annotations

from pathlib import Path

import falcon.testing
import pytest

from distribkv.config import ConfigError, load_config, parse_config
from distribkv.hashing.modulo import fnv1_64
from distribkv.http.app import create_app
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.testing.certs import make_certificates

SHARDS = """
[storage]
backend = "memory"

[[shards]]
name = "s0"
idx = 0
address = "{address}"

[[shards]]
name = "s1"
idx = 1
address = "127.0.0.3:8080"
"""

TLS = """
[tls]
cert = "tls/node.pem"
key = "tls/node.key"
ca = "tls/ca.pem"
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.2", "127.0.0.3"])


def config_file(tmp_path: Path, text: str, address: str = "127.0.0.2:8080") -> Path:
    path = tmp_path / "sharding.toml"
    path.write_text(SHARDS.format(address=address) + text)
    return path


def parse(path: Path):
    return parse_config(path.read_text(), path)


def with_certs(tmp_path: Path, certs) -> None:
    (tmp_path / "tls").mkdir()
    for source, name in (
        (certs.node_cert, "node.pem"),
        (certs.node_key, "node.key"),
        (certs.ca, "ca.pem"),
    ):
        target = tmp_path / "tls" / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)


@pytest.mark.parametrize("address", ["0.0.0.0:8080", "[::]:8080"])
def test_a_wildcard_address_is_refused(tmp_path, address):
    with pytest.raises(
        ConfigError, match=r"\[\[shards\]\] entry 1 \('s0'\) key 'address': .* is a wildcard"
    ):
        parse(config_file(tmp_path, "", address))


def test_tls_files_are_checked_when_the_file_is_read(tmp_path, certs):
    path = config_file(tmp_path, TLS)
    with pytest.raises(ConfigError, match=r"\[tls\] key 'cert': cannot read .*node.pem"):
        parse(path)
    with_certs(tmp_path, certs)
    tls = parse(path).tls
    assert tls is not None and tls.cert == tmp_path / "tls" / "node.pem" and not tls.verify_clients
    (tmp_path / "tls" / "node.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"\[tls\] key 'key': .* readable by others .*chmod 600"):
        parse(path)
    (tmp_path / "tls" / "node.key").write_bytes(certs.other_client_key.read_bytes())
    (tmp_path / "tls" / "node.key").chmod(0o600)
    with pytest.raises(ConfigError, match=r"\[tls\] key 'cert': .*matching private key"):
        parse(path)
    path.write_text(SHARDS.format(address="127.0.0.2:8080") + '[tls]\ncert = "tls/node.pem"\n')
    with pytest.raises(ConfigError, match=r"\[tls\] key 'key': is required"):
        parse(path)
    path.write_text(SHARDS.format(address="127.0.0.2:8080") + TLS + "verify = true\n")
    with pytest.raises(ConfigError, match=r"\[tls\] key 'verify': unknown key"):
        parse(path)


def test_a_server_without_tls_refuses_a_tls_cluster(tmp_path, certs):
    with_certs(tmp_path, certs)
    path = config_file(tmp_path, TLS)
    with pytest.raises(ConfigError, match="'waitress' cannot serve TLS, which \\[tls\\] asks for"):
        load_config(path, load_plugins())


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('{name = "a", role = "root", token_file = "t"}', "key 'role': must be one of read"),
        ('{name = "a", role = "read"}', "give either 'token_file' or 'token_env'"),
        ('{name = "a", role = "read", token_file = "t", token_env = "T"}', "not both"),
        ('{name = "a b", role = "read", token_env = "T"}', "key 'name': needs a name"),
        ('{name = "a", role = "read", token_env = "T", secret = "x"}', "key 'secret': unknown"),
    ],
)
def test_auth_entries_are_checked(tmp_path, entry, message):
    path = config_file(tmp_path, f"[auth]\ntokens = [{entry}]\n")
    with pytest.raises(ConfigError, match=r"\[auth\] tokens entry 1 .*" + message):
        parse(path)


def node_of(path: Path, environ: dict[str, str]) -> Node:
    return Node(parse(path), "s0", registry=load_plugins(), environ=environ)


def test_auth_tokens_are_read_when_a_node_starts(tmp_path):
    token_file = tmp_path / "app.token"
    token_file.write_text("a" * 20 + "\n")
    token_file.chmod(0o644)
    path = config_file(
        tmp_path,
        '[auth]\ntokens = [{name = "app", role = "write", token_file = "app.token"},'
        ' {name = "ops", role = "admin", token_env = "OPS_TOKEN"}]\n',
    )
    cluster = {"DISTRIBKV_CLUSTER_TOKEN": "c" * 20}
    with pytest.raises(ConfigError, match=r"\[auth\] needs a cluster token"):
        node_of(path, {"OPS_TOKEN": "o" * 20})
    with pytest.raises(ConfigError, match=r"token 'app': token_file: .* chmod 600"):
        node_of(path, {**cluster, "OPS_TOKEN": "o" * 20})
    token_file.chmod(0o600)
    with pytest.raises(ConfigError, match="token 'ops': token_env: the variable OPS_TOKEN"):
        node_of(path, cluster)
    with pytest.raises(ConfigError, match="token 'ops': the token must be at least 16"):
        node_of(path, {**cluster, "OPS_TOKEN": "short"})
    with pytest.raises(ConfigError, match="token 'ops': the same token as 'app'"):
        node_of(path, {**cluster, "OPS_TOKEN": "a" * 20})
    node = node_of(path, {**cluster, "OPS_TOKEN": "o" * 20})
    assert node.authorizer is not None
    assert node.authorizer.identify({"authorization": "Bearer " + "o" * 20}.get) == ("ops", 3)
    assert node.authorizer.identify({"x-distribkv-token": "c" * 20}.get) == ("cluster", 3)
    assert node.authorizer.identify({"authorization": "Bearer " + "a" * 19}.get) is None


def test_a_tls_node_redirects_to_https(tmp_path, certs):
    with_certs(tmp_path, certs)
    node = node_of(config_file(tmp_path, TLS), {}).open()
    try:
        assert node.scheme == "https" and node.client_tls is not None
        key = next(k for k in (b"%d" % n for n in range(100)) if fnv1_64(k) % 2 == 1)
        answer = falcon.testing.TestClient(create_app(node)).simulate_get(
            "/get", query_string=f"key={key.decode()}"
        )
        assert answer.status_code == 307
        assert answer.headers["location"] == f"https://127.0.0.3:8080/get?key={key.decode()}"
    finally:
        node.close()
