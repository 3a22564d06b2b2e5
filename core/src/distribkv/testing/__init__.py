"""The backend conformance suite, as an opt-in pytest plugin.

A backend distribution runs the shared suite against itself::

    # tests/test_conformance.py
    from distribkv.testing.suite import *  # noqa: F403

    pytest -p distribkv.testing --distribkv-backend=lmdb tests/

``--distribkv-backend`` takes an installed backend name or ``module:attribute`` naming a
``BackendSpec`` (for backends that are not installed as plugins). Without it the suite runs on
the built-in ``memory`` backend. ``--distribkv-setting name=value`` (repeatable; the value is
parsed as TOML) passes backend settings.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distribkv.storage.api import BackendSpec
from distribkv.storage.store import Store, open_store

BACKEND_ENV = "DISTRIBKV_TEST_BACKEND"


def resolve_backend(text: str) -> BackendSpec:
    """An installed backend by name, or a BackendSpec named by ``module:attribute``."""
    if ":" in text:
        module_name, _, attr = text.partition(":")
        spec = getattr(importlib.import_module(module_name), attr)
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"{text} is not a BackendSpec")
        return spec
    from distribkv.plugins import load_plugins

    return load_plugins().storage_backend(text)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise pytest.UsageError(f"--distribkv-setting expects name=value, got {pair!r}")
        settings[name.strip()] = tomllib.loads(f"v = {raw}")["v"]
    return settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("distribkv", "distribkv backend conformance")
    group.addoption(
        "--distribkv-backend",
        default=os.environ.get(BACKEND_ENV, "memory"),
        help=f"backend under test: installed name or module:attribute (env {BACKEND_ENV})",
    )
    group.addoption(
        "--distribkv-setting",
        action="append",
        default=[],
        help="backend setting name=value (TOML value); repeatable",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"distribkv backend under test: {config.getoption('--distribkv-backend')}"


@pytest.fixture(scope="session")
def backend_name(pytestconfig: pytest.Config) -> str:
    """The ``--distribkv-backend`` text (name or module:attribute)."""
    return pytestconfig.getoption("--distribkv-backend")


@pytest.fixture(scope="session")
def backend_spec(backend_name: str) -> BackendSpec:
    return resolve_backend(backend_name)


@pytest.fixture(scope="session")
def backend_settings(pytestconfig: pytest.Config) -> dict[str, Any]:
    return parse_settings(pytestconfig.getoption("--distribkv-setting"))


@pytest.fixture
def open_backend(
    backend_spec: BackendSpec, backend_settings: dict[str, Any]
) -> Iterator[Callable[..., Store]]:
    """``open_backend(path, durability="sync")`` opens a Store; all are closed at teardown."""
    opened: list[Store] = []

    def opener(path: str | Path, *, durability: str = "sync", **overrides: Any) -> Store:
        store = open_store(
            backend_spec, path, durability=durability, settings={**backend_settings, **overrides}
        )
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend: Callable[..., Store], tmp_path: Path) -> Store:
    """A fresh store of the backend under test in an empty directory."""
    return open_backend(tmp_path / "db")
