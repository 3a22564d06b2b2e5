"""HTTP errors: one JSON shape (``{"error": ..., "detail": ...}``), real status codes, and the
one place where storage errors become HTTP statuses."""

from __future__ import annotations

import json
import logging

import falcon

from distribkv.replication.api import NotReplicatedError
from distribkv.storage.errors import (
    BackendClosedError,
    BackendLockedError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    StorageError,
    StorageFullError,
)
from distribkv.transition import Moving

log = logging.getLogger(__name__)

# Most specific first.
STORAGE_STATUS: list[tuple[type[StorageError], str, str]] = [
    (StorageFullError, falcon.HTTP_507, "storage full"),
    (CorruptionError, falcon.HTTP_500, "corruption detected"),
    (InvalidKeyError, falcon.HTTP_400, "invalid key"),
    (InvalidValueError, falcon.HTTP_413, "invalid value"),
    (BackendClosedError, falcon.HTTP_503, "storage closed"),
    (BackendLockedError, falcon.HTTP_503, "storage locked"),
    (StorageError, falcon.HTTP_500, "storage error"),
]


class ApiError(falcon.HTTPError):
    """An error answered as ``{"error": title, "detail": detail, ...extra}``."""

    def __init__(
        self,
        status: str,
        title: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra,
    ):
        super().__init__(status, title=title, description=detail, headers=headers)
        self.extra = extra

    def to_dict(self, obj_type=dict):
        body = obj_type()
        body["error"] = self.title
        if self.description:
            body["detail"] = self.description
        body.update(self.extra)
        return body


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    if isinstance(exc, ApiError):
        body = exc.to_dict()
    else:
        body = {"error": exc.title}
        if exc.description:
            body["detail"] = exc.description
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(body).encode()


def handle_storage_error(req, resp, exc: StorageError, params) -> None:
    for cls, status, title in STORAGE_STATUS:
        if isinstance(exc, cls):
            if status == falcon.HTTP_500:
                log.error("%s on %s %s: %s", title, req.method, req.path, exc)
            raise ApiError(status, title, str(exc)) from exc


def handle_not_replicated(req, resp, exc: NotReplicatedError, params) -> None:
    raise ApiError(falcon.HTTP_503, "not replicated", str(exc)) from exc


def handle_moving(req, resp, exc: Moving, params) -> None:
    raise ApiError(
        falcon.HTTP_503,
        "moving",
        f"{exc}; the write was not applied",
        headers={"Retry-After": "1"},
    ) from exc


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError | falcon.HTTPStatus):
        raise exc
    # Never echo an unexpected exception to the client; the log has it.
    log.exception("unexpected error on %s %s", req.method, req.path)
    raise ApiError(falcon.HTTP_500, "internal error", "see the node's log") from exc


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(StorageError, handle_storage_error)
    app.add_error_handler(NotReplicatedError, handle_not_replicated)
    app.add_error_handler(Moving, handle_moving)
