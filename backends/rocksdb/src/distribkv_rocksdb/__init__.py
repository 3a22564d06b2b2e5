"""The ``rocksdb`` storage backend for distribkv (rocksdict).

This module is the entry point; it must not import rocksdict, so listing plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distribkv import hookimpl
from distribkv.storage.api import BackendSpec, Capabilities, at_least, resolve_settings
from distribkv.storage.errors import BackendUnavailableError

__version__ = "0.1.0"

CAPABILITIES = Capabilities(
    persistent=True, per_write_sync=True, compaction=True, bloom_filter=True, checksums=True
)

DEFAULTS: dict[str, Any] = {
    "bloom_filter_bits": 10,
    "block_cache_size": 32 * 1024 * 1024,
    "write_buffer_size": 16 * 1024 * 1024,
    "max_background_jobs": 2,
}

CHECKS = {
    "bloom_filter_bits": at_least(0),
    "block_cache_size": at_least(0),
    "write_buffer_size": at_least(64 * 1024),
    "max_background_jobs": at_least(1),
}

SETTINGS_HELP = {
    "bloom_filter_bits": "bits per key of the bloom filters; 0 turns them off (default 10)",
    "block_cache_size": "block cache in bytes (default 32 MiB)",
    "write_buffer_size": "memtable size in bytes (default 16 MiB)",
    "max_background_jobs": "flush and compaction threads (default 2)",
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return resolve_settings("rocksdb", settings, DEFAULTS, CHECKS)


def open_rocksdb(path: Path, *, durability: str = "sync", settings: Mapping[str, Any] = {}):
    resolved = check_settings(settings)
    try:
        from distribkv_rocksdb.engine import RocksDBEngine
    except ImportError as exc:
        raise BackendUnavailableError(f"the rocksdb backend needs rocksdict: {exc}") from exc
    return RocksDBEngine(Path(path), resolved)


SPEC = BackendSpec(
    name="rocksdb",
    open=open_rocksdb,
    description="RocksDB through rocksdict: LSM tree, column families, bloom filters",
    capabilities=CAPABILITIES,
    settings_help=SETTINGS_HELP,
    check_settings=check_settings,
)


@hookimpl
def distribkv_storage_backends() -> list[BackendSpec]:
    return [SPEC]
