"""distribkv's conformance suites, as an opt-in pytest plugin (``-p distribkv.testing``).

A plugin distribution imports the suite of its kind into one of its test modules and runs
pytest with this plugin and the option that names what is tested:

==================  ======================================  ==============================
kind                test module                             option (default)
==================  ======================================  ==============================
storage backend     ``from distribkv.testing.suite          ``--distribkv-backend`` (memory)
                    import *``
HTTP server         ``from distribkv.testing.server_suite   ``--distribkv-server`` (waitress)
                    import *``
hashing scheme      ``from distribkv.testing.hashing_suite  ``--distribkv-hashing`` (modulo)
                    import *``
replication         ``from distribkv.testing                ``--distribkv-transport`` (log)
transport           .replication_suite import *``
==================  ======================================  ==============================

for example::

    # tests/test_conformance.py
    from distribkv.testing.suite import *  # noqa: F403

    pytest -p distribkv.testing --distribkv-backend=lmdb tests/

``--distribkv-backend`` and ``--distribkv-hashing`` take an installed plugin's name or
``module:attribute`` naming a ``BackendSpec`` or ``HashingSpec`` (for plugins that are not
installed). Servers and transports run in node processes, which find them by name: they must be
installed. ``--distribkv-setting name=value`` (repeatable; the value is parsed as TOML) passes
backend settings. Each option sets a fixture (``backend_name``, ``server_name``,
``hashing_name``, ``transport_name``); a test module that defines a fixture of the same name
(scope ``module`` or wider, possibly parametrized) chooses for its own tests instead::

    @pytest.fixture(scope="module", params=["waitress", "myserver"])
    def server_name(request):
        return request.param

The suites that run nodes use the backend under test (``--distribkv-backend``) for their data,
and :mod:`distribkv.testing.cluster` for their clusters, which third-party tests can use too.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distribkv.hashing.api import HashingSpec
from distribkv.storage.api import BackendSpec
from distribkv.storage.store import Store, open_store
from distribkv.testing.cluster import HostRange, allocate_hosts

BACKEND_ENV = "DISTRIBKV_TEST_BACKEND"
SERVER_ENV = "DISTRIBKV_TEST_SERVER"
HASHING_ENV = "DISTRIBKV_TEST_HASHING"
TRANSPORT_ENV = "DISTRIBKV_TEST_TRANSPORT"

#: kind -> the spec class a ``module:attribute`` must name
_SPEC_CLASSES: dict[str, type] = {"storage": BackendSpec, "hashing": HashingSpec}


def resolve_spec(kind: str, text: str) -> Any:
    """The installed plugin of ``kind`` named ``text``, or the spec ``module:attribute`` names."""
    if ":" in text and kind in _SPEC_CLASSES:
        module_name, _, attr = text.partition(":")
        spec = getattr(importlib.import_module(module_name), attr)
        if not isinstance(spec, _SPEC_CLASSES[kind]):
            raise TypeError(f"{text} is not a {_SPEC_CLASSES[kind].__name__}")
        return spec
    from distribkv.plugins import load_plugins

    return load_plugins().select(kind, text)


def resolve_backend(text: str) -> BackendSpec:
    """An installed backend by name, or a BackendSpec named by ``module:attribute``."""
    return resolve_spec("storage", text)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise pytest.UsageError(f"--distribkv-setting expects name=value, got {pair!r}")
        settings[name.strip()] = tomllib.loads(f"v = {raw}")["v"]
    return settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("distribkv", "distribkv conformance suites")
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
    for option, env, default, what in (
        ("--distribkv-server", SERVER_ENV, "waitress", "HTTP server plugin: installed name"),
        (
            "--distribkv-hashing",
            HASHING_ENV,
            "modulo",
            "hashing scheme: installed name or module:attribute",
        ),
        ("--distribkv-transport", TRANSPORT_ENV, "log", "replication transport: installed name"),
    ):
        group.addoption(
            option, default=os.environ.get(env, default), help=f"{what} under test (env {env})"
        )


#: The names of the fixtures made with :func:`cluster_fixture`.
_CLUSTER_FIXTURES: set[str] = set()


def cluster_fixture(function: Callable[..., Any]) -> Any:
    """A module-scoped fixture that runs a cluster the module's tests share.

    Under pytest-xdist with ``--dist loadgroup`` the tests of a module that use such fixtures
    run on one worker, which starts each cluster once, instead of once on every worker that
    gets one of them. Without xdist it is ``pytest.fixture(scope="module")``."""
    _CLUSTER_FIXTURES.add(function.__name__)
    return pytest.fixture(scope="module")(function)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "serial: a timing measurement that needs the machine to itself; run these apart from"
        " parallel workers (pytest -m serial, without -n)",
    )
    # Declared here too, so that --strict-markers passes where xdist is not installed.
    config.addinivalue_line("markers", "xdist_group(name): run the group on one xdist worker")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            module = item.nodeid.split("::", 1)[0]
            item.add_marker(pytest.mark.xdist_group(f"{module}-clusters"))


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
    """``open_backend(path, durability="sync", min_free_bytes=0, **settings)`` opens a Store;
    all are closed at teardown."""
    opened: list[Store] = []

    def opener(
        path: str | Path, *, durability: str = "sync", min_free_bytes: int = 0, **overrides: Any
    ) -> Store:
        store = open_store(
            backend_spec,
            path,
            durability=durability,
            settings={**backend_settings, **overrides},
            min_free_bytes=min_free_bytes,
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


@pytest.fixture(scope="session")
def server_name(pytestconfig: pytest.Config) -> str:
    """The HTTP server plugin under test (``--distribkv-server``)."""
    return pytestconfig.getoption("--distribkv-server")


@pytest.fixture(scope="session")
def hashing_name(pytestconfig: pytest.Config) -> str:
    """The hashing scheme under test (``--distribkv-hashing``: name or module:attribute)."""
    return pytestconfig.getoption("--distribkv-hashing")


@pytest.fixture(scope="session")
def hashing_settings() -> dict[str, Any]:
    """The ``[cluster.<scheme>]`` settings the hashing suite uses: none (the defaults)."""
    return {}


@pytest.fixture(scope="session")
def transport_name(pytestconfig: pytest.Config) -> str:
    """The replication transport under test (``--distribkv-transport``)."""
    return pytestconfig.getoption("--distribkv-transport")


@pytest.fixture
def hosts() -> Iterator[HostRange]:
    """Loopback hosts of this test's own (see :func:`distribkv.testing.cluster.allocate_hosts`)."""
    with allocate_hosts() as held:
        yield held
