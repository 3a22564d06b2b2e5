"""The replication-transport conformance suite, run against the core's ``log`` transport.

Run with: pytest -p distribkv.testing --distribkv-backend=lmdb core/tests/test_conformance_log.py
"""

import pytest

from distribkv.testing.replication_suite import *  # noqa: F403


@pytest.fixture(scope="module")
def transport_name() -> str:
    return "log"
