"""The ``lmdb`` storage backend for distribkv.

This module is the entry point; it must not import lmdb, so listing plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distribkv import hookimpl
from distribkv.storage.api import BackendSpec, Capabilities, at_least, resolve_settings
from distribkv.storage.errors import BackendUnavailableError

__version__ = "0.1.0"

# Durability is a property of the LMDB environment, not of one commit.
CAPABILITIES = Capabilities(persistent=True, per_write_sync=False)

DEFAULTS: dict[str, Any] = {"map_size": 64 * 1024**3, "max_readers": 256}

CHECKS = {"map_size": at_least(1024 * 1024), "max_readers": at_least(1)}

SETTINGS_HELP = {
    "map_size": "largest size the data file may reach, in bytes (default 64 GiB, sparse)",
    "max_readers": "concurrent read transactions (default 256)",
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return resolve_settings("lmdb", settings, DEFAULTS, CHECKS)


def open_lmdb(path: Path, *, durability: str = "sync", settings: Mapping[str, Any] = {}):
    resolved = check_settings(settings)
    try:
        from distribkv_lmdb.engine import LmdbEngine
    except ImportError as exc:
        raise BackendUnavailableError(f"the lmdb backend needs the lmdb module: {exc}") from exc
    return LmdbEngine(Path(path), durability == "sync", resolved)


SPEC = BackendSpec(
    name="lmdb",
    open=open_lmdb,
    description="LMDB: copy-on-write B+tree in one memory map; reads never block",
    capabilities=CAPABILITIES,
    settings_help=SETTINGS_HELP,
    check_settings=check_settings,
)


@hookimpl
def distribkv_storage_backends() -> list[BackendSpec]:
    return [SPEC]
