"""rocksdb-specific behaviour: settings, bloom filters on and off, compaction."""

from __future__ import annotations

import pytest

from distribkv.storage.api import Namespace, Put
from distribkv.storage.errors import InvalidSettingError
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
