"""TLS contexts for the calls that reach a node: from the Python client, the ``distribkv``
commands, and a node calling another (forwarding, replication pulls, reshard, health checks).

Nothing here imports the node's server side. A node's own side of TLS (its certificate and,
with ``verify_clients``, the CA it checks clients by) is the server plugin's, through
:class:`distribkv.http.api.ListenTls`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from distribkv.config import TlsConfig

__all__ = ["client_context", "node_context", "scheme"]


def client_context(
    ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A context that trusts only the nodes whose certificate ``ca`` signed (the host name or
    IP address dialled must be in the certificate), and presents ``cert``/``key`` to a node
    that asks for a client certificate (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        context.load_cert_chain(str(cert), None if key is None else str(key))
    return context


def node_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """What a node (or a ``distribkv`` command that has the cluster file) calls the nodes of
    a ``[tls]`` cluster with: the cluster's CA, and its certificate for mutual TLS; None
    without ``[tls]``."""
    if tls is None:
        return None
    return client_context(tls.ca, tls.cert, tls.key)


def scheme(tls: TlsConfig | None) -> str:
    return "http" if tls is None else "https"
