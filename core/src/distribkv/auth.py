"""Who a request comes from: the client tokens of ``[auth]`` (each with a role, as Redis ACLs
give each user its commands) and the cluster token, which the nodes use between themselves.

A credential is sent as ``Authorization: Bearer <token>`` (or, as the cluster token has always
been, ``X-Distribkv-Token``). It is compared with every known token in constant time
(``hmac.compare_digest``, and no early exit), so that the time an answer takes tells nothing
about how much of a guess was right. Nothing here imports the HTTP framework; the node's HTTP
layer (:mod:`distribkv.http.auth`) turns a refusal into 401 or 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

from distribkv.config import TokenSpec
from distribkv.protocol import TOKEN_HEADER

__all__ = ["ADMIN", "RANKS", "READ", "WRITE", "Authorizer", "Identity", "credential"]

#: What each role may do, as a rank: a request needs a rank, a token gives one.
NONE, READ, WRITE, ADMIN = 0, 1, 2, 3
RANKS = {"none": NONE, "read": READ, "write": WRITE, "admin": ADMIN}
ROLE_OF_RANK = {rank: role for role, rank in RANKS.items()}

_TOKEN = TOKEN_HEADER.lower()

#: ``(name, rank)`` of a known token: the name of its ``[auth]`` entry, or "cluster".
Identity = tuple[str, int]


def credential(header: Callable[[str], str | None]) -> bytes | None:
    """The token a request carries (``header`` looks up a lower-case header name)."""
    value = header("authorization")
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip().encode("utf-8", "replace")
    value = header(_TOKEN)
    return None if not value else value.encode("utf-8", "replace")


class Authorizer:
    """The tokens a node knows: the ``[auth]`` ones with their roles, and the cluster token,
    which counts as ``admin``."""

    def __init__(
        self,
        tokens: Mapping[str, TokenSpec],
        cluster_token: str | None,
        status_role: str = "admin",
    ):
        self._known: list[tuple[bytes, Identity]] = [
            (secret.encode(), (spec.name, RANKS[spec.role])) for secret, spec in tokens.items()
        ]
        if cluster_token:
            self._known.append((cluster_token.encode(), ("cluster", ADMIN)))
        #: The rank ``/status`` and ``/metrics`` need.
        self.status_rank = RANKS[status_role]

    def identify(self, header: Callable[[str], str | None]) -> Identity | None:
        """Whose token the request carries; None for none, or one that is not known."""
        given = credential(header)
        if given is None:
            return None
        found = None
        for secret, identity in self._known:
            # Every token is compared, whichever matches.
            if hmac.compare_digest(given, secret) and found is None:
                found = identity
        return found
