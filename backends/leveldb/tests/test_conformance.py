"""The shared storage conformance suite, run against the leveldb backend.

Run with: pytest -p distribkv.testing --distribkv-backend=leveldb backends/leveldb/tests
"""

from distribkv.testing.suite import *  # noqa: F403
