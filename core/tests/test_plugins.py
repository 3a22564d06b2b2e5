"""The plugin manager: discovery, isolation of broken plugins, selection by name, listing."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from importlib import metadata

import pytest

from distribkv import hookimpl, hookspecs
from distribkv.cli import main
from distribkv.plugins import (
    DuplicatePluginError,
    PluginNotFoundError,
    load_plugins,
)
from distribkv.storage import memory


def fake_entry_point(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="distribkv")


def test_builtin_plugins_are_found_through_entry_points():
    registry = load_plugins(disabled=())
    assert {"memory"} <= set(registry.names("storage"))
    assert {"modulo", "ring"} <= set(registry.names("hashing"))
    provided = {p.name: p for p in registry.provided("hashing")}
    assert provided["ring"].plugin.distribution == "distribkv"
    assert provided["ring"].plugin.version == metadata.version("distribkv")


def test_a_plugin_that_fails_to_import_is_recorded_not_fatal():
    eps = [
        fake_entry_point("memory", "distribkv.storage.memory"),
        fake_entry_point("broken", "distribkv_no_such_module_here"),
    ]
    registry = load_plugins(disabled=(), entry_points=eps)
    assert registry.names("storage") == ["memory"]
    [failed] = registry.failed
    assert failed.name == "broken"
    assert "ModuleNotFoundError" in failed.error
    with pytest.raises(PluginNotFoundError, match='"broken" is installed but unavailable'):
        registry.storage_backend("broken")


def test_disable_variable_blocks_plugins_by_name(monkeypatch):
    monkeypatch.setenv("DISTRIBKV_DISABLE_PLUGINS", "ring, memory")
    registry = load_plugins()
    assert "ring" not in registry.names("hashing")
    assert "memory" not in registry.names("storage")
    assert "modulo" in registry.names("hashing")
    assert {i.name for i in registry.failed} >= {"ring", "memory"}


def test_unknown_backend_names_the_installed_ones_and_the_pip_command():
    registry = load_plugins(disabled=())
    installed = ", ".join(registry.names("storage"))
    with pytest.raises(PluginNotFoundError) as info:
        registry.storage_backend("nosuchengine")
    assert str(info.value) == (
        f'backend "nosuchengine" is not installed (installed: {installed});'
        " install it with: pip install distribkv-nosuchengine"
    )


def test_a_misspelt_plugin_name_gets_a_suggestion_and_no_pip_command():
    registry = load_plugins(disabled=())
    installed = ", ".join(registry.names("storage"))
    with pytest.raises(PluginNotFoundError) as info:
        registry.storage_backend("memroy")
    assert str(info.value) == (
        f'backend "memroy" is not installed (installed: {installed}); did you mean "memory"?'
    )
    with pytest.raises(PluginNotFoundError) as info:
        registry.hashing_scheme("rng")
    assert 'did you mean "ring"?' in str(info.value) and "pip" not in str(info.value)


def test_two_plugins_offering_one_name_are_rejected():
    class Twin:
        @hookimpl
        def distribkv_storage_backends(self):
            return [memory.SPEC]

    with pytest.raises(DuplicatePluginError, match="'memory' is provided twice"):
        load_plugins(disabled=(), extra={"twin": Twin()})


def test_every_hook_is_documented_and_prefixed():
    hooks = [
        (name, fn)
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, "distribkv_spec")
    ]
    assert len(hooks) == 8
    for name, fn in hooks:
        assert name.startswith("distribkv_"), name
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 40, f"{name} needs a docstring saying what to return"


def test_plugins_command_lists_without_loading_native_libraries():
    code = (
        "import sys\n"
        "from distribkv.cli import main\n"
        "main(['plugins'])\n"
        "loaded = {'plyvel', 'lmdb', 'rocksdict'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "modulo" in result.stdout and "ring" in result.stdout


def test_plugins_command_shows_versions_and_failures(capsys, monkeypatch):
    monkeypatch.setenv("DISTRIBKV_DISABLE_PLUGINS", "ring")
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    hashing = {p["name"]: p for p in listing["hashing"]}
    assert hashing["modulo"]["version"] == metadata.version("distribkv")
    assert "ring" not in hashing
    assert [u["name"] for u in listing["unavailable"]] == ["ring"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "unavailable plugins:" in text and "disabled by DISTRIBKV_DISABLE_PLUGINS" in text


def test_a_plugin_whose_hook_raises_is_unavailable_not_fatal():
    class Exploding:
        @hookimpl
        def distribkv_storage_backends(self):
            raise ImportError("libfoo.so: cannot open shared object file")

    registry = load_plugins(disabled=(), extra={"exploding": Exploding()})
    assert "memory" in registry.names("storage")
    [failed] = [i for i in registry.failed if i.name == "exploding"]
    assert "ImportError: libfoo.so" in failed.error
    with pytest.raises(PluginNotFoundError, match="installed but unavailable"):
        registry.storage_backend("exploding")


def test_hooks_are_called_through_pluggy_so_its_tracing_shows_them():
    lines: list[str] = []
    registry = load_plugins(trace=lines.append)
    traced = "".join(lines)
    for hook in (
        "distribkv_storage_backends",
        "distribkv_hashing_schemes",
        "distribkv_replication_transports",
        "distribkv_http_servers",
    ):
        assert hook in traced, hook
    assert "memory" in registry.names("storage")
    # A hook the core calls later is traced too.
    lines.clear()
    registry.manager.hook.distribkv_node_stopping(node=None)
    assert "distribkv_node_stopping" in "".join(lines)


def test_the_client_loads_no_web_framework_and_no_server():
    # A program that only talks to a cluster imports the client and nothing of the node's
    # serving side: no Falcon, no waitress.
    code = (
        "import sys, distribkv.client, distribkv.httpclient\n"
        "loaded = sorted(m for m in ('falcon', 'waitress', 'granian') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
