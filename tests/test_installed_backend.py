"""What a user sees in an environment with the core and one backend installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from distribkv.cli import main
from distribkv.plugins import load_plugins, pip_name

ALL_BACKENDS = ("leveldb", "lmdb", "rocksdb")


def test_plugins_command_lists_the_installed_backend_with_its_version(backend_name):
    beside = Path(sys.executable).with_name("distribkv")
    exe = str(beside) if beside.exists() else shutil.which("distribkv")
    assert exe, "the distribkv console script is not installed"
    result = subprocess.run(
        [exe, "plugins", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    listing = json.loads(result.stdout)
    storage = {p["name"]: p for p in listing["storage"]}
    hashing = {p["name"]: p for p in listing["hashing"]}
    assert {"modulo", "ring"} <= set(hashing)
    assert hashing["ring"]["version"] == metadata.version("distribkv")
    if backend_name in ALL_BACKENDS:
        entry = storage[backend_name]
        assert entry["distribution"] == pip_name(backend_name)
        assert entry["version"] == metadata.version(pip_name(backend_name))
        assert "persistent" in entry["capabilities"]
    assert listing["unavailable"] == []


def test_a_config_naming_a_missing_backend_says_what_is_installed(tmp_path, capsys):
    installed = load_plugins().names("storage")
    missing = next((name for name in ALL_BACKENDS if name not in installed), None)
    if missing is None:
        pytest.skip("every backend is installed here")
    config = Path(tmp_path / "sharding.toml")
    config.write_text(
        f'[storage]\nbackend = "{missing}"\n'
        '[[shards]]\nname = "s0"\nidx = 0\naddress = "127.0.0.2:8080"\n'
    )
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f'backend "{missing}" is not installed (installed: {", ".join(installed)});' in err
    assert f"install it with: pip install distribkv-{missing}" in err


def test_bloom_benchmark_runs_on_backends_with_filters(backend_name, capsys):
    from distribkv.storage.bloombench import main as bloombench

    spec = load_plugins().storage_backend(backend_name)
    if not spec.capabilities.bloom_filter:
        pytest.skip(f"backend {backend_name!r} has no bloom filters")
    assert bloombench(["--backend", backend_name, "--keys", "3000", "--lookups", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(backend_name)]
    assert [row[1] for row in rows] == ["missing", "present"]
