"""A minimal HTTP client for one key, used by the ``distribkv get|set|delete`` commands."""

from __future__ import annotations

import http.client
from urllib.parse import quote_from_bytes, urlsplit

MAX_REDIRECTS = 3


def key_target(command: str, key: bytes) -> str:
    return f"/{command}?key={quote_from_bytes(key, safe='')}"


def request_key(
    address: str, command: str, key: bytes, value: bytes | None, *, timeout: float
) -> tuple[int, bytes]:
    """(status, body) of get/set/delete ``key``, following at most MAX_REDIRECTS redirects."""
    method = {"get": "GET", "set": "PUT", "delete": "DELETE"}[command]
    target = key_target(command, key)
    for _ in range(MAX_REDIRECTS + 1):
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        try:
            conn.request(method, target, body=value)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status in (307, 308):
            location = urlsplit(response.getheader("Location", ""))
            address = location.netloc
            target = location.path + (f"?{location.query}" if location.query else "")
            continue
        return response.status, body
    raise OSError(f"more than {MAX_REDIRECTS} redirects for {command} {key!r}")
