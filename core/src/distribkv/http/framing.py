"""How strictly the node's servers take a request's HTTP/1.1 framing (RFC 9112), in one place.

A server that parses HTTP itself (waitress) asks these checks about every request's head; one
whose HTTP stack parses it (granian) asks only what the stack leaves to it. Each check gives a
refusal ``(status, error, detail)``, which the server answers in the node's JSON form
(:func:`distribkv.http.api.error_answer`) and then closes the connection (after a framing error
nothing that follows on it can be trusted), or None.

What is refused, and why:

- a request line that is not ``METHOD SP target SP HTTP/x.y``: an HTTP/0.9 request (``GET /``)
  gets a 400 at once instead of waiting for headers that never come;
- a byte outside visible ASCII in the request line (a NUL or another control byte in the
  target, a raw byte over 0x7f: a target is percent-encoded);
- a version other than HTTP/1.0 and HTTP/1.1: 505;
- a line that ends in a bare LF or holds a bare CR, and a folded header line (obs-fold): both
  are read differently by different parsers, so a proxy in front could see other requests;
- Transfer-Encoding other than one ``chunked``, on HTTP/1.0, or next to a Content-Length
  (RFC 9112 §6.1: such a request may smuggle another one inside its body).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["Refusal", "head_refusal", "transfer_refusal"]

#: ``(status, error, detail)``, as ``Listen.body_check`` gives it.
Refusal = tuple[int, str, str]

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/([0-9])\.([0-9])")
#: A byte that has no place in a request line (which is visible ASCII and single spaces).
_NOT_IN_LINE = re.compile(rb"[^\x20-\x7e]")
_SUPPORTED = (b"1.0", b"1.1")


def _bad(detail: str) -> Refusal:
    return 400, "bad request", detail


def head_refusal(head: bytes, *, complete: bool) -> Refusal | None:
    """What is wrong with a request's head (its request line and header lines). ``head`` is
    what has arrived of it so far; ``complete``: up to the blank line that ends it. An
    incomplete head is refused only for what no more bytes can mend."""
    head = head.lstrip(b"\r\n")  # empty lines before a request are allowed (RFC 9112 §2.2)
    if head.count(b"\n") != head.count(b"\r\n"):
        return _bad("a line ends in a bare LF; HTTP lines end in CRLF")
    bare_cr = head.count(b"\r") - head.count(b"\r\n")
    if bare_cr > 1 or (bare_cr == 1 and (complete or not head.endswith(b"\r"))):
        return _bad("a bare CR in the request's head")
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    if not complete and end < 0:
        line = line.rstrip(b"\r")
    stray = _NOT_IN_LINE.search(line)
    if stray is not None:
        byte = line[stray.start()]
        return _bad(f"byte 0x{byte:02x} in the request line (a target is sent percent-encoded)")
    if end < 0:
        return _bad("the request has no request line") if complete else None
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if b" HTTP/" not in line:
            return _bad("a request line without an HTTP version (HTTP/0.9) is not served")
        return _bad("the request line is not METHOD SP target SP HTTP/1.1")
    version = match[1] + b"." + match[2]
    if version not in _SUPPORTED:
        return (
            505,
            "http version not supported",
            f"HTTP/{version.decode()} is not served; send HTTP/1.1 (or HTTP/1.0)",
        )
    if b"\r\n " in head or b"\r\n\t" in head:
        return _bad("a folded header line (obs-fold); send each field on one line")
    return None


def transfer_refusal(version: str, codings: Iterable[str], content_length: bool) -> Refusal | None:
    """Transfer-Encoding as the node takes it: a single ``chunked``, in HTTP/1.1, with no
    Content-Length. ``codings``: the value of every Transfer-Encoding field of the request
    (none: no refusal); ``version``: ``"1.1"`` or ``"1.0"``."""
    values = list(codings)
    if not values:
        return None
    if version != "1.1":
        return 400, "bad framing", "Transfer-Encoding in an HTTP/1.0 request"
    if content_length:
        return (
            400,
            "bad framing",
            "both Content-Length and Transfer-Encoding: a request has one or the other",
        )
    listed = [c.strip(" \t").lower() for value in values for c in value.split(",")]
    if listed != ["chunked"]:
        return (
            400,
            "bad framing",
            f"Transfer-Encoding {', '.join(values)!r}: only a single 'chunked' is accepted",
        )
    return None
