"""The ``template`` storage backend for distribkv: a distribution to copy for a new engine.

This module is the plugin's entry point (``[project.entry-points.distribkv]`` in
pyproject.toml). ``distribkv plugins``, ``--help`` and config validation import it, so it only
describes the backend: the engine, and with it the native library, is imported inside
:func:`open_template`, when a node opens its data directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distribkv import hookimpl
from distribkv.storage.api import BackendSpec, Capabilities, at_least, resolve_settings
from distribkv.storage.errors import BackendUnavailableError

__version__ = "0.1.0"

#: The backend's name: the entry-point name, ``backend = "template"`` in sharding.toml.
NAME = "template"

# What the engine declares about itself; the core and the conformance suite assume nothing
# else. A real engine declares persistent=True, and the suite then also checks reopening,
# the directory lock, atomicity across kill -9, the sync flag under strace and flipped bytes.
CAPABILITIES = Capabilities(
    persistent=False,
    # apply(sync=...) decides durability per call. An engine that can only choose it when it
    # opens (LMDB) says False, and honours sync=True anyway, at a higher cost.
    per_write_sync=True,
    # Set these only when the engine has them: compaction=True needs compact(ns).
    compaction=False,
    bloom_filter=False,
    checksums=False,
)

#: Every setting of ``[storage.template]`` with its default; the type of the default is the
#: type a setting must have.
DEFAULTS: dict[str, Any] = {"max_bytes": 1024**3}

CHECKS = {"max_bytes": at_least(1)}

SETTINGS_HELP = {
    "max_bytes": "most bytes of keys and values held; beyond it a write is refused with"
    " StorageFullError, HTTP 507 (default 1 GiB)",
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings; an unknown name, a wrong type or a bad value is an
    InvalidSettingError naming the setting. Needs no engine, so configs validate cheaply."""
    return resolve_settings(NAME, settings, DEFAULTS, CHECKS)


def open_template(path: Path, *, durability: str = "sync", settings: Mapping[str, Any] = {}):
    """Open (or create) the data directory ``path``; the core has created the directory.

    With ``per_write_sync`` the core passes the durability with every apply (``sync=``); an
    engine that can only choose it when it opens uses ``durability`` here (see backends/lmdb).
    """
    resolved = check_settings(settings)
    try:
        # The only import of the engine module, which imports the native library.
        from distribkv_template.engine import TemplateEngine
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the template backend cannot load its engine: {exc}"
        ) from exc
    return TemplateEngine(Path(path), resolved)


SPEC = BackendSpec(
    name=NAME,
    open=open_template,
    description="template: an in-memory engine laid out as a backend to copy (nothing is kept)",
    capabilities=CAPABILITIES,
    settings_help=SETTINGS_HELP,
    check_settings=check_settings,
)


@hookimpl
def distribkv_storage_backends() -> list[BackendSpec]:
    return [SPEC]
