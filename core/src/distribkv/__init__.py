"""distribkv: a sharded, replicated key-value database with pluggable storage engines.

Plugins import :data:`hookimpl` from here to mark their hook implementations::

    from distribkv import hookimpl

    @hookimpl
    def distribkv_storage_backends():
        return [BackendSpec(...)]
"""

import pluggy

__all__ = ["PROJECT", "__version__", "hookimpl"]

PROJECT = "distribkv"
__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker(PROJECT)
