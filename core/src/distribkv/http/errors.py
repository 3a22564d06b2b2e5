"""HTTP errors: one JSON shape (``{"error": ..., "detail": ...}``), real status codes, and the
one place where storage errors become HTTP statuses."""

from __future__ import annotations

import json
import logging

import falcon

from distribkv.coordination.api import NotLeaderError
from distribkv.http.api import Answer, as_wsgi
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


def _error_document(exc: falcon.HTTPError) -> dict:
    if isinstance(exc, ApiError):
        return exc.to_dict()
    body = {"error": exc.title}
    if exc.description:
        body["detail"] = exc.description
    return body


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    document = _error_document(exc)
    if "detail" not in document:
        # Falcon's own errors (no route, a method the route has not) carry only a title.
        if exc.status == falcon.HTTP_405:
            allowed = dict(exc.headers or {}).get("Allow", "")
            document = {
                "error": "method not allowed",
                "detail": f"{req.method} is not allowed on {req.path}; allowed: {allowed}",
            }
        elif exc.status == falcon.HTTP_404:
            document = {"error": "not found", "detail": f"no endpoint {req.path}"}
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(document).encode()


def api_error(exc: BaseException, method: str, path: str) -> falcon.HTTPError:
    """The HTTP error a request answers for ``exc``: the one mapping, used by the application's
    error handlers and by writes that finish after their request returned."""
    if isinstance(exc, falcon.HTTPError):
        return exc
    if isinstance(exc, StorageError):
        for cls, status, title in STORAGE_STATUS:
            if isinstance(exc, cls):
                if status == falcon.HTTP_500:
                    log.error("%s on %s %s: %s", title, method, path, exc)
                return ApiError(status, title, str(exc))
    if isinstance(exc, NotReplicatedError):
        return ApiError(falcon.HTTP_503, "not replicated", str(exc))
    if isinstance(exc, NotLeaderError):
        extra = {"leader": exc.leader} if exc.leader else {}
        title = "outcome unknown" if exc.stored else "not the leader"
        return ApiError(falcon.HTTP_503, title, str(exc), headers={"Retry-After": "1"}, **extra)
    if isinstance(exc, Moving):
        return ApiError(
            falcon.HTTP_503,
            "moving",
            f"{exc}; the write was not applied",
            headers={"Retry-After": "1"},
        )
    # Never echo an unexpected exception to the client; the log has it.
    log.error("unexpected error on %s %s", method, path, exc_info=exc)
    return ApiError(falcon.HTTP_500, "internal error", "see the node's log")


def error_answer_for(exc: BaseException, method: str, path: str) -> Answer:
    """``api_error(exc)`` as an answer: its status, headers and the JSON body, exactly as the
    application's error serializer writes them."""
    error = api_error(exc, method, path)
    body = json.dumps(_error_document(error)).encode()
    headers = list(dict(error.headers or {}).items())
    headers.append(("Content-Type", falcon.MEDIA_JSON))
    return error.status_code, headers, body


def error_response(exc: BaseException, method: str, path: str) -> tuple[str, list, bytes]:
    """:func:`error_answer_for` as WSGI gives it (a status line, a Content-Length)."""
    return as_wsgi(error_answer_for(exc, method, path))


def _map_error(req, resp, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError | falcon.HTTPStatus):
        raise exc
    raise api_error(exc, req.method, req.path) from exc


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, _map_error)
