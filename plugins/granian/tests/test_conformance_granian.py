"""The HTTP-server conformance suite, run against the ``granian`` server, plus what only granian
says about itself.

Run with: pytest -p distribkv.testing --distribkv-backend=lmdb plugins/granian/tests
"""

import pytest

from distribkv.testing.cluster import call
from distribkv.testing.server_suite import *  # noqa: F403
from distribkv.testing.server_suite import redirect_cluster  # noqa: F401 - used below

pytest.importorskip("distribkv_granian")


@pytest.fixture(scope="module")
def server_name() -> str:
    return "granian"


def test_the_nodes_answer_with_granians_server_header(redirect_cluster):  # noqa: F811
    response = call(redirect_cluster.address("shard-0"), "GET", "/healthz")
    assert response.status == 200
    assert response.headers.get("server") == "granian"
