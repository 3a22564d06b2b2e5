"""Wrong-shard handling: redirect to the owner, or forward to it over pooled connections.

Targets only ever come from the node's own shard map; nothing in a request can choose where a
node sends or redirects it. A forwarded request carries ``X-Distribkv-Hop``; a node that
receives a forwarded request for a key it does not own answers 421 instead of forwarding again,
so two nodes with different maps can never bounce a request between them.
"""

from __future__ import annotations

import http.client
import logging
import queue
import threading

import falcon

from distribkv.hashing.shardmap import ShardInfo
from distribkv.http.errors import ApiError

log = logging.getLogger(__name__)

HOP_HEADER = "X-Distribkv-Hop"
MAP_HEADER = "X-Distribkv-Map"
SHARD_HEADER = "X-Distribkv-Shard"
TOKEN_HEADER = "X-Distribkv-Token"

# Response headers of the owner that are passed back to the client.
_PASS_BACK = ("content-type", "x-distribkv-shard", "x-distribkv-leader", "location")


class ConnectionPool:
    """Keep-alive HTTP connections per address, each call bounded by ``timeout`` seconds."""

    def __init__(self, timeout: float, per_address: int = 16):
        self.timeout = timeout
        self.per_address = per_address
        self._idle: dict[str, queue.LifoQueue] = {}
        self._lock = threading.Lock()

    def _queue(self, address: str) -> queue.LifoQueue:
        with self._lock:
            q = self._idle.get(address)
            if q is None:
                q = self._idle[address] = queue.LifoQueue(self.per_address)
            return q

    def request(
        self, address: str, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request; retried once on a fresh connection if a pooled one was stale."""
        idle = self._queue(address)
        for attempt in (1, 2):
            try:
                conn = idle.get_nowait() if attempt == 1 else None
            except queue.Empty:
                conn = None
            reused = conn is not None
            if conn is None:
                host, _, port = address.rpartition(":")
                conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue  # the owner closed an idle keep-alive connection: try a new one
                raise
            except OSError:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                try:
                    idle.put_nowait(conn)
                except queue.Full:
                    conn.close()
            return response.status, response.getheaders(), data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            queues, self._idle = list(self._idle.values()), {}
        for q in queues:
            while True:
                try:
                    q.get_nowait().close()
                except queue.Empty:
                    break


def raw_target(req: falcon.Request) -> str:
    """The request's path and raw query, exactly as received."""
    query = req.env.get("QUERY_STRING", "")
    return req.env.get("PATH_INFO", "/") + (f"?{query}" if query else "")


def redirect(
    resp: falcon.Response,
    req: falcon.Request,
    owner: ShardInfo,
    address: str,
    *,
    error: str = "wrong shard",
    detail: str | None = None,
) -> None:
    """307 keeps the method and the body (a 301/302 may turn a PUT into a GET)."""
    resp.status = falcon.HTTP_307
    resp.set_header("Location", f"http://{address}{raw_target(req)}")
    resp.set_header(SHARD_HEADER, owner.name)
    resp.content_type = falcon.MEDIA_JSON
    if detail is None:
        detail = f"shard {owner.name!r} at {address} owns it"
    resp.media = {"error": error, "detail": detail}


def misdirected(owner: ShardInfo, me: str) -> ApiError:
    return ApiError(
        falcon.HTTP_421,
        "misdirected request",
        f"node {me} received a forwarded request for a key of shard {owner.name!r}"
        f" ({owner.leader}); the cluster maps disagree",
        owner=owner.name,
    )


def forward(
    pool: ConnectionPool,
    req: falcon.Request,
    resp: falcon.Response,
    owner: ShardInfo,
    address: str,
    *,
    body: bytes | None,
    me: str,
    fingerprint: str,
) -> None:
    headers = {HOP_HEADER: me, MAP_HEADER: fingerprint}
    if req.content_type:
        headers["Content-Type"] = req.content_type
    token = req.get_header(TOKEN_HEADER)
    if token:
        headers[TOKEN_HEADER] = token
    try:
        status, response_headers, data = pool.request(
            address, req.method, raw_target(req), body, headers
        )
    except TimeoutError as exc:
        raise ApiError(
            falcon.HTTP_504, "owner timed out", f"shard {owner.name!r} at {address}: {exc}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ApiError(
            falcon.HTTP_502, "owner unreachable", f"shard {owner.name!r} at {address}: {exc}"
        ) from exc
    resp.status = status
    for name, value in response_headers:
        if name.lower() in _PASS_BACK:
            resp.set_header(name, value)
    resp.set_header(SHARD_HEADER, owner.name)
    resp.data = data


__all__ = [
    "HOP_HEADER",
    "MAP_HEADER",
    "SHARD_HEADER",
    "TOKEN_HEADER",
    "ConnectionPool",
    "forward",
    "misdirected",
    "raw_target",
    "redirect",
]
