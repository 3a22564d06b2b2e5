"""What only the template backend does: its one setting, and a plugin module that stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distribkv.storage.api import Delete, Namespace, Put
from distribkv.storage.errors import InvalidSettingError, StorageFullError
from distribkv.storage.store import open_store
from distribkv_template import SPEC

DATA, META = Namespace.DATA, Namespace.META


def test_a_write_beyond_max_bytes_is_storage_full_and_writes_nothing(tmp_path):
    store = open_store(SPEC, tmp_path, settings={"max_bytes": 4096})
    store.put(b"kept", b"x" * 1000, sync=False)
    batch = [Put(DATA, b"a", b"y" * 1000), Delete(DATA, b"kept"), Put(META, b"b", b"z" * 3500)]
    with pytest.raises(StorageFullError, match="max_bytes"):
        store.apply(batch, sync=False)
    assert store.get_many([b"kept", b"a"]) == [b"x" * 1000, None]
    assert store.get(b"b", META) is None
    # Room freed by a delete is room again.
    store.delete(b"kept", sync=False)
    store.apply([Put(DATA, b"a", b"y" * 1000), Put(META, b"b", b"z" * 2000)], sync=False)
    assert store.stats().details["bytes_held"] <= 4096
    store.close()


def test_settings_are_validated_before_the_engine_is_opened(tmp_path):
    with pytest.raises(InvalidSettingError, match="unknown setting"):
        open_store(SPEC, tmp_path, settings={"maxbytes": 1})
    with pytest.raises(InvalidSettingError, match="must be int"):
        open_store(SPEC, tmp_path, settings={"max_bytes": "1G"})
    with pytest.raises(InvalidSettingError, match=">= 1"):
        SPEC.check_settings({"max_bytes": 0})


def test_listing_the_plugin_does_not_import_the_engine():
    code = (
        "import sys\n"
        "from distribkv.plugins import load_plugins\n"
        "assert 'template' in load_plugins(disabled=()).names('storage')\n"
        "assert 'distribkv_template.engine' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
