"""The ``leveldb`` storage backend for distribkv (plyvel).

This module is the entry point; it must not import plyvel, so listing plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distribkv import hookimpl
from distribkv.storage.api import BackendSpec, Capabilities, at_least, one_of, resolve_settings
from distribkv.storage.errors import BackendUnavailableError

__version__ = "0.1.0"

CAPABILITIES = Capabilities(
    persistent=True, per_write_sync=True, compaction=True, bloom_filter=True, checksums=True
)

DEFAULTS: dict[str, Any] = {
    "bloom_filter_bits": 10,
    "lru_cache_size": 8 * 1024 * 1024,
    "write_buffer_size": 4 * 1024 * 1024,
    "block_size": 4096,
    "max_open_files": 1000,
    "compression": "snappy",
}

CHECKS = {
    "bloom_filter_bits": at_least(0),
    "lru_cache_size": at_least(0),
    "write_buffer_size": at_least(64 * 1024),
    "block_size": at_least(512),
    "max_open_files": at_least(16),
    "compression": one_of("snappy", "none"),
}

SETTINGS_HELP = {
    "bloom_filter_bits": "bits per key of the bloom filters; 0 turns them off (default 10)",
    "lru_cache_size": "block cache in bytes (default 8 MiB)",
    "write_buffer_size": "memtable size in bytes (default 4 MiB)",
    "block_size": "table block size in bytes (default 4096)",
    "max_open_files": "open table files kept (default 1000)",
    "compression": '"snappy" or "none" (default "snappy")',
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return resolve_settings("leveldb", settings, DEFAULTS, CHECKS)


def open_leveldb(path: Path, *, durability: str = "sync", settings: Mapping[str, Any] = {}):
    resolved = check_settings(settings)
    try:
        from distribkv_leveldb.engine import LevelDBEngine
    except ImportError as exc:
        raise BackendUnavailableError(f"the leveldb backend needs plyvel: {exc}") from exc
    return LevelDBEngine(Path(path), resolved)


SPEC = BackendSpec(
    name="leveldb",
    open=open_leveldb,
    description="LevelDB through plyvel: LSM tree, bloom filters, verified block checksums",
    capabilities=CAPABILITIES,
    settings_help=SETTINGS_HELP,
    check_settings=check_settings,
)


@hookimpl
def distribkv_storage_backends() -> list[BackendSpec]:
    return [SPEC]
