"""The HTTP-server conformance suite, run against the core's ``waitress`` server.

Run with: pytest -p distribkv.testing core/tests/test_conformance_waitress.py
"""

import pytest

from distribkv.testing.server_suite import *  # noqa: F403


@pytest.fixture(scope="module")
def server_name() -> str:
    return "waitress"
