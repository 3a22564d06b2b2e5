"""rocksdb-specific behaviour: settings, bloom filters on and off, compaction."""

from __future__ import annotations

import pytest

from distribkv.storage.api import Namespace, Put
from distribkv.storage.errors import InvalidSettingError, StorageError
from distribkv.storage.store import open_store
from distribkv_rocksdb import SPEC


@pytest.mark.parametrize("bits", [0, 10])
def test_reads_are_right_with_and_without_bloom_filters(tmp_path, bits):
    store = open_store(SPEC, tmp_path, settings={"bloom_filter_bits": bits})
    store.apply([Put(Namespace.DATA, b"k%05d" % i, b"v%d" % i) for i in range(2000)], sync=False)
    store.compact()
    assert store.get(b"k01234") == b"v1234"
    assert store.get(b"k99999") is None
    assert store.stats().details["bloom_filter_bits"] == bits
    store.close()


def test_unknown_and_mistyped_settings_are_refused(tmp_path):
    with pytest.raises(InvalidSettingError, match=r"unknown setting.*bloom_bits"):
        open_store(SPEC, tmp_path, settings={"bloom_bits": 10})
    with pytest.raises(InvalidSettingError, match="must be int"):
        open_store(SPEC, tmp_path, settings={"bloom_filter_bits": "10"})
    with pytest.raises(InvalidSettingError, match="must be int"):
        open_store(SPEC, tmp_path, settings={"bloom_filter_bits": True})


class _FailingSync:
    """The engine's rocksdict handle, with a WAL sync that fails (as on an I/O error)."""

    def __init__(self, db):
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def flush_wal(self, sync=True):
        raise Exception("IO error: fsync failed")  # rocksdict raises bare Exception


def test_a_failed_wal_sync_fails_the_write_and_every_later_one(tmp_path):
    store = open_store(SPEC, tmp_path)
    engine = store.engine
    real = engine._db
    store.put(b"before", b"1", sync=True)
    engine._db = _FailingSync(real)
    with pytest.raises(StorageError, match="syncing the WAL"):
        store.put(b"k", b"v", sync=True)
    engine._db = real
    # Nothing after it is acknowledged as durable, synced or not; reads still work.
    for sync in (True, False):
        with pytest.raises(StorageError, match="a WAL sync failed"):
            store.put(b"later", b"v", sync=sync)
    assert store.get(b"before") == b"1"
    store.close()
    reopened = open_store(SPEC, tmp_path)
    reopened.put(b"later", b"v", sync=True)
    assert reopened.get(b"later") == b"v"
    reopened.close()
