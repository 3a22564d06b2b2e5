"""The ``etcd`` coordination: leaders elected through etcd v3, fenced by leases, and failover.

Selected with ``[cluster] coordination = "etcd"`` and a ``[cluster] name``; configured in
``[coordination]``::

    [coordination]
    endpoints = ["http://127.0.0.1:2379"]   # or "local": distribkv launch runs one etcd
    local_address = "127.0.0.1:2379"        # where that local etcd listens
    lease_ttl = 2                           # seconds (2 or more)
    prefix = "/distribkv/<cluster name>"
    failover_max_lag = 10000                # entries; a replica further behind never leads
    poll_interval = 0.1                     # seconds between two reads of etcd
    timeout = 0.5                           # seconds per etcd call (default: lease_ttl / 4)
    username = "..."                        # etcd authentication, if enabled
    password_env = "DISTRIBKV_ETCD_PASSWORD"  # the password, from this variable (or password)
    ca_file = "..."                         # https:// endpoints: CA, client cert and key
    cert_file = "..."
    key_file = "..."

See :mod:`distribkv_etcd.coordinator` for what is kept in etcd and how elections run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from distribkv import hookimpl
from distribkv.config import Config, address_from_text
from distribkv.coordination.api import CoordinationError, CoordinationSpec
from distribkv_etcd.client import EtcdClient

__all__ = ["Settings"]

KNOWN = (
    "endpoints",
    "local_address",
    "lease_ttl",
    "prefix",
    "failover_max_lag",
    "poll_interval",
    "timeout",
    "username",
    "password",
    "password_env",
    "ca_file",
    "cert_file",
    "key_file",
)


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CoordinationError(f"key {key!r}: must be {names}, not {value!r}")
    return value


@attrs.frozen
class Settings:
    endpoints: list[str]
    local: bool
    local_address: str
    lease_ttl: int
    prefix: str
    failover_max_lag: int
    poll_interval: float
    timeout: float
    username: str | None
    password: str | None
    ca_file: str | None
    cert_file: str | None
    key_file: str | None

    @classmethod
    def from_table(cls, table: Mapping[str, Any], config: Config) -> Settings:
        unknown = sorted(set(table) - set(KNOWN))
        if unknown:
            raise CoordinationError(
                f"key {unknown[0]!r}: unknown setting of coordination 'etcd' (known:"
                f" {', '.join(KNOWN)})"
            )
        if config.cluster.name is None:
            raise CoordinationError(
                "coordination 'etcd' needs [cluster] name, which keeps this cluster's keys in"
                " etcd apart from any other's"
            )
        raw = table.get("endpoints", "local")
        local_address = _get(table, "local_address", str, "127.0.0.1:2379")
        try:
            address = address_from_text(local_address)
        except ValueError as exc:
            raise CoordinationError(f"key 'local_address': {exc}") from None
        if raw == "local":
            if not address.is_loopback:
                raise CoordinationError(
                    f"key 'local_address': {local_address!r} is not a loopback address; a"
                    " local etcd listens on loopback only"
                )
            endpoints, local = [f"http://{local_address}"], True
        elif isinstance(raw, list) and raw and all(isinstance(e, str) for e in raw):
            for endpoint in raw:
                if not endpoint.startswith(("http://", "https://")):
                    raise CoordinationError(
                        f"key 'endpoints': {endpoint!r} is not an http:// or https:// URL"
                    )
            if len({e.split("://")[0] for e in raw}) != 1:
                raise CoordinationError("key 'endpoints': mixes http:// and https://")
            endpoints, local = list(raw), False
        else:
            raise CoordinationError(f"key 'endpoints': a list of URLs or \"local\", not {raw!r}")
        ttl = _get(table, "lease_ttl", int, 2)
        if ttl < 2:
            raise CoordinationError(
                f"key 'lease_ttl': at least 2 seconds (etcd's least), not {ttl}"
            )
        poll = float(_get(table, "poll_interval", (int, float), 0.1))
        if not 0 < poll <= ttl / 4:
            raise CoordinationError(
                f"key 'poll_interval': between 0 and lease_ttl / 4 ({ttl / 4:g}), not {poll:g}"
            )
        timeout = float(_get(table, "timeout", (int, float), ttl / 4))
        if not 0 < timeout <= ttl / 2:
            raise CoordinationError(
                f"key 'timeout': between 0 and lease_ttl / 2 ({ttl / 2:g}), not {timeout:g}"
            )
        lag = _get(table, "failover_max_lag", int, 10_000)
        if lag < 0:
            raise CoordinationError(f"key 'failover_max_lag': 0 or more, not {lag}")
        prefix = _get(table, "prefix", str, f"/distribkv/{config.cluster.name}")
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise CoordinationError(
                f"key 'prefix': starts with '/' and does not end with one, not {prefix!r}"
            )
        password = _get(table, "password", str, None)
        password_env = _get(table, "password_env", str, None)
        if password_env is not None:
            password = os.environ.get(password_env)
            if password is None:
                raise CoordinationError(
                    f"key 'password_env': the variable {password_env} is not set"
                )
        files = {}
        for key in ("ca_file", "cert_file", "key_file"):
            value = _get(table, key, str, None)
            if value is not None:
                path = Path(value) if Path(value).is_absolute() else config.path.parent / value
                if not path.is_file():
                    raise CoordinationError(f"key {key!r}: no file {path}")
                value = str(path)
            files[key] = value
        return cls(
            endpoints=endpoints,
            local=local,
            local_address=local_address,
            lease_ttl=ttl,
            prefix=prefix,
            failover_max_lag=lag,
            poll_interval=poll,
            timeout=timeout,
            username=_get(table, "username", str, None),
            password=password,
            **files,
        )

    def client(self, source_host: str | None = None) -> EtcdClient:
        return EtcdClient(
            self.endpoints,
            source_host=source_host,
            timeout=self.timeout,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )


def _check(table: Mapping[str, Any], config: Config) -> None:
    Settings.from_table(table, config)


def _create(node, table: Mapping[str, Any]):
    from distribkv_etcd.coordinator import EtcdCoordinator

    return EtcdCoordinator(node, table)


@contextlib.contextmanager
def _launch(config: Config, log_dir: Path) -> Iterator[str | None]:
    """What ``distribkv launch`` runs before the nodes: a local etcd for ``endpoints =
    "local"``, in ``<data_dir>/etcd``; nothing otherwise."""
    settings = Settings.from_table(config.coordination, config)
    if not settings.local:
        yield None
        return
    from distribkv_etcd.local import LocalEtcd

    etcd = LocalEtcd(
        config.storage.data_dir / "etcd",
        settings.local_address,
        log_path=log_dir / "etcd.log",
    )
    etcd.start()
    try:
        yield f"etcd at {etcd.endpoint} (pid {etcd.process.pid if etcd.process else '?'})"
    finally:
        etcd.stop()


@hookimpl
def distribkv_coordinations() -> list[CoordinationSpec]:
    return [
        CoordinationSpec(
            "etcd",
            _create,
            "leaders elected through etcd v3 leases; a dead leader's shard fails over",
            check=_check,
            elects=True,
            launch=_launch,
        )
    ]
