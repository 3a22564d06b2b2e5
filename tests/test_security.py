"""Exposed nodes: role tokens on both servers, HTTPS with mutual TLS on granian (clients,
forwarding, replication), private files, over real `distribkv launch` clusters on loopback.

Each server gets one cluster of two shards (shard-0 with a replica), ``routing = "proxy"``
(so that a request for the other shard's key is forwarded, with the client's token), a
cluster token and three client tokens: reader (read), writer (write), boss (admin). The
granian cluster also has ``[tls]`` with ``verify_clients = true``.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
import types
from pathlib import Path

import msgpack
import pytest

from distribkv.client import Client, RequestError
from distribkv.hashing.modulo import fnv1_64
from distribkv.testing import cluster_fixture
from distribkv.testing.certs import make_certificates
from distribkv.testing.cluster import (
    Cluster,
    allocate_hosts,
    call,
    free_port_on,
    node_addresses,
    q,
    wait_until,
    write_config,
)
from distribkv.tls import client_context

CLUSTER_TOKEN = "cluster-" + "c" * 24
TOKENS = {"reader": ("read", "r" * 24), "writer": ("write", "w" * 24), "boss": ("admin", "a" * 24)}


def key_of(shard: int, prefix: str) -> bytes:
    """A key that shard ``shard`` of two owns (modulo hashing)."""
    for n in range(1000):
        key = f"{prefix}-{n}".encode()
        if fnv1_64(key) % 2 == shard:
            return key
    raise AssertionError("no key found")


def secured_cluster(directory: Path, backend: str, server: str, tls: bool):
    with allocate_hosts() as hosts:
        path = write_config(
            directory,
            hosts=hosts,
            shards=2,
            replicas={0: 1},
            backend=backend,
            server=server,
            routing="proxy",
        )
        addresses = node_addresses(path)
        lines = ["", "[auth]", "tokens = ["]
        for name, (role, secret) in TOKENS.items():
            token_file = directory / f"{name}.token"
            token_file.write_text(secret + "\n")
            token_file.chmod(0o600)
            lines.append(
                f'  {{name = "{name}", role = "{role}", token_file = "{token_file.name}"}},'
            )
        lines.append("]")
        certs = context = None
        if tls:
            hosts_only = {address.rpartition(":")[0] for address in addresses.values()}
            certs = make_certificates(directory / "tls", sorted(hosts_only))
            lines += [
                "[tls]",
                'cert = "tls/node.pem"',
                'key = "tls/node.key"',
                'ca = "tls/ca.pem"',
                "verify_clients = true",
            ]
            context = client_context(certs.ca, certs.client_cert, certs.client_key)
        metrics_port = free_port_on([a.rpartition(":")[0] for a in addresses.values()])
        lines += ["[server]", f"metrics_port = {metrics_port}"]
        with open(path, "a") as out:
            out.write("\n".join(lines) + "\n")
        env = {**os.environ, "DISTRIBKV_CLUSTER_TOKEN": CLUSTER_TOKEN}
        with Cluster(path, env=env) as running:
            yield types.SimpleNamespace(
                server=server,
                cluster=running,
                path=path,
                certs=certs,
                context=context,
                leader0=addresses["shard-0/leader"],
                replica0=addresses["shard-0/replica-0"],
                leader1=addresses["shard-1/leader"],
                metrics_port=metrics_port,
            )


@cluster_fixture
def waitress_cluster(tmp_path_factory, backend_name):
    yield from secured_cluster(tmp_path_factory.mktemp("waitress"), backend_name, "waitress", False)


@cluster_fixture
def granian_cluster(tmp_path_factory, backend_name):
    yield from secured_cluster(tmp_path_factory.mktemp("granian"), backend_name, "granian", True)


@pytest.fixture(params=["waitress", "granian"])
def secured(request, waitress_cluster, granian_cluster):
    return waitress_cluster if request.param == "waitress" else granian_cluster


def ask(cluster, address, method, target, token=None, body=None, headers=None, *, as_header=None):
    """One request to ``address`` with the named client token (or none)."""
    sent = dict(headers or {})
    if token is not None:
        secret = TOKENS[token][1] if token in TOKENS else token
        sent[as_header or "Authorization"] = secret if as_header else f"Bearer {secret}"
    return call(address, method, target, body, sent, context=cluster.context)


def error(response) -> dict:
    return json.loads(response.body)


# --- role tokens, on both servers ------------------------------------------------------


def test_requests_without_a_known_token_get_401(secured):
    key = key_of(0, "nobody")
    for method, target in (("GET", f"/get?key={q(key)}"), ("PUT", f"/set?key={q(key)}")):
        refused = ask(secured, secured.leader0, method, target, body=b"v")
        assert refused.status == 401, refused
        assert error(refused) == {
            "error": "unauthorized",
            "detail": "this request needs a token (Authorization: Bearer <token>)",
        }
        assert refused.headers["www-authenticate"].startswith("Bearer")
        wrong = ask(secured, secured.leader0, method, target, "x" * 24, b"v")
        assert wrong.status == 401 and error(wrong)["detail"] == "the token is not known"
    for target in ("/status", "/cluster", "/purge", "/digest", "/batch", "/nowhere"):
        assert ask(secured, secured.leader0, "GET", target).status == 401, target
    assert ask(secured, secured.leader0, "GET", "/healthz").status == 200


def test_each_role_does_what_it_may_and_gets_403_beyond(secured):
    key = key_of(0, "roles")
    leader = secured.leader0
    assert ask(secured, leader, "PUT", f"/set?key={q(key)}", "writer", b"v1").status == 200
    # read: reads, /cluster, a batch of gets; no writes, no /status.
    assert ask(secured, leader, "GET", f"/get?key={q(key)}", "reader").body == b"v1"
    assert ask(secured, leader, "GET", "/cluster", "reader").status == 200
    gets = msgpack.packb({"ops": [["get", key]]})
    batch = ask(
        secured, leader, "POST", "/batch", "reader", gets, {"Content-Type": "application/msgpack"}
    )
    assert batch.status == 200 and msgpack.unpackb(batch.body)["results"] == [b"v1"]
    for method, target, body in (
        ("PUT", f"/set?key={q(key)}", b"v2"),
        ("GET", f"/set?key={q(key)}&value=v2", None),
        ("DELETE", f"/delete?key={q(key)}", None),
        ("POST", "/batch", json.dumps({"ops": [["get", "a"], ["set", "a", "b"]]}).encode()),
        ("GET", "/status", None),
    ):
        refused = ask(secured, leader, method, target, "reader", body)
        assert refused.status == 403, (method, target, refused)
        assert "the token 'reader' has the role 'read'" in error(refused)["detail"]
    # write: and writes; not the operator's endpoints.
    sets = json.dumps({"ops": [["set", key.decode(), "v3"]]}).encode()
    assert ask(secured, leader, "POST", "/batch", "writer", sets).status == 200
    assert ask(secured, leader, "GET", f"/get?key={q(key)}", "writer").body == b"v3"
    for target in ("/status", "/purge", "/digest"):
        refused = ask(secured, leader, "GET", target, "writer")
        assert refused.status == 403 and "needs 'admin'" in error(refused)["detail"], target
    assert ask(secured, leader, "DELETE", f"/delete?key={q(key)}", "writer").status == 200
    # admin: everything.
    assert ask(secured, leader, "GET", "/status", "boss").status == 200
    assert ask(secured, leader, "GET", "/purge", "boss").status == 200
    assert ask(secured, leader, "GET", f"/get?key={q(key)}", "boss").status == 404
    # The nodes' own token still opens the internal endpoints, in either header.
    digest = ask(secured, leader, "GET", "/digest", CLUSTER_TOKEN, as_header="X-Distribkv-Token")
    assert digest.status == 200


def test_a_forwarded_request_carries_the_clients_token(secured):
    other = key_of(1, "forwarded")  # shard-1's key, sent to shard-0's leader (proxy routing)
    target = f"/set?key={q(other)}"
    refused = ask(secured, secured.leader0, "PUT", target, "reader", b"f")
    assert refused.status == 403
    stored = ask(secured, secured.leader0, "PUT", target, "writer", b"f")
    assert stored.status == 200 and stored.headers["x-distribkv-shard"] == "shard-1"
    assert ask(secured, secured.leader1, "GET", f"/get?key={q(other)}", "reader").body == b"f"
    assert ask(secured, secured.leader0, "GET", f"/get?key={q(other)}").status == 401


def test_replicas_follow_with_the_cluster_token(secured):
    key = key_of(0, "replicated")
    assert ask(secured, secured.leader0, "PUT", f"/set?key={q(key)}", "writer", b"r").status == 200

    def replicated() -> bool:
        return ask(secured, secured.replica0, "GET", f"/get?key={q(key)}", "reader").body == b"r"

    wait_until(replicated, 10, message="the replica did not get the write")
    assert ask(secured, secured.replica0, "GET", f"/get?key={q(key)}").status == 401


def test_the_cluster_page_needs_no_token_and_its_view_needs_the_status_role(secured):
    # The page holds no data (a browser cannot send a bearer token to open it).
    for target in ("/ui", "/ui/ui.css", "/ui/ui.js"):
        assert ask(secured, secured.leader1, "GET", target).status == 200, target
    assert ask(secured, secured.leader1, "GET", "/ui/data").status == 401
    for token in ("reader", "writer"):
        refused = ask(secured, secured.leader1, "GET", "/ui/data", token)
        assert refused.status == 403 and "needs 'admin'" in error(refused)["detail"], token
    # The node gathers from the others with the cluster token (over mutual TLS on granian).
    view = ask(secured, secured.leader1, "GET", "/ui/data", "boss")
    assert view.status == 200, view
    nodes = {row["name"]: row for row in json.loads(view.body)["nodes"]}
    assert {name: row["state"] for name, row in nodes.items()} == {
        "shard-0/leader": "up",
        "shard-0/replica-0": "up",
        "shard-1/leader": "up",
    }, nodes
    assert nodes["shard-0/replica-0"]["role"] == "replica"


def test_the_python_client_sends_its_token(secured):
    nodes = [secured.leader0]
    with Client(nodes, token=TOKENS["writer"][1], ssl_context=secured.context) as db:
        pairs = {key_of(0, "client-a"): b"1", key_of(1, "client-b"): b"2"}
        db.set_many(pairs)
        assert db.get_many(list(pairs)) == pairs
    with Client(nodes, token=TOKENS["reader"][1], ssl_context=secured.context) as db:
        assert db.get(key_of(1, "client-b")) == b"2"
        with pytest.raises(RequestError) as refused:
            db.set(b"no", b"way")
        assert refused.value.status == 403
    with pytest.raises(RequestError) as unknown:
        Client(nodes, ssl_context=secured.context)
    assert unknown.value.status == 401


def test_the_command_line_takes_its_token_from_the_environment(secured, tmp_path):
    tls = []
    if secured.certs is not None:
        certs = secured.certs
        tls = ["--ca", str(certs.ca), "--cert", str(certs.client_cert)]
        tls += ["--key", str(certs.client_key)]
    command = [sys.executable, "-m", "distribkv"]
    where = ["--node", secured.leader1, *tls]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBKV_")}
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["writer"][1])
    token_file.chmod(0o600)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *args, *where],
            env={**env, **extra},
            capture_output=True,
            cwd=tmp_path,
            timeout=60,
        )

    assert run("set", "cli-key", "cli-value", DISTRIBKV_TOKEN_FILE=str(token_file)).returncode == 0
    got = run("get", "cli-key", DISTRIBKV_TOKEN=TOKENS["reader"][1])
    assert got.returncode == 0 and got.stdout == b"cli-value", got.stderr
    refused = run("delete", "cli-key", DISTRIBKV_TOKEN=TOKENS["reader"][1])
    assert refused.returncode == 2 and b"HTTP 403" in refused.stderr
    assert b"HTTP 401" in run("get", "cli-key").stderr


# --- TLS (granian) ---------------------------------------------------------------------


def test_a_client_that_does_not_trust_the_ca_cannot_connect(granian_cluster):
    address = granian_cluster.leader0
    with pytest.raises(ssl.SSLCertVerificationError):
        call(address, "GET", "/healthz", context=ssl.create_default_context())
    certs = granian_cluster.certs
    with pytest.raises(ssl.SSLCertVerificationError):
        call(address, "GET", "/healthz", context=client_context(certs.other_ca))
    # Plain HTTP gets no HTTP answer from a TLS listener (a TLS alert, or nothing).
    with pytest.raises((OSError, http.client.HTTPException)):
        call(address, "GET", "/healthz")
    assert call(address, "GET", "/healthz", context=granian_cluster.context).status == 200


def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(granian_cluster):
    certs = granian_cluster.certs
    address = granian_cluster.leader0
    for context in (
        client_context(certs.ca),  # trusts the node, presents nothing
        client_context(certs.ca, certs.other_client_cert, certs.other_client_key),
    ):
        with pytest.raises(OSError):  # the handshake fails (ssl.SSLError, or a reset)
            call(address, "GET", "/healthz", context=context)


# --- private files ----------------------------------------------------------------------


def test_metrics_need_the_status_role_on_both_ports(secured):
    """``/metrics`` tells what ``/status`` tells: it needs ``status_role`` (admin here), on
    the node's port and on ``[server] metrics_port`` (HTTPS with the node's certificate and
    mutual TLS where the node has them)."""
    host = secured.leader0.rpartition(":")[0]
    for address in (secured.leader0, f"{host}:{secured.metrics_port}"):
        refused = ask(secured, address, "GET", "/metrics")
        assert refused.status == 401, (address, refused)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert ask(secured, address, "GET", "/metrics", "writer").status == 403
        for token in ("boss", CLUSTER_TOKEN):
            answered = ask(secured, address, "GET", "/metrics", token)
            assert answered.status == 200, (address, answered)
            assert b"distribkv_node_info{" in answered.body


def test_data_and_logs_are_private(secured):
    data = secured.path.parent / "data"
    checked = 0
    for root, dirs, files in os.walk(data):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o077 == 0, f"{path} has mode {mode:o}"
            checked += 1
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "logs").is_dir() and (data / "shard-0" / "replica-0").is_dir()
    assert checked > 8


# --- the exposure policy ------------------------------------------------------------------


def test_check_accepts_an_exposed_node_only_with_a_token_auth_and_tls(
    tmp_path, monkeypatch, capsys
):
    from distribkv.cli import main

    # 192.0.2.0/24 is reserved for documentation: `check` binds and contacts nothing.
    certs = make_certificates(tmp_path / "tls", ["192.0.2.7"])
    (tmp_path / "app.token").write_text("p" * 32)
    (tmp_path / "app.token").chmod(0o600)
    base = '[[shards]]\nname = "s0"\nidx = 0\naddress = "192.0.2.7:8443"\n'
    auth = '[auth]\ntokens = [{name = "app", role = "write", token_file = "app.token"}]\n'
    tls = f'[tls]\ncert = "{certs.node_cert}"\nkey = "{certs.node_key}"\nca = "{certs.ca}"\n'
    path = tmp_path / "sharding.toml"
    monkeypatch.setenv("DISTRIBKV_CLUSTER_TOKEN", CLUSTER_TOKEN)
    for server, tables, refusal in (
        ("granian", auth, "no [tls] table gives certificates"),
        ("granian", tls, "no [auth] table gives client tokens"),
        ("waitress", auth + tls, "'waitress' cannot serve TLS"),
        ("granian", auth + tls, None),
    ):
        # The memory backend: installed in every environment, and `check` opens nothing.
        storage = '[storage]\nbackend = "memory"\n'
        path.write_text(f'[cluster]\nserver = "{server}"\n{storage}{base}{tables}')
        status = main(["check", "--config", str(path)])
        out, err = capsys.readouterr()
        if refusal is None:
            assert status == 0, err
            assert "security: TLS (CA" in out and "1 client token(s)" in out
        else:
            assert status == 2 and refusal in err, err
