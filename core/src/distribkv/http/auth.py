"""Role tokens on the HTTP side: which rank each request needs, and the 401 or 403 when the
token it carries does not give it (see :mod:`distribkv.auth`).

The key-value requests are checked where :class:`distribkv.http.app.NodeApp` answers them
(with or without WSGI), everything else by :class:`AuthCheck`, the first middleware of the
Falcon application; a ``/batch`` of gets needs ``read``, one that writes ``write``. Without
``[auth]`` none of this runs: the node has no authorizer and the request pays one ``is None``.
"""

from __future__ import annotations

import falcon

from distribkv.auth import ADMIN, NONE, READ, ROLE_OF_RANK, WRITE, Authorizer
from distribkv.http.api import Answer, Header, error_answer
from distribkv.http.errors import ApiError
from distribkv.protocol import FORWARDED_READS_PATH

__all__ = ["AuthCheck", "deny", "needed_rank", "require"]

#: ``WWW-Authenticate`` of a 401 (RFC 6750).
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="distribkv"')
_UNAUTHORIZED = "unauthorized"
_NO_TOKEN = "this request needs a token (Authorization: Bearer <token>)"
_UNKNOWN_TOKEN = "the token is not known"

#: The rank each client path needs; any other path (the internal endpoints, a plugin's) needs
#: ``admin``. ``/status``, ``/metrics`` and ``/ui/data`` need ``[auth] status_role``.
PATH_RANKS = {
    "/healthz": NONE,
    "/get": READ,
    FORWARDED_READS_PATH: READ,  # a forwarding node's reads, with its client's token
    "/cluster": READ,
    "/batch": READ,  # and WRITE once the batch is seen to write
    "/set": WRITE,
    "/delete": WRITE,
    # The cluster page and its files hold no data (its data is /ui/data, as /status).
    "/ui": NONE,
    "/ui/ui.css": NONE,
    "/ui/ui.js": NONE,
}


#: What tells how the node is doing (roles, seqs, lag, counts; no key, no value): the rank
#: ``[auth] status_role`` names.
STATUS_PATHS = frozenset(("/status", "/metrics", "/ui/data"))


def needed_rank(auth: Authorizer, path: str) -> int:
    if path in STATUS_PATHS:
        return auth.status_rank
    return PATH_RANKS.get(path, ADMIN)


def _refusal(auth: Authorizer, header: Header, needed: int) -> tuple[int, str, str] | None:
    """None if the request's token gives ``needed``; else (status, error, detail)."""
    if needed == NONE:
        return None
    identity = auth.identify(header)
    if identity is None:
        given = header("authorization") or header("x-distribkv-token")
        return 401, _UNAUTHORIZED, _UNKNOWN_TOKEN if given else _NO_TOKEN
    name, rank = identity
    if rank >= needed:
        return None
    return (
        403,
        "forbidden",
        f"the token {name!r} has the role {ROLE_OF_RANK[rank]!r}; this request needs"
        f" {ROLE_OF_RANK[needed]!r}",
    )


def deny(auth: Authorizer, header: Header, needed: int) -> Answer | None:
    """The 401 or 403 answer for a request whose token does not give ``needed``, or None."""
    refusal = _refusal(auth, header, needed)
    if refusal is None:
        return None
    status, headers, body = error_answer(*refusal)
    if status == 401:
        headers = [*headers, CHALLENGE]
    return status, headers, body


def require(auth: Authorizer | None, header: Header, needed: int) -> None:
    """Raise the 401 or 403 for a request whose token does not give ``needed``."""
    if auth is None:
        return
    refusal = _refusal(auth, header, needed)
    if refusal is None:
        return
    status, error, detail = refusal
    headers = {CHALLENGE[0]: CHALLENGE[1]} if status == 401 else None
    raise ApiError(falcon.code_to_http_status(status), error, detail, headers=headers)


class AuthCheck:
    """Falcon middleware: every route's rank (:data:`PATH_RANKS`), checked before the others
    run (a map mismatch or a 404 tells nothing to a caller without a token)."""

    def __init__(self, auth: Authorizer):
        self.auth = auth

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        require(self.auth, req.get_header, needed_rank(self.auth, req.path))
