"""Fixtures of the replication unit tests."""

from __future__ import annotations

import time

import pytest

from distribkv.plugins import load_plugins
from distribkv.storage.store import open_store


@pytest.fixture
def store(tmp_path):
    """A store of the in-process ``memory`` backend."""
    store = open_store(load_plugins().storage_backend("memory"), tmp_path)
    yield store
    store.close()


WAIT = 10.0


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def until():
    """``until(predicate, what)``: poll ``predicate`` until it is true; fail after 10 s."""
    return _wait_until
