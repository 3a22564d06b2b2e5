"""Raw HTTP/1.1 for tests that send what no HTTP client would: bytes written to a socket as
they are, and the answers read back and parsed, every exchange bounded in time::

    answers, closed = exchange("127.0.0.2:8080", b"GET /healthz HTTP/9.9\\r\\n\\r\\n")
    assert [a.status for a in answers] == [505] and closed

Interim answers (``100 Continue``) are skipped. A HEAD request cannot be told apart in the
stream of answers (its answer has a Content-Length and no body), so these helpers do not
handle one.
"""

from __future__ import annotations

import select
import socket
import time

__all__ = ["Answer", "AnswerReader", "exchange"]


class Answer:
    """One answer: its status, its headers (lower-case names; repeated ones joined with
    ``", "``) and its body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.body[:200]!r}>"


class AnswerReader:
    """Answers parsed from bytes as they arrive (:meth:`feed`); ``answers`` holds the complete
    ones. Bytes that are not an answer make :meth:`feed` raise ``ValueError``."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._parse_one():
            pass

    def finish(self) -> None:
        """The connection has closed: an answer framed by the close ends here."""
        self._parse_one(closed=True)

    @property
    def pending(self) -> bytes:
        """Bytes received that are not (yet) a complete answer."""
        return self._buffer

    def _parse_one(self, closed: bool = False) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = buffer[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {buffer[:200]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        start = end + 4
        if 100 <= status < 200:
            self._buffer = buffer[start:]
            return True
        if "content-length" in headers:
            stop = start + int(headers["content-length"])
            if len(buffer) < stop:
                return False
            body, rest = buffer[start:stop], buffer[stop:]
        elif "chunked" in headers.get("transfer-encoding", ""):
            decoded = _dechunk(buffer, start)
            if decoded is None:
                return False
            body, rest = decoded
        elif status in (204, 304):
            body, rest = b"", buffer[start:]
        elif closed:
            body, rest = buffer[start:], b""
        else:
            return False
        self.answers.append(Answer(status, headers, body))
        self._buffer = rest
        return bool(rest)


def _dechunk(buffer: bytes, start: int) -> tuple[bytes, bytes] | None:
    pieces: list[bytes] = []
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(buffer[at:line_end].split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", at)
            if trailer_end < 0:
                return None
            return b"".join(pieces), buffer[trailer_end + 2 :]
        if len(buffer) < at + size + 2:
            return None
        pieces.append(buffer[at : at + size])
        at += size + 2


def exchange(
    address: str,
    data: bytes,
    *,
    expect: int | None = None,
    half_close: bool = False,
    timeout: float = 10.0,
) -> tuple[list[Answer], bool]:
    """Send ``data`` on a new connection to ``address`` and read the answers: until ``expect``
    answers have arrived (None: until the server closes), the server closes, or ``timeout``
    seconds have passed. Sending and reading interleave, so a long pipeline never blocks on
    answers nobody reads; a server that closes before it has read everything ends the sending.
    ``half_close``: close the sending side once everything is sent. Gives the answers and
    whether the server closed the connection."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    reader = AnswerReader()
    closed = False
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.setblocking(False)
        sent = 0
        shut = False
        while True:
            if sent >= len(data) and half_close and not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            writing = [sock] if sent < len(data) else []
            readable, writable, _ = select.select([sock], writing, [], left)
            if writable:
                try:
                    sent += sock.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
                except OSError:  # the server closed: what it answered is still to be read
                    sent = len(data)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # a reset: the server closed with unread bytes
                    chunk = b""
                if not chunk:
                    closed = True
                    reader.finish()
                    break
                reader.feed(chunk)
                if expect is not None and len(reader.answers) >= expect:
                    break
    return reader.answers, closed
