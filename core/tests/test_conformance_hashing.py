"""The hashing-scheme conformance suite, run against the core's ``modulo`` and ``ring`` schemes.

Run with: pytest -p distribkv.testing core/tests/test_conformance_hashing.py
(``-k adding -s`` prints how many keys each scheme moves when a shard is added).
"""

import pytest

from distribkv.testing.hashing_suite import *  # noqa: F403


@pytest.fixture(scope="module", params=["modulo", "ring"])
def hashing_name(request) -> str:
    return request.param
