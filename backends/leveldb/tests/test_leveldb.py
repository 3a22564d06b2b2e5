"""leveldb-specific behaviour: settings, bloom filters on and off, compaction."""

from __future__ import annotations

import random

import pytest

from distribkv.storage.api import Namespace, Put
from distribkv.storage.errors import InvalidSettingError
from distribkv.storage.store import open_store
from distribkv_leveldb import SPEC


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


@pytest.mark.parametrize("namespace", [None, Namespace.DATA], ids=["every namespace", "data"])
def test_a_compaction_leaves_the_keys_in_one_level(tmp_path, namespace):
    # A small memtable and keys in no order, so that the load leaves overlapping files in
    # more than one level.
    store = open_store(SPEC, tmp_path, settings={"write_buffer_size": 64 * 1024})
    value = bytes(range(100))
    order = list(range(20_000))
    random.Random(5).shuffle(order)
    for first in range(0, len(order), 1000):
        ops = [Put(Namespace.DATA, b"key-%06d" % i, value) for i in order[first : first + 1000]]
        store.apply(ops, sync=False)
    raw = store.engine._db  # type: ignore[attr-defined]

    def levels_with_files() -> list[int]:
        return [
            level
            for level in range(7)
            if int(raw.get_property(b"leveldb.num-files-at-level%d" % level))
        ]

    assert len(levels_with_files()) > 1, "the load left every file in one level already"
    store.compact(namespace)
    assert len(levels_with_files()) == 1  # a read looks in one file, and starts no compaction
    assert store.get(b"key-012345") == value
    store.close()
