"""The plugin manager: finds plugins through entry points and selects them by name.

``load_plugins()`` walks the entry-point group ``distribkv`` itself so that a plugin which fails to
import is recorded with its reason instead of taking the process down; the node only fails if
its configuration names that plugin. ``DISTRIBKV_DISABLE_PLUGINS=a,b`` blocks plugins by name.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

import attrs
import pluggy

from distribkv import PROJECT, hookspecs

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "DuplicatePluginError",
    "PluginInfo",
    "PluginNotFoundError",
    "PluginRegistry",
    "Provided",
    "load_plugins",
]

DISABLE_ENV = "DISTRIBKV_DISABLE_PLUGINS"
TRACE_ENV = "DISTRIBKV_TRACE_HOOKS"

#: kind -> (hook name, what the kind is called in messages)
KINDS: Mapping[str, tuple[str, str]] = {
    "storage": ("distribkv_storage_backends", "backend"),
    "hashing": ("distribkv_hashing_schemes", "hashing scheme"),
    "replication": ("distribkv_replication_transports", "replication transport"),
    "server": ("distribkv_http_servers", "server"),
    "coordination": ("distribkv_coordinations", "coordination"),
}

#: The plugins that distribkv's own distributions provide, by kind (for "did you mean").
_SHIPPED: Mapping[str, tuple[str, ...]] = {
    "storage": ("leveldb", "lmdb", "rocksdb", "memory"),
    "hashing": ("modulo", "ring"),
    "replication": ("log", "queue"),
    "server": ("waitress", "granian"),
    "coordination": ("static", "etcd"),
}

#: Plugins whose distribution is not simply "distribkv-<name>".
_DISTRIBUTIONS = {
    "memory": "distribkv",
    "modulo": "distribkv",
    "ring": "distribkv",
    "waitress": "distribkv",
    "log": "distribkv",
    "static": "distribkv",
}


class PluginNotFoundError(LookupError):
    """A configuration names a plugin that is not installed or failed to load."""


class DuplicatePluginError(RuntimeError):
    """Two plugins offer the same name for the same kind."""


@attrs.frozen
class PluginInfo:
    """One entry point of the group, loaded or not."""

    name: str
    module: str
    distribution: str
    version: str
    #: None when loaded; the reason otherwise ("disabled by ..." or the import error).
    error: str | None = None

    @property
    def loaded(self) -> bool:
        return self.error is None


@attrs.frozen
class Provided:
    """A spec (BackendSpec, HashingSpec, ...) with the plugin that provided it."""

    kind: str
    spec: Any
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.spec.name


def pip_name(name: str) -> str:
    """The distribution that conventionally provides plugin ``name``."""
    return _DISTRIBUTIONS.get(name, f"{PROJECT}-{name}")


class PluginRegistry:
    """The plugins of one process: what loaded, what did not, and every spec by kind and name."""

    def __init__(self, manager: pluggy.PluginManager, plugins: Iterable[PluginInfo]):
        self.manager = manager
        self.plugins: list[PluginInfo] = list(plugins)
        self._by_kind: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
        infos = {info.name: info for info in self.plugins}
        broken: set[str] = set()
        for kind, (hook_name, label) in KINDS.items():
            hook = getattr(manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                info = infos.get(impl.plugin_name) or PluginInfo(
                    impl.plugin_name, getattr(impl.plugin, "__name__", "?"), "?", "?"
                )
                if impl.plugin_name in broken:
                    continue
                try:
                    specs = self._call_one(hook_name, impl.plugin)
                except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the rest
                    reason = f"{hook_name} raised {type(exc).__name__}: {exc}"
                    log.warning("plugin %r is unavailable: %s", impl.plugin_name, reason)
                    broken.add(impl.plugin_name)
                    failed = attrs.evolve(info, error=reason)
                    self.plugins = [failed if i.name == info.name else i for i in self.plugins]
                    for table in self._by_kind.values():
                        for name in [n for n, p in table.items() if p.plugin.name == info.name]:
                            del table[name]
                    continue
                for spec in specs:
                    known = self._by_kind[kind].get(spec.name)
                    if known is not None:
                        raise DuplicatePluginError(
                            f"{label} {spec.name!r} is provided twice: by plugin"
                            f" {known.plugin.name!r} ({known.plugin.distribution}) and by"
                            f" {info.name!r} ({info.distribution})"
                        )
                    self._by_kind[kind][spec.name] = Provided(kind, spec, info)

    def _call_one(self, hook_name: str, plugin: object) -> list[Any]:
        """The specs one plugin returns from ``hook_name``, called through pluggy's hook
        caller (so that ``manager.trace`` and hook-call monitoring see it) restricted to that
        plugin, so that the specs are known to be its own and its failure stays its own."""
        manager = self.manager
        others = [p for p in manager.get_plugins() if p is not plugin]
        caller = manager.subset_hook_caller(hook_name, remove_plugins=others)
        specs: list[Any] = []
        for result in caller():
            specs.extend(result or [])
        return specs

    @property
    def failed(self) -> list[PluginInfo]:
        return [info for info in self.plugins if not info.loaded]

    def provided(self, kind: str) -> list[Provided]:
        """Every spec of ``kind``, sorted by name."""
        return sorted(self._by_kind[kind].values(), key=lambda p: p.name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def select(self, kind: str, name: str) -> Any:
        """The spec of ``kind`` called ``name``, or PluginNotFoundError saying how to get it."""
        found = self._by_kind[kind].get(name)
        if found is not None:
            return found.spec
        label = KINDS[kind][1]
        for info in self.failed:
            if info.name == name:
                raise PluginNotFoundError(
                    f'{label} "{name}" is installed but unavailable: {info.error}'
                )
        names = self.names(kind)
        installed = ", ".join(names) or "none"
        close = difflib.get_close_matches(name, [*names, *_SHIPPED[kind]], n=1, cutoff=0.7)
        if close and close[0] != name:
            # A misspelt name: no pip command for a distribution that does not exist.
            hint = f'did you mean "{close[0]}"?'
            if close[0] not in names:
                hint += f" It is installed with: pip install {pip_name(close[0])}"
            raise PluginNotFoundError(
                f'{label} "{name}" is not installed (installed: {installed}); {hint}'
            )
        raise PluginNotFoundError(
            f'{label} "{name}" is not installed (installed: {installed});'
            f" install it with: pip install {pip_name(name)}"
        )

    def storage_backend(self, name: str):
        return self.select("storage", name)

    def hashing_scheme(self, name: str):
        return self.select("hashing", name)

    def replication_transport(self, name: str):
        return self.select("replication", name)

    def http_server(self, name: str):
        return self.select("server", name)

    def coordination(self, name: str):
        return self.select("coordination", name)


def _log_trace(line: str) -> None:
    log.debug("hook trace: %s", line.rstrip())


def disabled_names(environ: Mapping[str, str] | None = None) -> set[str]:
    raw = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def load_plugins(
    *,
    disabled: Iterable[str] | None = None,
    extra: Mapping[str, object] | None = None,
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    trace: Callable[[str], object] | None = None,
) -> PluginRegistry:
    """Load every plugin of the group ``distribkv`` (plus ``extra`` objects, by name).

    ``disabled`` defaults to the names in ``DISTRIBKV_DISABLE_PLUGINS``. ``trace`` receives
    pluggy's trace of every hook call (``manager.trace``), from the first one on; with
    ``DISTRIBKV_TRACE_HOOKS=1`` in the environment the trace goes to the debug log.
    """
    blocked = disabled_names() if disabled is None else set(disabled)
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    if trace is None and os.environ.get(TRACE_ENV) == "1":
        trace = _log_trace
    if trace is not None:
        manager.trace.root.setwriter(trace)
        manager.enable_tracing()
    infos: list[PluginInfo] = []
    eps = metadata.entry_points(group=PROJECT) if entry_points is None else entry_points
    for ep in sorted(eps, key=lambda e: e.name):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        if ep.name in blocked:
            infos.append(
                PluginInfo(ep.name, ep.value, dist_name, version, f"disabled by {DISABLE_ENV}")
            )
            continue
        if manager.has_plugin(ep.name):
            log.warning("plugin %r is registered twice; keeping the first", ep.name)
            continue
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure makes the plugin unavailable
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r (%s) failed to load: %s", ep.name, ep.value, reason)
            infos.append(PluginInfo(ep.name, ep.value, dist_name, version, reason))
            continue
        infos.append(PluginInfo(ep.name, ep.value, dist_name, version))
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
        infos.append(PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), "(local)", "-"))
    return PluginRegistry(manager, infos)
