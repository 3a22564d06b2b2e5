"""The access log's writer: a batch goes out in chunks, with a pause between two of them in
which the serving thread has the GIL."""

from __future__ import annotations

import io

import pytest

from distribkv.http.accesslog import AccessLog


class Recording(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def quiet_log(stream, **settings) -> AccessLog:
    """An access log whose thread never flushes by itself: the test flushes."""
    return AccessLog(stream, interval=3600.0, **settings)


def test_a_batch_is_written_in_chunks_in_order_with_a_pause_between_two():
    stream = Recording()
    pauses: list[float] = []
    log = quiet_log(stream, chunk=3, pause=0.25, sleep=pauses.append)
    try:
        for n in range(10):
            log.add("127.0.0.1", "GET", f"/get-{n}", "200", 0.5)
        log.flush()
        assert [w.count("\n") for w in stream.writes] == [3, 3, 3, 1]
        paths = [line.split()[6] for line in stream.getvalue().splitlines()]
        assert paths == [f"/get-{n}" for n in range(10)]
        assert pauses == [0.25, 0.25, 0.25]  # between chunks, none after the last
        assert not log.pending
    finally:
        log.close()


def test_closing_writes_what_is_left_without_pausing():
    stream = Recording()
    pauses: list[float] = []
    log = quiet_log(stream, chunk=2, pause=0.25, sleep=pauses.append)
    for n in range(5):
        log.add("127.0.0.1", "GET", f"/get-{n}", "200", 0.5)
    log.close()
    assert [w.count("\n") for w in stream.writes] == [2, 2, 1]
    assert pauses == []


def test_a_chunk_below_one_line_is_refused():
    with pytest.raises(ValueError, match="chunk must be at least 1 line, not 0"):
        AccessLog(io.StringIO(), chunk=0)
