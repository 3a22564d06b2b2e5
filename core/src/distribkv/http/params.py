"""Byte-exact query parameters.

Falcon decodes parameters to text, replacing invalid UTF-8 and so merging distinct keys
(``%FF%FE`` and ``%FE%FF`` would both become ``\\ufffd\\ufffd``). distribkv reads the raw query
string instead: WSGI hands it over as latin-1 text, which maps back to the exact bytes, and each
parameter is percent-decoded to bytes (``+`` is a space, as in HTML forms and Go's
``r.Form``; send a literal ``+`` as ``%2B``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import falcon

from distribkv.http.errors import ApiError
from distribkv.storage.api import MAX_KEY_SIZE


def query_params(req: falcon.Request) -> dict[str, bytes]:
    """Every parameter of the raw query string, decoded to bytes; a repeated name is a 400."""
    return parse_query(req.env.get("QUERY_STRING", ""))


def parse_query(raw: str) -> dict[str, bytes]:
    """:func:`query_params` of a raw (latin-1) query string."""
    params: dict[str, bytes] = {}
    if not raw:
        return params
    for part in raw.encode("latin-1").split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        name_text = _decode(name).decode("latin-1")
        if name_text in params:
            raise ApiError(
                falcon.HTTP_400, "bad request", f"parameter {name_text!r} is given more than once"
            )
        params[name_text] = _decode(value)
    return params


def _decode(raw: bytes) -> bytes:
    if b"%" not in raw and b"+" not in raw:
        return raw  # nothing to decode (the common case for plain keys)
    bad = _BAD_ESCAPE.search(raw)
    if bad is not None:
        # Taken literally, "%ZZ" would name another key than the client meant.
        raise ApiError(
            falcon.HTTP_400,
            "bad request",
            f"malformed percent-escape {bad.group().decode('latin-1')!r} in the query: '%' must"
            " be followed by two hexadecimal digits (send a literal '%' as %25)",
        )
    return unquote_to_bytes(raw.replace(b"+", b" "))


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2}).{0,2}", re.DOTALL)


def query_key(raw: str) -> bytes:
    """``require_key(parse_query(raw))``, without the dictionary for a query of the key alone
    with nothing to decode (``key=bench-17``, the common case)."""
    if raw.startswith("key=") and "&" not in raw and "%" not in raw and "+" not in raw:
        key = raw[4:].encode("latin-1")
        check_key(key)
        return key
    return require_key(parse_query(raw))


def require_key(params: dict[str, bytes]) -> bytes:
    """The ``key`` parameter: 400 if missing or empty, 414 if longer than the key limit."""
    key = params.get("key")
    if key is None:
        raise ApiError(falcon.HTTP_400, "missing key", "the 'key' parameter is required")
    check_key(key)
    return key


def check_key(key: bytes, where: str = "the key") -> None:
    if not key:
        raise ApiError(falcon.HTTP_400, "empty key", f"{where} is empty")
    if len(key) > MAX_KEY_SIZE:
        raise ApiError(
            falcon.HTTP_414,
            "key too long",
            f"{where} is {len(key)} bytes; the limit is {MAX_KEY_SIZE}",
        )
