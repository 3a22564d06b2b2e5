"""LMDB-specific behaviour: a full map is StorageFullError, and the node lock file."""

from __future__ import annotations

import pytest

from distribkv.storage.api import Namespace, Put
from distribkv.storage.errors import BackendLockedError, InvalidSettingError, StorageFullError
from distribkv.storage.store import open_store
from distribkv_lmdb import SPEC
from distribkv_lmdb.engine import LOCK_FILE


def test_a_full_map_is_storage_full_and_loses_nothing(tmp_path):
    store = open_store(SPEC, tmp_path, settings={"map_size": 1024 * 1024})
    written = []
    with pytest.raises(StorageFullError, match="map_size"):
        for i in range(10_000):
            batch = [Put(Namespace.DATA, b"k%05d-%d" % (i, j), b"x" * 1000) for j in range(4)]
            store.apply(batch, sync=False)
            written.append(i)
    assert written, "the map filled before the first write"
    # The failed batch left nothing behind; everything acknowledged is readable.
    failed = written[-1] + 1
    assert store.get_many([b"k%05d-%d" % (failed, j) for j in range(4)]) == [None] * 4
    for i in written:
        assert store.get(b"k%05d-0" % i) == b"x" * 1000
    store.close()
    # Reopening with a larger map is the remedy the error names; nothing was lost.
    store = open_store(SPEC, tmp_path, settings={"map_size": 8 * 1024 * 1024})
    store.put(b"after", b"works", sync=True)
    assert store.get(b"after") == b"works"
    assert store.get(b"k%05d-3" % written[-1]) == b"x" * 1000
    store.close()


def test_the_lock_file_keeps_a_second_handle_out(tmp_path):
    store = open_store(SPEC, tmp_path)
    assert (tmp_path / LOCK_FILE).exists()
    with pytest.raises(BackendLockedError, match="already open"):
        open_store(SPEC, tmp_path)
    store.close()
    open_store(SPEC, tmp_path).close()


def test_settings_are_validated(tmp_path):
    with pytest.raises(InvalidSettingError, match="unknown setting"):
        open_store(SPEC, tmp_path, settings={"mapsize": 1})
    with pytest.raises(InvalidSettingError, match="must be int"):
        open_store(SPEC, tmp_path, settings={"map_size": "1G"})
