"""A replica's requests to its leader over HTTP, for the transports that speak HTTP.

:class:`HttpSource` is the part of a :class:`~distribkv.replication.follower.LeaderSource`
that every HTTP transport shares: one keep-alive connection to the leader through the shared
client stack (:mod:`distribkv.httpclient`), the cluster token, a timeout on every call, and
the snapshot pages of a full resync (a core endpoint). A transport adds ``pull``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_from_bytes

from distribkv.httpclient import HttpClient, RequestFailed, Response, source_host
from distribkv.protocol import TOKEN_HEADER
from distribkv.replication.follower import LeaderSource, LeaderUnavailable

__all__ = ["HttpSource"]


class HttpSource(LeaderSource):
    def __init__(self, node):
        self.replica = node.node_config.node_name
        self.address = node.leader_address or node.me.leader
        #: With a coordination that elects: the term this replica follows (a leader of an
        #: older term refuses it).
        self.term = node.term if node.elects else None
        self.timeout = node.config.server.forward_timeout
        self.headers = {TOKEN_HEADER: node.token} if node.token else {}
        self.client = HttpClient(
            self.timeout,
            per_address=1,
            source_host=source_host(node.address.host),
            ssl_context=node.client_tls,
        )

    def poll_target(
        self, path: str, after: int, history: str | None, wait: float, check: int | None
    ) -> str:
        """The target of a long poll for what follows ``after``: who asks, what it follows,
        how long the leader may wait, and the check of its last entry (see follower.py)."""
        target = (
            f"{path}?after={after}&replica={self.replica}&history={history or ''}"
            f"&wait_ms={int(wait * 1000)}"
        )
        if self.term is not None:
            target += f"&term={self.term}"
        return target if check is None else f"{target}&check={check}"

    def fetch(self, target: str, timeout: float) -> Response:
        """GET ``target`` from the leader; LeaderUnavailable if it cannot be reached."""
        try:
            return self.client.request(
                self.address, "GET", target, None, self.headers, timeout=timeout
            )
        except RequestFailed as exc:
            raise LeaderUnavailable(f"leader {self.address}: {exc}") from exc

    def document(self, response: Response) -> Any:
        """The leader's msgpack or JSON answer; LeaderUnavailable for anything else (an answer
        that is not a node's, or an error)."""
        try:
            doc = response.document()
        except ValueError as exc:
            raise LeaderUnavailable(
                f"leader {self.address} answered {response.status} with {exc}"
            ) from None
        if response.status != 200 or not isinstance(doc, dict):
            raise LeaderUnavailable(
                f"leader {self.address} answered {response.status}: {doc!r:.200}"
            )
        return doc

    def snapshot_page(self, after_key: bytes | None) -> Any:
        target = f"/replication/snapshot?replica={self.replica}"
        if after_key is not None:
            target += f"&after={quote_from_bytes(after_key, safe='')}"
        return self.document(self.fetch(target, timeout=self.timeout * 4))

    def close(self) -> None:
        self.client.close()
