"""etcd v3 through its JSON gateway (``/v3/...``), over the node's own HTTP stack.

Only what coordination needs: leases (grant, keep-alive, revoke), a range over a prefix, a
put, and a transaction that creates a key only if it is absent. Keys and values are bytes
(base64 on the wire, as the gateway wants); 64-bit numbers come back as strings.

Every call has a timeout. The endpoints are tried in turn, starting with the last one that
answered, so that a cluster of etcd members keeps serving when one of them is down. With a
user name, the client authenticates (``/v3/auth/authenticate``) and sends the token; a token
that expired is renewed once per call.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from distribkv.httpclient import HttpClient, RequestFailed

__all__ = ["EtcdClient", "EtcdError", "EtcdUnavailable", "KeyValue", "prefix_end"]

#: Seconds an authentication (user and password for a token) may take at least.
AUTHENTICATE_TIMEOUT = 5.0


class EtcdError(Exception):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time."""


@attrs.frozen
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        base64.b64decode(raw["key"]),
        base64.b64decode(raw.get("value", "")),
        int(raw.get("create_revision", 0)),
        int(raw.get("mod_revision", 0)),
        int(raw.get("lease", 0)),
    )


class EtcdClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        source_host: str | None = None,
    ):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        schemes = {urlsplit(url).scheme for url in endpoints}
        if len(schemes) != 1 or not schemes <= {"http", "https"}:
            raise ValueError(f"endpoints must all be http:// or all https://: {list(endpoints)}")
        context = None
        if schemes == {"https"}:
            context = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
        self.addresses = [urlsplit(url).netloc for url in endpoints]
        self.timeout = timeout
        self.http = HttpClient(timeout, per_address=2, ssl_context=context, source_host=source_host)
        self.username, self.password = username, password
        self._token: str | None = None
        self._current = 0
        self._lock = threading.Lock()

    # --- calls ---------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> dict:
        """POST ``body`` to ``path`` on the first endpoint that answers; its JSON answer."""
        renewed = False
        while True:
            try:
                return self._call_once(path, body, timeout)
            except EtcdError as exc:
                if self.username and not renewed and "auth token" in str(exc):
                    self._token = None
                    renewed = True
                    continue
                raise

    def _call_once(self, path: str, body: dict[str, Any], timeout: float | None) -> dict:
        data = json.dumps(body).encode()
        errors = []
        count = len(self.addresses)
        for step in range(count):
            index = (self._current + step) % count
            address = self.addresses[index]
            headers = {"Content-Type": "application/json"}
            try:
                if self.username and path != "/v3/auth/authenticate":
                    headers["Authorization"] = self._auth_token(address)
                response = self.http.request(
                    address, "POST", path, data, headers, timeout=timeout or self.timeout
                )
            except RequestFailed as exc:
                errors.append(str(exc))
                continue
            self._current = index
            # The gateway streams some answers (keep-alive) as lines of {"result": ...}.
            text = response.body.decode("utf-8", "replace").strip().splitlines()
            try:
                document = json.loads(text[0]) if text else {}
            except ValueError:
                raise EtcdError(
                    f"etcd at {address} answered {response.status}: {text[:1]}"
                ) from None
            if "result" in document and isinstance(document["result"], dict):
                document = document["result"]
            if response.status != 200 or "error" in document:
                message = document.get("message") or document.get("error") or document
                raise EtcdError(f"etcd at {address}: {message}")
            return document
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _auth_token(self, address: str) -> str:
        with self._lock:
            if self._token is None:
                # etcd checks the password with bcrypt, slow by design (and slower on a busy
                # machine): a short timeout would give up on every try, each of which starts
                # the check again.
                answer = self._call_once(
                    "/v3/auth/authenticate",
                    {"name": self.username, "password": self.password or ""},
                    max(AUTHENTICATE_TIMEOUT, self.timeout),
                )
                self._token = answer["token"]
            return self._token

    # --- leases --------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and its TTL in seconds."""
        answer = self.call("/v3/lease/grant", {"TTL": ttl})
        return int(answer["ID"]), int(answer["TTL"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL from now, or 0 if it no longer exists."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("TTL", 0))

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # --- keys ----------------------------------------------------------------------------

    def range_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """The revision, and every key under ``prefix``."""
        answer = self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(answer["header"]["revision"])
        return revision, [_kv(raw) for raw in answer.get("kvs", [])]

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; the revision of the change."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def create(
        self,
        key: bytes,
        value: bytes,
        *,
        lease: int = 0,
        with_puts: Sequence[tuple[bytes, bytes]] = (),
    ) -> tuple[bool, int]:
        """In one transaction: if ``key`` does not exist, create it (attached to ``lease``)
        and put each of ``with_puts``. Returns whether it did, and the revision (of the
        creation when it succeeded: every key it wrote has it as its create revision)."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        success = [{"request_put": put}]
        success += [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in with_puts]
        answer = self.call(
            "/v3/kv/txn",
            {
                "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
                "success": success,
                "failure": [],
            },
        )
        return bool(answer.get("succeeded", False)), int(answer["header"]["revision"])

    def hand_over(
        self,
        key: bytes,
        value: bytes,
        *,
        mod_revision: int,
        lease: int,
        lease_key: bytes,
        with_puts: Sequence[tuple[bytes, bytes]] = (),
    ) -> tuple[bool, int]:
        """In one transaction: if ``key`` was last written at ``mod_revision`` and
        ``lease_key`` is still attached to ``lease``, write ``value`` to ``key`` on ``lease``
        and put each of ``with_puts``. Returns whether it did, and the revision."""
        success = [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}]
        success += [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in with_puts]
        answer = self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": _b64(key), "target": "MOD", "mod_revision": str(mod_revision)},
                    {"key": _b64(lease_key), "target": "LEASE", "lease": str(lease)},
                ],
                "success": success,
                "failure": [],
            },
        )
        return bool(answer.get("succeeded", False)), int(answer["header"]["revision"])

    def close(self) -> None:
        self.http.close()
