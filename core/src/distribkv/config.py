"""``sharding.toml`` -> frozen attrs classes, with messages that name the file, table and key.

The format is the Go original's (``[[shards]]`` with ``name``, ``idx``, ``address`` and
``replicas = [...]`` or the single ``replica = "..."``) plus these tables::

    [cluster]
    hashing = "modulo"        # or "ring"; settings in [cluster.ring] (vnodes = ...)
    replication = "log"       # or "queue"
    routing = "redirect"      # or "proxy"
    min_replicas = 0
    server = "waitress"
    coordination = "static"   # or "etcd" (distribkv-etcd; settings in [coordination])
    name = "..."              # the cluster's name (required by "etcd")

    [storage]
    backend = "lmdb"          # any installed storage backend; settings in [storage.lmdb]
    data_dir = "data"         # relative to this file; each node uses data_dir/<shard>/<node>
    durability = "sync"       # or "async"
    max_value_size = 16777216
    group_commit = true       # concurrent writes share one apply (one fsync with "sync")
    min_free_bytes = 134217728  # data writes get 507 while the disk has less free (0: off)

    [tls]                     # HTTPS for clients and between nodes (a server that has TLS)
    cert = "tls/node.pem"     # relative to this file; the nodes' certificate (chain), PEM
    key = "tls/node.key"      # its private key (readable by its owner only)
    ca = "tls/ca.pem"         # the CA that clients and nodes verify the nodes' certificates by
    verify_clients = false    # true: mutual TLS, every connection presents a cert of that CA

    [auth]                    # role tokens: read, write, admin (secrets never in this file)
    tokens = [{name = "app", role = "write", token_file = "tokens/app"}]
    status_role = "admin"     # the role /status and /metrics need (none, read, write, admin)

    [server]
    metrics = true            # GET /metrics, Prometheus text (false: no counting at all)
    metrics_port = 9100       # also serve /metrics on this port of each node's host
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from distribkv.logformat import LOG_FORMATS
from distribkv.storage.api import DURABILITIES
from distribkv.storage.space import DEFAULT_MIN_FREE_BYTES

if TYPE_CHECKING:
    from distribkv.plugins import PluginRegistry

__all__ = [
    "ROLES",
    "Address",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "NodeConfig",
    "ServerConfig",
    "ShardConfig",
    "StorageConfig",
    "TlsConfig",
    "TokenSpec",
    "load_client_token",
    "load_cluster_token",
    "load_config",
    "load_tokens",
    "parse_config",
]

ROUTINGS = ("redirect", "proxy")
#: The roles of client tokens, each allowed what the one before it is and more.
ROLES = ("read", "write", "admin")
CLUSTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_MAX_VALUE_SIZE = 16 * 1024 * 1024
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file, the table and the key."""


@attrs.frozen(order=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 or ::, which means every interface when bound to, and none when dialled."""
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False


@attrs.frozen
class ClusterConfig:
    hashing: str = "modulo"
    hashing_settings: Mapping[str, Any] = attrs.field(factory=dict)
    replication: str = "log"
    routing: str = "redirect"
    min_replicas: int = 0
    #: Seconds a write waits for min_replicas acknowledgements before answering 503.
    min_replicas_timeout: float = 5.0
    #: Most log entries a leader keeps for replicas that are behind (older ones: resync).
    log_retention: int = 100_000
    server: str = "waitress"
    #: Who leads each shard: "static" (this file) or a coordination plugin such as "etcd".
    coordination: str = "static"
    #: The cluster's name (letters, digits, ".", "_", "-"); a coordination service keeps each
    #: cluster's state apart by it.
    name: str | None = None


@attrs.frozen
class StorageConfig:
    backend: str = "lmdb"
    data_dir: Path = Path("data")
    durability: str = "sync"
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE
    #: Concurrent writes on a leader share one storage apply (and one fsync with "sync").
    group_commit: bool = True
    #: While the data directory's file system has less free, writes that add data get 507;
    #: deletes go on (see distribkv.storage.space). 0 turns the reserve off.
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    settings: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ServerConfig:
    """How each node serves HTTP (``[server]``); the server plugin is ``[cluster] server``."""

    threads: int = 8
    #: Open client connections at most. At the limit, waitress closes the connection that has
    #: been idle (or stuck in an unfinished request) the longest to take a new one; granian
    #: leaves new connections in the accept backlog until one closes.
    connection_limit: int = 1024
    #: Seconds an idle keep-alive connection stays open.
    channel_timeout: float = 30.0
    #: Seconds from a request's first byte to the end of its headers (408 and closed after).
    header_timeout: float = 10.0
    #: Bytes a second a request body must arrive at, on average, once ``header_timeout`` of
    #: grace has passed after its headers (408 and closed otherwise).
    min_body_rate: int = 4096
    #: Connections the kernel queues for accept (``listen()``'s backlog).
    backlog: int = 1024
    #: Seconds a stopping node waits for in-flight requests.
    drain_timeout: float = 10.0
    #: Seconds a proxied request may take on the owner (connect, send and answer).
    forward_timeout: float = 5.0
    #: Largest /batch body in bytes.
    max_batch_bytes: int = 64 * 1024 * 1024
    #: ``GET /metrics`` (Prometheus text) and the counting behind it; False: neither.
    metrics: bool = True
    #: Also serve ``/metrics`` on this port of the node's own host, apart from the client
    #: port (None: only there).
    metrics_port: int | None = None
    #: "text" (for people) or "json" (a JSON object per line; see distribkv.logformat).
    log_format: str = "text"


@attrs.frozen
class TlsConfig:
    """``[tls]``: HTTPS on every node, for clients and between nodes.

    Every node serves ``cert`` (whose subject alternative names must cover every node's
    address: one certificate for the cluster, as the file is one for the cluster) and verifies
    the nodes it calls against ``ca``. With ``verify_clients`` the nodes also require a client
    certificate signed by ``ca`` on every connection (mutual TLS): a node presents ``cert``
    when it calls another, and clients present theirs."""

    cert: Path
    key: Path
    ca: Path
    verify_clients: bool = False


@attrs.frozen
class TokenSpec:
    """One client token of ``[auth] tokens``: where its secret is, never the secret itself."""

    name: str
    role: str
    #: A file only its owner can read (relative to the cluster file), or an environment
    #: variable: exactly one of the two.
    token_file: Path | None = None
    token_env: str | None = None


@attrs.frozen
class AuthConfig:
    """``[auth]``: client requests need a token (``Authorization: Bearer``) whose role allows
    them: ``read`` (GET, /cluster, a /batch of gets), ``write`` (and sets, deletes and any
    /batch), ``admin`` (everything, the internal endpoints included)."""

    tokens: tuple[TokenSpec, ...]
    #: The role ``/status`` and ``/metrics`` need ("none": anyone may read them).
    #: ``/cluster``, which clients route by, needs ``read``; ``/healthz`` needs nothing.
    status_role: str = "admin"


@attrs.frozen
class ShardConfig:
    name: str
    idx: int
    address: Address
    replicas: tuple[Address, ...] = ()
    weight: float = 1.0
    #: The key the replicas were given with ("replicas" or the seeds' "replica"), for messages.
    replica_key: str = attrs.field(default="replicas", eq=False, repr=False)


@attrs.frozen
class NodeConfig:
    """One process of the cluster: a shard's leader or one of its replicas."""

    shard: ShardConfig
    #: None for the leader, else the replica's position in ``replicas`` (0-based).
    replica: int | None
    address: Address
    data_dir: Path

    @property
    def role(self) -> str:
        return "leader" if self.replica is None else "replica"

    @property
    def node_name(self) -> str:
        return "leader" if self.replica is None else f"replica-{self.replica}"


@attrs.frozen
class Config:
    path: Path
    cluster: ClusterConfig
    storage: StorageConfig
    shards: tuple[ShardConfig, ...]
    server: ServerConfig = ServerConfig()
    #: The ``[coordination]`` table, for the coordination plugin to read.
    coordination: Mapping[str, Any] = attrs.field(factory=dict)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None

    def shard(self, name: str) -> ShardConfig:
        for shard in self.shards:
            if shard.name == name:
                return shard
        names = ", ".join(s.name for s in self.shards)
        raise ConfigError(f"{self.path}: there is no shard {name!r} (shards: {names})")

    def node(self, shard_name: str, replica: int | None = None) -> NodeConfig:
        shard = self.shard(shard_name)
        if replica is None:
            address = shard.address
        elif 0 <= replica < len(shard.replicas):
            address = shard.replicas[replica]
        else:
            raise ConfigError(
                f"{self.path}: shard {shard_name!r} has {len(shard.replicas)} replica(s);"
                f" there is no replica {replica}"
            )
        node = "leader" if replica is None else f"replica-{replica}"
        return NodeConfig(shard, replica, address, self.storage.data_dir / shard.name / node)

    def nodes(self) -> list[NodeConfig]:
        """Every node: each shard's leader, then its replicas."""
        out = []
        for shard in self.shards:
            out.append(self.node(shard.name))
            out.extend(self.node(shard.name, i) for i in range(len(shard.replicas)))
        return out


class _Table:
    """Reads one TOML table, tracking which keys were used so the rest can be rejected."""

    def __init__(self, file: Path, where: str, data: Any):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise self.error(None, f"must be a table, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        at = f"{self.where}" if key is None else f"{self.where} key {key!r}"
        return ConfigError(f"{self.file}: {at}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def finish(self, *, subtables: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.data) - self.used - set(subtables))
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], f"unknown key (known keys: {known})")


def address_from_text(text: str) -> Address:
    """``host:port`` (``[v6]:port``) as an Address; ValueError saying what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid_port = port_text.isascii() and port_text.isdecimal() and 0 < int(port_text) < 65536
    if not sep or not host or not valid_port:
        raise ValueError(f"malformed address {text!r} (expected host:port, port 1-65535)")
    bracketed = text.startswith("[")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"malformed host in address {text!r}") from None
        return Address(host.lower(), int(port_text))
    if ip.version == 6 and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    # The canonical form, so that two spellings of one address are seen as duplicates.
    return Address(ip.compressed, int(port_text))


def address_argument(text: str) -> str:
    """An argparse ``type`` for a command-line host:port: the address, or a clear error."""
    import argparse

    try:
        return str(address_from_text(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_address(table: _Table, key: str, text: Any) -> Address:
    if not isinstance(text, str):
        raise table.error(key, f"must be a string host:port, got {text!r}")
    try:
        address = address_from_text(text)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None
    if address.is_wildcard:
        raise table.error(
            key,
            f"{text!r} is a wildcard: a node's address is also where clients and the other"
            " nodes reach it, so give the address of one interface (a loopback address, or a"
            " public one with [tls], [auth] and a cluster token)",
        )
    return address


def parse_config(text: str, path: Path) -> Config:
    """Parse and validate configuration ``text`` read from ``path``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    top = _Table(path, "top level", raw)

    cluster_table = _Table(path, "[cluster]", top.get("cluster", dict, {}))
    hashing = cluster_table.get("hashing", str, "modulo")
    cluster = ClusterConfig(
        hashing=hashing,
        hashing_settings=dict(cluster_table.get(hashing, dict, {})),
        replication=cluster_table.get("replication", str, "log"),
        routing=cluster_table.choice("routing", "redirect", ROUTINGS),
        min_replicas=cluster_table.get("min_replicas", int, 0),
        min_replicas_timeout=float(cluster_table.get("min_replicas_timeout", (int, float), 5.0)),
        log_retention=cluster_table.get("log_retention", int, 100_000),
        server=cluster_table.get("server", str, "waitress"),
        coordination=cluster_table.get("coordination", str, "static"),
        name=cluster_table.get("name", str, None),
    )
    if cluster.name is not None and not CLUSTER_NAME.fullmatch(cluster.name):
        raise cluster_table.error(
            "name", f"{cluster.name!r} is not a name (letters, digits, '.', '_', '-'; 1 to 64)"
        )
    if cluster.min_replicas < 0:
        raise cluster_table.error("min_replicas", "must be >= 0")
    if not cluster.min_replicas_timeout > 0:
        raise cluster_table.error("min_replicas_timeout", "must be > 0")
    if cluster.log_retention < 1:
        raise cluster_table.error("log_retention", "must be >= 1")
    cluster_table.finish()

    storage_table = _Table(path, "[storage]", top.get("storage", dict, {}))
    backend = storage_table.get("backend", str, "lmdb")
    data_dir = Path(storage_table.get("data_dir", str, "data"))
    storage = StorageConfig(
        backend=backend,
        data_dir=data_dir if data_dir.is_absolute() else path.parent / data_dir,
        durability=storage_table.choice("durability", "sync", DURABILITIES),
        max_value_size=storage_table.get("max_value_size", int, DEFAULT_MAX_VALUE_SIZE),
        group_commit=storage_table.get("group_commit", bool, True),
        min_free_bytes=storage_table.get("min_free_bytes", int, DEFAULT_MIN_FREE_BYTES),
        settings=dict(storage_table.get(backend, dict, {})),
    )
    if storage.max_value_size < 1:
        raise storage_table.error("max_value_size", "must be >= 1")
    if storage.min_free_bytes < 0:
        raise storage_table.error(
            "min_free_bytes",
            f"must be >= 0 (0 turns the reserve off), got {storage.min_free_bytes}",
        )
    storage_table.finish()

    server_table = _Table(path, "[server]", top.get("server", dict, {}))
    defaults = ServerConfig()
    server = ServerConfig(
        threads=server_table.get("threads", int, defaults.threads),
        connection_limit=server_table.get("connection_limit", int, defaults.connection_limit),
        channel_timeout=float(
            server_table.get("channel_timeout", (int, float), defaults.channel_timeout)
        ),
        header_timeout=float(
            server_table.get("header_timeout", (int, float), defaults.header_timeout)
        ),
        min_body_rate=server_table.get("min_body_rate", int, defaults.min_body_rate),
        backlog=server_table.get("backlog", int, defaults.backlog),
        drain_timeout=float(
            server_table.get("drain_timeout", (int, float), defaults.drain_timeout)
        ),
        forward_timeout=float(
            server_table.get("forward_timeout", (int, float), defaults.forward_timeout)
        ),
        max_batch_bytes=server_table.get("max_batch_bytes", int, defaults.max_batch_bytes),
        metrics=server_table.get("metrics", bool, defaults.metrics),
        metrics_port=server_table.get("metrics_port", int, None),
        log_format=server_table.choice("log_format", defaults.log_format, LOG_FORMATS),
    )
    for key in attrs.fields_dict(ServerConfig):
        if key not in ("metrics", "metrics_port", "log_format") and not getattr(server, key) > 0:
            raise server_table.error(key, "must be > 0")
    if server.metrics_port is not None:
        if not 0 < server.metrics_port < 65536:
            raise server_table.error("metrics_port", f"must be 1-65535, got {server.metrics_port}")
        if not server.metrics:
            raise server_table.error(
                "metrics_port", "is set while 'metrics' is false: remove one of the two"
            )
    server_table.finish()

    coordination = dict(top.get("coordination", dict, {}))
    tls = _parse_tls(path, top.get("tls", dict, None))
    auth = _parse_auth(path, top.get("auth", dict, None))
    shard_list = top.get("shards", list, None)
    top.finish()
    if not shard_list:
        raise ConfigError(f"{path}: no [[shards]] defined (at least one is needed)")
    shards = [_parse_shard(path, n, entry) for n, entry in enumerate(shard_list, start=1)]
    _check_layout(path, shards)
    if server.metrics_port is not None:
        _check_metrics_port(path, shards, server.metrics_port)
    if cluster.min_replicas > min(len(s.replicas) for s in shards):
        raise ConfigError(
            f"{path}: [cluster] key 'min_replicas': {cluster.min_replicas} is more than the"
            f" replicas of the smallest shard ({min(len(s.replicas) for s in shards)})"
        )
    return Config(
        path,
        cluster,
        storage,
        tuple(sorted(shards, key=lambda s: s.idx)),
        server,
        coordination,
        tls,
        auth,
    )


def _relative(path: Path, text: str) -> Path:
    given = Path(text)
    return given if given.is_absolute() else path.parent / given


def _readable_file(table: _Table, key: str, file: Path, *, private: bool = False) -> None:
    try:
        mode = file.stat().st_mode
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise table.error(key, f"cannot read {file}: {exc.strerror}") from None
    if private and mode & 0o077:
        raise table.error(
            key,
            f"{file} is readable by others (mode {mode & 0o777:o}); run: chmod 600 {file}",
        )


def _parse_tls(path: Path, data: Any) -> TlsConfig | None:
    if data is None:
        return None
    import ssl

    table = _Table(path, "[tls]", data)
    files = {}
    for key in ("cert", "key", "ca"):
        text = table.get(key, str, None)
        if not text:
            raise table.error(key, "is required (a PEM file, relative to this file)")
        files[key] = _relative(path, text)
        _readable_file(table, key, files[key], private=key == "key")
    verify = table.get("verify_clients", bool, False)
    table.finish()
    # Loaded once here, so that a wrong file is an error that names it, not a failed handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(files["ca"]))
    except (ssl.SSLError, ValueError) as exc:
        raise table.error("ca", f"{files['ca']} holds no PEM certificate: {exc}") from None
    try:
        context.load_cert_chain(str(files["cert"]), str(files["key"]))
    except ssl.SSLError as exc:
        raise table.error(
            "cert",
            f"{files['cert']} with the key {files['key']}: not a PEM certificate and its"
            f" matching private key ({exc.reason or exc})",
        ) from None
    return TlsConfig(files["cert"], files["key"], files["ca"], verify)


TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _parse_auth(path: Path, data: Any) -> AuthConfig | None:
    if data is None:
        return None
    table = _Table(path, "[auth]", data)
    entries = table.get("tokens", list, None)
    if not entries:
        raise table.error("tokens", "needs at least one {name, role, token_file or token_env}")
    status_role = table.choice("status_role", "admin", ("none", *ROLES))
    table.finish()
    tokens = []
    names: set[str] = set()
    for position, entry in enumerate(entries, 1):
        given = entry.get("name") if isinstance(entry, dict) else None
        where = f"[auth] tokens entry {position}" + (
            f" ({given!r})" if isinstance(given, str) else ""
        )
        item = _Table(path, where, entry)
        name = item.get("name", str, None)
        if not name or not TOKEN_NAME.fullmatch(name):
            raise item.error(
                "name", f"needs a name of letters, digits, '.', '_', '-'; got {name!r}"
            )
        if name in names:
            raise item.error("name", f"duplicate name {name!r}")
        names.add(name)
        role = item.get("role", str, None)
        if role not in ROLES:
            raise item.error("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        file_text = item.get("token_file", str, None)
        env = item.get("token_env", str, None)
        item.finish()
        if (file_text is None) == (env is None):
            raise item.error("token_file", "give either 'token_file' or 'token_env' (not both)")
        file = None if file_text is None else _relative(path, file_text)
        tokens.append(TokenSpec(name, role, file, env))
    return AuthConfig(tuple(tokens), status_role)


def _shard_entry(position: int, name: Any = None) -> str:
    """How every message names a ``[[shards]]`` entry: its place in the file (from 1), and
    its name when it has one: ``entry 2 ('shard-1')``."""
    return f"entry {position} ({name!r})" if isinstance(name, str) else f"entry {position}"


def _parse_shard(path: Path, position: int, entry: Any) -> ShardConfig:
    given = entry.get("name") if isinstance(entry, dict) else None
    table = _Table(path, f"[[shards]] {_shard_entry(position, given)}", entry)
    name = table.get("name", str, None)
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
        raise table.error("name", f"needs a name of letters, digits, '_', '.', '-'; got {name!r}")
    idx = table.get("idx", int, None)
    if idx is None:
        raise table.error("idx", "is required")
    address = parse_address(table, "address", table.get("address", str, None))
    replicas = table.get("replicas", list, None)
    replica = table.get("replica", str, None)
    if replicas is not None and replica is not None:
        raise table.error("replica", "give either 'replica' or 'replicas', not both")
    texts = replicas if replicas is not None else ([replica] if replica is not None else [])
    key = "replicas" if replicas is not None else "replica"
    weight = table.get("weight", (int, float), 1.0)
    if not weight > 0:
        raise table.error("weight", f"must be > 0, got {weight!r}")
    table.finish()
    return ShardConfig(
        name=name,
        idx=idx,
        address=address,
        replicas=tuple(parse_address(table, key, text) for text in texts),
        weight=float(weight),
        replica_key=key,
    )


def _check_layout(path: Path, shards: list[ShardConfig]) -> None:
    """``shards`` in the order of the file."""
    seen_idx: dict[int, str] = {}
    seen_names: dict[str, str] = {}
    seen_addresses: dict[Address, str] = {}
    for position, shard in enumerate(shards, 1):
        entry = _shard_entry(position, shard.name)
        label = f"[[shards]] {entry}"
        if shard.idx in seen_idx:
            raise ConfigError(
                f"{path}: {label} key 'idx': duplicate idx {shard.idx}"
                f" (also used by {seen_idx[shard.idx]})"
            )
        seen_idx[shard.idx] = entry
        if shard.name in seen_names:
            raise ConfigError(
                f"{path}: {label} key 'name': duplicate name {shard.name!r}"
                f" (also the name of {seen_names[shard.name]})"
            )
        seen_names[shard.name] = entry
        addresses = [("address", shard.address)]
        addresses += [(shard.replica_key, a) for a in shard.replicas]
        for key, address in addresses:
            if address in seen_addresses:
                raise ConfigError(
                    f"{path}: {label} key {key!r}: duplicate address {address}"
                    f" (also {seen_addresses[address]})"
                )
            seen_addresses[address] = f"the {key!r} of {entry}"
    expected = set(range(len(shards)))
    if set(seen_idx) != expected:
        missing = sorted(expected - set(seen_idx))
        extra = sorted(set(seen_idx) - expected)
        if extra:
            owners = ", ".join(f"{seen_idx[idx]} has idx {idx}" for idx in extra)
            detail = f"{owners}; missing idx {missing}" if missing else owners
        else:
            detail = f"missing idx {missing}"
        raise ConfigError(
            f"{path}: [[shards]] key 'idx': indexes must be 0..{len(shards) - 1} with no gap"
            f" ({detail})"
        )


def _check_metrics_port(path: Path, shards: list[ShardConfig], port: int) -> None:
    """Each node serves its metrics on its own host at ``port``: no two nodes may share a
    host, and no node's client address may be a metrics address."""
    hosts: dict[str, str] = {}
    for shard in shards:
        names = ["leader", *(f"replica-{i}" for i in range(len(shard.replicas)))]
        for name, address in zip(names, (shard.address, *shard.replicas), strict=True):
            node = f"{shard.name}/{name}"
            where = f"{path}: [server] key 'metrics_port'"
            if address.port == port:
                raise ConfigError(
                    f"{where}: {port} is the port of node {node} ({address}), which serves"
                    " clients; choose another port"
                )
            if address.host in hosts:
                raise ConfigError(
                    f"{where}: nodes {hosts[address.host]} and {node} share the host"
                    f" {address.host}, so both would serve their metrics on"
                    f" {address.host}:{port}; give each node a host of its own, or leave"
                    " metrics_port out (every node serves /metrics on its own port too)"
                )
            hosts[address.host] = node


def check_plugins(config: Config, registry: PluginRegistry) -> None:
    """Every plugin the config names is installed and accepts its settings."""
    from distribkv.coordination.api import CoordinationError
    from distribkv.hashing.api import InvalidLayoutError, ShardSlot
    from distribkv.plugins import PluginNotFoundError
    from distribkv.storage.errors import InvalidSettingError

    try:
        backend = registry.storage_backend(config.storage.backend)
    except PluginNotFoundError as exc:
        raise ConfigError(f"{config.path}: [storage] key 'backend': {exc}") from None
    if backend.check_settings is not None:
        try:
            backend.check_settings(config.storage.settings)
        except InvalidSettingError as exc:
            raise ConfigError(f"{config.path}: [storage.{backend.name}]: {exc}") from None
    else:
        unknown = sorted(set(config.storage.settings) - set(backend.settings_help))
        if unknown:
            known = ", ".join(sorted(backend.settings_help)) or "none"
            raise ConfigError(
                f"{config.path}: [storage.{backend.name}] key {unknown[0]!r}: unknown setting of"
                f" backend {backend.name!r} (known: {known})"
            )
    try:
        server = registry.http_server(config.cluster.server)
    except PluginNotFoundError as exc:
        raise ConfigError(f"{config.path}: [cluster] key 'server': {exc}") from None
    if config.tls is not None and not server.tls:
        raise ConfigError(tls_refused(config.path, server.name))
    try:
        registry.replication_transport(config.cluster.replication)
    except PluginNotFoundError as exc:
        raise ConfigError(f"{config.path}: [cluster] key 'replication': {exc}") from None
    try:
        coordination = registry.coordination(config.cluster.coordination)
    except PluginNotFoundError as exc:
        raise ConfigError(f"{config.path}: [cluster] key 'coordination': {exc}") from None
    if coordination.check is not None:
        try:
            coordination.check(config.coordination, config)
        except CoordinationError as exc:
            raise ConfigError(f"{config.path}: [coordination]: {exc}") from None
    elif config.coordination:
        raise ConfigError(
            f"{config.path}: [coordination] key {sorted(config.coordination)[0]!r}: coordination"
            f" {coordination.name!r} takes no settings"
        )
    try:
        scheme = registry.hashing_scheme(config.cluster.hashing)
    except PluginNotFoundError as exc:
        raise ConfigError(f"{config.path}: [cluster] key 'hashing': {exc}") from None
    slots = [ShardSlot(s.idx, s.name, s.weight) for s in config.shards]
    try:
        scheme.create(slots, config.cluster.hashing_settings)
    except InvalidLayoutError as exc:
        raise ConfigError(f"{config.path}: [cluster.{scheme.name}]: {exc}") from None


def tls_refused(path: Path, server: str) -> str:
    """The message for a ``[tls]`` table and a server plugin that cannot serve TLS."""
    return (
        f"{path}: [cluster] key 'server': {server!r} cannot serve TLS, which [tls] asks"
        ' for: use server = "granian" (plugins/granian), or remove [tls]'
    )


def load_config(path: str | Path, registry: PluginRegistry | None = None) -> Config:
    """Read and validate ``path``; with a registry, also check that named plugins exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration is not UTF-8") from None
    config = parse_config(text, path)
    if registry is not None:
        check_plugins(config, registry)
    return config


TOKEN_ENV = "DISTRIBKV_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "DISTRIBKV_CLUSTER_TOKEN_FILE"


def refuse_exposed(config: Config, node: NodeConfig, token: str | None) -> None:
    """ConfigError if ``node`` would listen beyond loopback without all of what keeps an exposed
    node safe: a cluster token (internal endpoints), ``[auth]`` (client requests) and
    ``[tls]`` (no token or value in clear text). ``[auth]`` needs the cluster token anywhere:
    it is how the nodes' own calls are let in."""
    if config.auth is not None and token is None:
        raise ConfigError(
            f"{config.path}: [auth] needs a cluster token ({TOKEN_ENV} or {TOKEN_FILE_ENV}) for"
            " the nodes' own calls to each other (replication, reshard, switchovers)"
        )
    if node.address.is_loopback:
        return
    missing = []
    if token is None:
        missing.append(f"no cluster token is set ({TOKEN_ENV} or {TOKEN_FILE_ENV})")
    if config.auth is None:
        missing.append("no [auth] table gives client tokens")
    if config.tls is None:
        missing.append("no [tls] table gives certificates")
    if missing:
        raise ConfigError(
            f"{config.path}: node {node.shard.name}/{node.node_name} would listen on"
            f" {node.address}, which is not a loopback address, and {'; '.join(missing)}:"
            " refusing to expose it (see SECURITY.md)"
        )


def load_tokens(auth: AuthConfig, environ: Mapping[str, str], where: Path) -> dict[str, TokenSpec]:
    """The secret of every ``[auth]`` token, by secret: read from its file (which must not be
    readable by group or others) or its environment variable; at least 16 characters, and no
    two tokens alike. ``where``: the cluster file, for messages."""
    out: dict[str, TokenSpec] = {}
    for spec in auth.tokens:
        at = f"{where}: [auth] token {spec.name!r}"
        if spec.token_file is not None:
            secret = _read_secret(spec.token_file, f"{at}: token_file")
        else:
            assert spec.token_env is not None
            value = environ.get(spec.token_env)
            if not value:
                raise ConfigError(f"{at}: token_env: the variable {spec.token_env} is not set")
            secret = value
        if len(secret) < 16:
            raise ConfigError(f"{at}: the token must be at least 16 characters")
        if secret in out:
            raise ConfigError(f"{at}: the same token as {out[secret].name!r}")
        out[secret] = spec
    return out


def _read_secret(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8") from None
    if mode & 0o077:
        raise ConfigError(
            f"{what}: {path} is readable by others (mode {mode & 0o777:o}); run: chmod 600 {path}"
        )
    return text.strip()


def load_cluster_token(environ: Mapping[str, str]) -> str | None:
    """The cluster token for internal endpoints: from DISTRIBKV_CLUSTER_TOKEN, or from the file
    named by DISTRIBKV_CLUSTER_TOKEN_FILE, which must not be readable by group or others."""
    return _token_from(environ, TOKEN_ENV, TOKEN_FILE_ENV, "the cluster token")


CLIENT_TOKEN_ENV = "DISTRIBKV_TOKEN"
CLIENT_TOKEN_FILE_ENV = "DISTRIBKV_TOKEN_FILE"


def load_client_token(environ: Mapping[str, str]) -> str | None:
    """A client's token (``[auth]``) for the ``distribkv`` commands: from DISTRIBKV_TOKEN, or
    from the file named by DISTRIBKV_TOKEN_FILE (private, as the cluster token's); else the
    cluster token, which is an ``admin`` one; None if neither is set."""
    token = _token_from(environ, CLIENT_TOKEN_ENV, CLIENT_TOKEN_FILE_ENV, "the token")
    return token if token is not None else load_cluster_token(environ)


def _token_from(environ: Mapping[str, str], env: str, file_env: str, what: str) -> str | None:
    token = environ.get(env)
    file_name = environ.get(file_env)
    if token and file_name:
        raise ConfigError(f"set {env} or {file_env}, not both")
    if file_name:
        path = Path(file_name)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(
                f"{path}: {what} file is readable by others (mode"
                f" {mode & 0o777:o}); run: chmod 600 {path}"
            )
        token = text.strip()
    if token is not None and len(token) < 16:
        raise ConfigError(f"{what} must be at least 16 characters")
    return token or None
