"""The core's own tests check it with the memory backend, or with none: only those that take
the run's backend (the ``backend_name`` fixture, directly or through ``backend_spec``) depend
on ``--distribkv-backend``. The others run once in the test matrix, in its lmdb environment
(and in any run for lmdb or memory); the leveldb and rocksdb environments skip them, saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
RUNS_THEM = ("lmdb", "memory")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    backend = config.getoption("--distribkv-backend")
    if backend in RUNS_THEM:
        return
    skip = pytest.mark.skip(
        reason=f"does not depend on the backend: runs in the lmdb environment, not for {backend}"
    )
    for item in items:
        if HERE not in item.path.parents:
            continue
        if "backend_name" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
