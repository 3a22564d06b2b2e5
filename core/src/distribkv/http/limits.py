"""The size limits of a request, checked in one place each: a value (``max_value_size``) and a
``/batch`` body (``max_batch_bytes``).

Every node has the cluster's limits, so a node may refuse a body by its ``Content-Length``
before reading it (the owner of the key would refuse it too): :meth:`Limits.body_check` is the
servers' ``Listen.body_check``.
"""

from __future__ import annotations

import falcon

from distribkv.http.errors import ApiError

__all__ = ["Limits"]


class Limits:
    def __init__(self, max_value: int, max_batch: int):
        self.max_value = max_value
        self.max_batch = max_batch

    @classmethod
    def of(cls, node) -> Limits:
        return cls(node.config.storage.max_value_size, node.config.server.max_batch_bytes)

    def value(self, size: int, what: str = "the value", *, more: bool = False) -> None:
        """413 for a value of ``size`` bytes over the limit (``more``: at least that many)."""
        if size > self.max_value:
            raise ApiError(
                falcon.HTTP_413, "value too large", _detail(what, size, self.max_value, more)
            )

    def batch(self, size: int, *, more: bool = False) -> None:
        """413 for a ``/batch`` body of ``size`` bytes over the limit."""
        if size > self.max_batch:
            raise ApiError(
                falcon.HTTP_413, "batch too large", _detail("the body", size, self.max_batch, more)
            )

    def body_check(self, method: str, path: str, length: int) -> tuple[int, str, str] | None:
        """``Listen.body_check``: a PUT/POST /set body over the value limit and a /batch body
        over the batch limit, refused by their Content-Length before they are read."""
        try:
            if path == "/set" and method in ("PUT", "POST"):
                self.value(length, "the body")
            elif path == "/batch":
                self.batch(length)
        except ApiError as exc:
            return 413, exc.title, exc.description or ""
        return None


def _detail(what: str, size: int, limit: int, more: bool) -> str:
    if more:
        return f"{what} exceeds {limit} bytes, the limit"
    return f"{what} is {size} bytes; the limit is {limit}"
