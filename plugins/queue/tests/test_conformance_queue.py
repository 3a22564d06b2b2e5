"""The replication-transport conformance suite, run against the ``queue`` transport.

Run with: pytest -p distribkv.testing --distribkv-backend=lmdb plugins/queue/tests
"""

import pytest

from distribkv.testing.replication_suite import *  # noqa: F403

pytest.importorskip("distribkv_queue")


@pytest.fixture(scope="module")
def transport_name() -> str:
    return "queue"


@pytest.fixture(scope="session")
def batched_writes() -> bool:
    # One change per round trip: a burst of batched writes builds a backlog it needs seconds to
    # drain, so it gets the seeds' one-key requests.
    return False
